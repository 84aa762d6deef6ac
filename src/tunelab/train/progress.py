"""Progress on stderr (rich): step, loss, tokens/s and ETA; and a throughput meter that skips warm-up."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger("tunelab.train")

WARMUP_STEPS = 2  # steps of each process left out of tokens/s (allocator warm-up, first-call overheads)


class Throughput:
    """Non-pad input tokens per second over this process's steps, leaving out the first `WARMUP_STEPS`.

    With fewer steps than that, every step counts (a rate is still reported).
    """

    def __init__(self) -> None:
        self.steps: list[tuple[int, float]] = []  # (tokens, seconds) per step

    def add(self, tokens: int, seconds: float) -> None:
        self.steps.append((tokens, seconds))

    def rate(self) -> float | None:
        counted = self.steps[WARMUP_STEPS:] or self.steps
        seconds = sum(s for _, s in counted)
        return sum(t for t, _ in counted) / seconds if seconds > 0 else None

    def recent(self, n: int = 10) -> float | None:
        window = self.steps[-n:]
        seconds = sum(s for _, s in window)
        return sum(t for t, _ in window) / seconds if seconds > 0 else None


def _bars(console: Console, enabled: bool) -> Progress:
    """rich bars on `console`: label, bar, done/total, time left, and a free-text `info` field."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), console=console, disable=not enabled)


@contextlib.contextmanager
def batch_progress(label: str, total: int, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """A bar of `total` batches on stderr for the block; yields the call that marks one batch done."""
    bars = _bars(Console(file=sys.stderr), enabled)
    with bars:
        task = bars.add_task(label, total=total, info="")
        yield lambda: bars.advance(task)


class ProgressBar:
    """A rich progress bar on stderr; `enabled=False` makes every call a no-op."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled = enabled
        self.console = Console(file=sys.stderr)
        self._progress = _bars(self.console, enabled)
        self._task = self._progress.add_task("train", total=total, completed=start, info="")

    @contextlib.contextmanager
    def validating(self, total: int, step: int) -> Iterator[Callable[[], None]]:
        """A second bar, below the training bar, for the `total` validation batches at `step`; gone after."""
        task = self._progress.add_task("validate", total=total, info=f"at step {step}")
        try:
            yield lambda: self._progress.advance(task)
        finally:
            self._progress.remove_task(task)

    def __enter__(self) -> "ProgressBar":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def update(self, step: int, loss: float | None, tokens_per_second: float | None) -> None:
        info = f"loss {loss:.4f}" if loss is not None else "loss -"
        if tokens_per_second:
            info += f"  {tokens_per_second:,.0f} tok/s"
        self._progress.update(self._task, completed=step, info=info)

    def say(self, message: str) -> None:
        """A line on stderr (when enabled) and in the log."""
        log.info(message)
        if self.enabled:
            self.console.print(message, markup=False, highlight=False)
