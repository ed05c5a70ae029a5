"""Both implementations of the tunnel's per-message work (agent.proxy.hotpath), for tests that must hold
for each: the pure-Python reference and the compiled module (agent/proxy/_hotpath.c).

``IMPLEMENTATIONS`` is what to parametrize with (always both: ``TCPMESH_HOTPATH`` chooses what the
product runs, not what the tests cover); ``use(name)`` switches the data path to one of them for the
duration of a ``with`` block; ``decoder_class(name)`` is that implementation's frame decoder; the
fixture ``hotpath_impl`` switches per test. Without a build of the compiled module its cases go
through ``skip_or_fail`` with the fix (under ``.ci/run`` that is a failure: CI must build it).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest

from agent.proxy import hotpath
from agent.proxy import mux as M
from bench.tls_pair import use_hotpath
from tests.conftest import skip_or_fail

IMPLEMENTATIONS = ["python", "compiled"]


def require_compiled() -> None:
    if "compiled" not in M.DECODERS:
        skip_or_fail(f"the compiled hot path is not built ({hotpath.describe()}): run `make setup` "
                     f"(needs gcc and python3-dev)")


def decoder_class(name: str) -> type:
    if name == "compiled":
        require_compiled()
    return M.DECODERS[name]


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    if name == "compiled":
        require_compiled()
    with use_hotpath(name):
        yield


@pytest.fixture(params=IMPLEMENTATIONS)
def hotpath_impl(request) -> Iterator[str]:
    with use(request.param):
        yield request.param
