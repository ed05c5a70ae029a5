"""One interrupt, then a teardown that runs to its end: for a command that owns a lab in-process (`tcpmesh demo`).

SIGTERM and SIGHUP would end such a process at once, leaving its lab (namespaces, cgroups, pins, agents) to the
next `lab up`'s reap; SIGINT inherited ignored (a background job of a non-interactive shell) would not end it at
all. Inside ``interrupt_tears_down()`` each of the three raises KeyboardInterrupt once, so the command's
``finally`` (``lab_down``) runs; signals after it are ignored while it does, since the teardown is bounded
(agents get SIGTERM, then SIGKILL after ``agents.DEFAULT_STOP_TIMEOUT``) and a second interrupt would cut it
half way. SIGKILL still ends everything (the lab is then reaped). Only the process that entered it: a child
forked from it (pyroute2 forks one to make a netns) gets the default action, never the teardown.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def interrupt_tears_down() -> Iterator[None]:
    owner = os.getpid()
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}

    def interrupt(signum: int, frame: object) -> None:
        if os.getpid() != owner:   # a forked child: what it would have had without us
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        for other in SIGNALS:      # one interrupt: the teardown now runs to its end
            signal.signal(other, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    for signum in SIGNALS:
        signal.signal(signum, interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
