"""Interruptions of a command: SIGINT exits 130 and SIGTERM 143, with one line saying what was left where.

While a command runs, `raising_signals` turns SIGINT and SIGTERM into `Interrupted`, a `BaseException` that the
CLI library does not swallow (it maps its own `KeyboardInterrupt` handling to a return value the caller could
lose), so every `with` block and `finally` on the way out removes its temp files. A command says beforehand what
an interruption would leave (`leaves`); the CLI prints that line. Training installs its own handlers inside
the loop (a checkpoint at the next step boundary), and restores these afterwards.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM)
_leaves = "nothing was written"


class Interrupted(BaseException):
    """A stop signal arrived while a command ran; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def leaves(what: str) -> None:
    """Record what an interruption from here on leaves behind (shown in the one-line message)."""
    global _leaves
    _leaves = what


def message(e: Interrupted) -> str:
    """The one line printed for an interruption."""
    return f"interrupted by {e.name}; {_leaves}"


def _raise(signum, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def raising_signals() -> Iterator[None]:
    """Within the block (main thread only), SIGINT and SIGTERM raise `Interrupted`; old handlers restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in HANDLED}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


PARENT_PID_ENV = "TUNELAB_PARENT_PID"
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux), and exit now if it already has.

    For worker processes: a parent killed with -9 cannot kill its children itself, and a re-parented worker
    would otherwise train on to the end, writing into a run dir nobody reads. The parent's pid comes in
    `TUNELAB_PARENT_PID`, so a parent that died before the request took effect is noticed too.
    """
    import ctypes
    import os
    import sys

    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    expected = os.environ.get(PARENT_PID_ENV)
    if expected and expected.isdigit() and os.getppid() != int(expected):
        os._exit(1)
