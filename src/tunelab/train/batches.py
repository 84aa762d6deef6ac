"""Which examples each optimizer step sees: deterministic windows of micro-batches, and the data position.

Each epoch has its own deterministic order (`tunelab.data.epoch_order(n, seed, epoch)`). An optimizer step
takes the next `batch_size * grad_accum` examples of that order as one window, split into micro-batches of
`batch_size`; windows never cross an epoch boundary, so the last window of an epoch may be smaller. The
position (epoch, index into the order) is all a resume needs to see the same samples as the uninterrupted run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from tunelab.config import RunConfig
from tunelab.data import epoch_order
from tunelab.errors import ArtifactError


@dataclass
class DataPosition:
    """Where the next window starts.

    `accum` counts micro-batches of the next window already applied to the gradients. Checkpoints are taken
    only at optimizer-step boundaries, so it is 0 in every checkpoint; loading checks that.
    """

    epoch: int = 0
    index: int = 0
    accum: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, source: str) -> "DataPosition":
        pos = cls(int(data["epoch"]), int(data["index"]), int(data.get("accum", 0)))
        if pos.accum != 0:
            raise ArtifactError(f"{source}: data position is mid-window (accum={pos.accum}); expected 0")
        return pos


def steps_per_epoch(n_train: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch: ceil(n_train / (batch_size * grad_accum))."""
    return math.ceil(n_train / (batch_size * grad_accum))


def total_steps(cfg: RunConfig, n_train: int) -> int:
    """`cfg.max_steps`, else ceil(epochs * steps per epoch)."""
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * steps_per_epoch(n_train, cfg.batch_size, cfg.grad_accum)))


class WindowSampler:
    """Yields the micro-batches (lists of example indices) of successive optimizer steps."""

    def __init__(self, n: int, seed: int, batch_size: int, grad_accum: int, position: DataPosition | None = None):
        self.n, self.seed, self.batch_size, self.grad_accum = n, seed, batch_size, grad_accum
        self.position = position or DataPosition()
        self._order: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        """The sample order of `epoch` (cached for the current epoch)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, list(epoch_order(self.n, self.seed, epoch)))
        return self._order[1]

    def next_window(self) -> list[list[int]]:
        """The next window's micro-batches; advances the position."""
        pos = self.position
        if pos.index >= self.n:
            pos.epoch, pos.index = pos.epoch + 1, 0
        window = self.order(pos.epoch)[pos.index:pos.index + self.batch_size * self.grad_accum]
        pos.index += len(window)
        return [window[i:i + self.batch_size] for i in range(0, len(window), self.batch_size)]
