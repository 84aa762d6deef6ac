"""Progress on stderr (rich): step, loss, tokens/s and ETA; and a throughput meter that skips warm-up."""

from __future__ import annotations

import logging
import sys

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


class ProgressBar:
    """A rich progress bar on stderr; `enabled=False` makes every call a no-op."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled = enabled
        self.console = Console(file=sys.stderr)
        self._progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                  TextColumn("{task.fields[info]}"), console=self.console, disable=not enabled)
        self._task = self._progress.add_task("train", total=total, completed=start, info="")

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
