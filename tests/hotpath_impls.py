"""Both implementations of the tunnel's per-message work (agent.proxy.hotpath), for tests that must hold
for each: the pure-Python reference and the compiled module (agent/proxy/_hotpath.c).

``IMPLEMENTATIONS`` is what to parametrize with; ``use(name)`` switches the data path to one of them for
the duration of a ``with`` block (what ``TCPMESH_HOTPATH`` chooses at import); the fixture
``hotpath_impl`` does the same per test. The compiled one is skipped when it was not built, unless
``TCPMESH_HOTPATH=compiled`` says it must be there (then its absence fails at import already).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest

from agent.proxy import hotpath
from agent.proxy import mux as M

_BUILT = "compiled" in M.DECODERS
IMPLEMENTATIONS = ["python", pytest.param("compiled", marks=pytest.mark.skipif(
    not _BUILT, reason=f"the compiled path is not in use: {hotpath.describe()}"))]
COMPILED = None
if _BUILT:
    from agent.proxy import _hotpath as COMPILED  # noqa: N812


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    saved = hotpath.compiled, M.FrameDecoder
    hotpath.compiled = COMPILED if name == "compiled" else None
    M.FrameDecoder = M.DECODERS[name]
    try:
        yield
    finally:
        hotpath.compiled, M.FrameDecoder = saved


@pytest.fixture(params=IMPLEMENTATIONS)
def hotpath_impl(request) -> Iterator[str]:
    with use(request.param):
        yield request.param
