"""SIGTERM / SIGINT during training: note the signal, and let the loop checkpoint at the next step boundary.

Preemption (SIGTERM) ends the run cleanly: `train` saves a checkpoint and returns a summary whose status is
"interrupted", so the CLI exits 0. Ctrl-C (SIGINT) saves the same checkpoint and raises `TrainingInterrupted`
(exit code 130). A second signal while the first is pending restores the default handler's behaviour.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from tunelab.errors import TunelabError

HANDLED = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(TunelabError):
    """The run was stopped by SIGINT after saving a checkpoint; `--resume` continues it."""

    exit_code = 130

    def __init__(self, message: str, *, step: int, checkpoint: str | None, signal_name: str):
        super().__init__(message)
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


class StopFlag:
    """Which stop signal arrived, if any (set by the handlers, read at each step boundary).

    `repeat_kills`: a second signal stops the process at once. Off under torchrun, whose agent passes on a
    SIGTERM that the ranks may already have received from the job's scheduler: the checkpoint must finish.
    """

    def __init__(self, repeat_kills: bool = True) -> None:
        self.signum: int | None = None
        self.repeat_kills = repeat_kills

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and not self.repeat_kills:
            return
        if self.signum is not None:  # second signal: stop now, as the default handler would
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signum = signum


@contextlib.contextmanager
def stop_signals(repeat_kills: bool = True) -> Iterator[StopFlag]:
    """Install SIGTERM/SIGINT handlers for the block (main thread only) and restore the old ones after."""
    flag = StopFlag(repeat_kills)
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, flag._handle) for s in HANDLED}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
