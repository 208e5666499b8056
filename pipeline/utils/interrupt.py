"""SIGTERM and SIGINT as one exception, so that a stage or a trial stopped by `kill`, a scheduler or Ctrl-C
ends what it has open (MLflow runs KILLED with a reason) instead of dying with them left RUNNING."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived: what was running ends KILLED and the command exits 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM and SIGINT raise `Interrupted` inside this block. Only the main thread may install handlers
    (Ray Tune runs trainables in threads); signals the process ignores stay ignored; the previous handlers
    come back afterwards."""
    main = threading.current_thread() is threading.main_thread()
    signals = [s for s in (signal.SIGTERM, signal.SIGINT) if main and signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, _raise_interrupted) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
