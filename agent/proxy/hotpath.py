"""Which implementation of the tunnel's per-message work runs: the compiled module or pure Python.

``agent.proxy._hotpath`` (agent/proxy/_hotpath.c, built from source by ``make setup`` in a checkout and by
``make install`` on a node; setup.py) is
the compiled twin of pure-Python steps that stay the reference implementation: frame decoding
(``mux.PyFrameDecoder``), sealing a DATA frame into TLS records, the TLS receive loop
(``endpoints.TlsLeg``) and a whole read of an established tunnel — decrypt, decode, hand each frame to
its stream or the session — in one call (``TlsLeg.route_frames``, set by ``session.MuxSession.start``),
the relay steps of a small message in both directions (``Stream.on_data`` → ``Relay.leg_data`` →
``PlainLeg.write`` inside that read; ``PlainLeg.buffer_updated`` → ``Relay.leg_data`` → ``Stream.write`` →
``TlsLeg.write_data_frame``), and the base types holding those objects' steady-state fields
(agent/proxy/state.py, whose pure-Python twins run with the reference path). It is used when it was
built and imports, unless the environment says ``TCPMESH_HOTPATH=python`` (the switch tests and
operators use to run the reference path; any other value than ``python`` or ``compiled``, or ``compiled`` without the module, is refused at import with
the fix). A module built from older source (``ABI`` below differs from the module's: a checkout
updated without ``make setup``) counts as not built, and its description says so. ``describe()`` is
what ``tcpmesh doctor`` reports.

Imports nothing of tcpmesh but agent.install_form, which names the build command that fits how this agent was
installed (mux.py configures the compiled module with its own types).
"""

from __future__ import annotations

import os
from types import ModuleType

from agent.install_form import build_command

ENV = "TCPMESH_HOTPATH"
CHOICES = ("compiled", "python")
ABI = 5  # HOTPATH_ABI in _hotpath.c: the calls this source makes into the module
ENTRY_POINTS = ("configure", "FrameDecoder", "seal_data", "decrypt", "receive", "relay_send", "LegCore", "PlainCore",
                "TlsCore", "StreamCore", "RelayCore", "SessionCore")


class HotpathError(RuntimeError):
    """TCPMESH_HOTPATH asks for what cannot run."""


def _load() -> tuple[ModuleType | None, ModuleType | None, str]:
    """(the module if built, the module if chosen, why)."""
    wanted = os.environ.get(ENV, "")
    if wanted and wanted not in CHOICES:
        raise HotpathError(f"{ENV}={wanted!r} is not one of {', '.join(CHOICES)}: unset it (the compiled path "
                           f"when built, else pure Python) or set {ENV}=python")
    try:
        from agent.proxy import _hotpath
        built_abi = getattr(_hotpath, "ABI", 0)  # 0: built before the module said its ABI
        if built_abi != ABI:
            raise ImportError(f"{_hotpath.__file__} is stale: built with ABI {built_abi}, this source needs ABI {ABI}")
        missing = [entry for entry in ENTRY_POINTS if not hasattr(_hotpath, entry)]
        if missing:  # an ABI raised in one file and not the other, or a build from a half-edited source
            raise ImportError(f"{_hotpath.__file__} is stale: it lacks {', '.join(missing)}")
    except ImportError as exc:
        if wanted == "compiled":
            raise HotpathError(f"{ENV}=compiled but agent.proxy._hotpath does not import ({exc}): rebuild it "
                               f"with {build_command()} (needs gcc and python3-dev) or unset {ENV}") from exc
        if wanted == "python":
            return None, None, f"pure Python ({ENV}=python)"
        return None, None, (f"pure Python (agent.proxy._hotpath not built: {exc}; with gcc and python3-dev "
                            f"installed, {build_command()} builds it)")
    if wanted == "python":
        return _hotpath, None, f"pure Python ({ENV}=python)"
    return _hotpath, _hotpath, f"compiled (agent.proxy._hotpath, {_hotpath.__file__})"


built, compiled, _description = _load()  # built: for tests, which run both; compiled: what the data path uses


def describe() -> str:
    """One line: which implementation the data path uses, and why."""
    return _description


def name() -> str:
    return "compiled" if compiled is not None else "python"
