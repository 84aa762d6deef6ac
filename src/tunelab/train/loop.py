"""The one training loop, for every method: the method is seen only through its interface.

Per optimizer step: take the next window of micro-batches, count the window's target tokens, run forward and
backward on each micro-batch with its summed loss divided by that count, clip, check for NaN/inf, step the
optimizer and the schedule. Then log, evaluate and checkpoint when due, and stop at a step boundary when a
SIGTERM/SIGINT arrived.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.data import collate
from tunelab.errors import ResourceError
from tunelab.methods import precision
from tunelab.train import checkpoint as ckpt
from tunelab.train import dist_checkpoint
from tunelab.train import distributed as dist
from tunelab.train.batches import WindowSampler
from tunelab.train.evaluate import batch_count, evaluate, to_device
from tunelab.train.loss import batch_loss_sum, count_input_tokens, count_targets
from tunelab.train.metrics import MetricsLog
from tunelab.train.optim import trainable_parameters
from tunelab.train.progress import ProgressBar, Throughput
from tunelab.train.setup import Run
from tunelab.train.signals import StopFlag
from tunelab.train.state import TrainState, checkpoint_writers

CHECKPOINTS = "checkpoints"
NAN_AT_STEP_ENV = "TUNELAB_TEST_NAN_AT_STEP"  # test hook: make the loss of step N NaN


@dataclass
class WindowResult:
    """One optimizer step's forward/backward: summed loss (fp32), target count and non-pad input tokens."""

    loss_sum: torch.Tensor
    targets: int
    tokens: int

    @property
    def loss(self) -> float | None:
        return float(self.loss_sum) / self.targets if self.targets else None


@dataclass
class LoopOutcome:
    """How the loop ended: throughput, the last evaluation, and the stop signal with its checkpoint."""

    throughput: Throughput = field(default_factory=Throughput)
    last_eval: dict | None = None
    signal_name: str | None = None
    checkpoint: str | None = None


def autocast_for(run: Run):
    """bf16 autocast on CUDA when the run's dtype is bf16; nothing elsewhere (fp32 on CPU)."""
    if run.device.type == "cuda" and "bfloat16" in str(run.loaded.dtype):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def accumulate_window(model, batches: list[dict], task: str, *, autocast=contextlib.nullcontext,
                      poison: bool = False, fused: bool = False, liger: bool = False,
                      counts: tuple[int, int] | None = None, world_size: int = 1) -> WindowResult:
    """Forward and backward every micro-batch of one window, normalised by the window's target count.

    Each micro-batch's gradient is d(loss_sum / window_targets), so after the window the gradients equal
    those of the mean loss over all target tokens of the window (causal-lm) or all examples (classification),
    whatever the split into micro-batches. `poison` makes the loss NaN (a test hook); `fused` computes causal-lm
    losses without full logits (`fused_loss`; with `liger`, Liger-Kernel's kernel where installed); `counts`
    (targets, input tokens), counted on the host before the batches moved, spares a device sync per count.
    On `world_size` ranks, `counts` are the whole window's and `batches` this rank's share: the gradient
    reduction averages over ranks, so each rank divides by targets / world_size (`train/distributed.py`).
    """
    task_targets, tokens = counts if counts is not None else window_counts(batches, task)
    denom = max(task_targets, 1) / world_size
    total = torch.zeros((), dtype=torch.float32, device=batches[0]["input_ids"].device)
    for batch in batches:
        with autocast():
            loss_sum, _ = batch_loss_sum(model, batch, task, fused=fused, liger=liger)
        if poison:
            loss_sum = loss_sum * float("nan")
        (loss_sum / denom).backward()
        total += loss_sum.detach().float()
    return WindowResult(total, task_targets, tokens)


def window_counts(batches: list[dict], task: str) -> tuple[int, int]:
    """(target count, non-pad input tokens) of a window of collated micro-batches."""
    return sum(count_targets(b, task) for b in batches), sum(count_input_tokens(b) for b in batches)


def is_oom(error: BaseException) -> bool:
    """torch's OutOfMemoryError, or a RuntimeError saying "out of memory" (older backends)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


class Loop:
    """Runs optimizer steps from `state.step` to `run.total_steps` (see the module docstring)."""

    def __init__(self, run: Run, state: TrainState, metrics: MetricsLog, bar: ProgressBar, flag: StopFlag):
        self.run, self.state, self.metrics, self.bar, self.flag = run, state, metrics, bar, flag
        self.world = run.world
        self.agreed_stop = False  # under torchrun: some rank got a stop signal (agreed on at each step)
        self.cfg = run.cfg
        self.params = trainable_parameters(run.optimizer)
        self.sampler = WindowSampler(len(run.dataset.train), self.cfg.seed, self.cfg.batch_size,
                                     self.cfg.grad_accum, state.position)
        state.position = self.sampler.position  # one object: checkpoints see the sampler's position
        self.outcome = LoopOutcome()
        self.nan_at = int(os.environ.get(NAN_AT_STEP_ENV, "0") or 0)
        self._started = time.perf_counter()
        self._elapsed0 = state.elapsed
        self._saved_step: int | None = None

    def elapsed(self) -> float:
        """Training wall seconds, including those before a resume."""
        return self._elapsed0 + time.perf_counter() - self._started

    def run_all(self) -> LoopOutcome:
        """Step until the end or a stop signal; returns how it ended."""
        self.run.model.train()
        self.run.optimizer.zero_grad(set_to_none=True)
        while self.state.step < self.run.total_steps:
            self.step()
            if self.agreed_stop if self.world.enabled else self.flag.signum is not None:
                self.outcome.signal_name = self.flag.name or "SIGTERM"  # a rank the signal missed
                saved = self._saved_step == self.state.step  # save_every may have saved this very step
                self.outcome.checkpoint = str(self.checkpoint_root() / f"step-{self.state.step}" if saved
                                              else self.save())
                break
        return self.outcome

    def step(self) -> None:
        """One optimizer step, then logging, evaluation and checkpointing when due."""
        t0 = time.perf_counter()
        step = self.state.step + 1
        if self.world.enabled:
            dist.failure_hook(self.world, step)
        batches, counts = self.next_batches()
        result = self.forward_backward(batches, step, counts)
        grad_norm, lr = self.update(result, step)
        self.state.step = step
        self.outcome.throughput.add(result.tokens, time.perf_counter() - t0)
        if step % self.cfg.log_every == 0 or step == self.run.total_steps:
            self.log(step, result, grad_norm, lr)
        if (self.cfg.eval_every and step % self.cfg.eval_every == 0) or step == self.run.total_steps:
            self.evaluate(step)  # before any save at this step: metrics up to a checkpoint's step are final
        if self.cfg.save_every and step % self.cfg.save_every == 0:
            self.save()

    def next_batches(self) -> tuple[list[dict], tuple[int, int]]:
        """The next window's collated micro-batches on the run's device, and their counts (taken on the host)."""
        train, window = self.run.dataset.train, self.sampler.next_window()
        if self.world.enabled:
            return self.rank_batches(window)
        host = [collate([train[i] for i in mb], self.run.pad_id, self.cfg.task) for mb in window]
        return [to_device(b, self.run.device) for b in host], window_counts(host, self.cfg.task)

    def rank_batches(self, window: list[list[int]]) -> tuple[list[dict], tuple[int, int]]:
        """This rank's micro-batches of `window` (padding ones without targets), and the whole window's counts."""
        train, pad, task = self.run.dataset.train, self.run.pad_id, self.cfg.task
        counts = window_counts([collate([train[i] for mb in window for i in mb], pad, task)], task)
        host = [collate([train[i] for i in mb], pad, task) if mb else
                dist.without_targets(collate([train[window[0][0]]], pad, task))
                for mb in dist.rank_share(window, self.cfg.batch_size, self.world)]
        return [to_device(b, self.run.device) for b in host], counts

    def forward_backward(self, batches: list[dict], step: int, counts: tuple[int, int] | None = None) -> WindowResult:
        """`accumulate_window`, with out-of-memory turned into a `ResourceError` that says what to change."""
        try:
            with precision.cast_inputs(not self.cfg.adapter_autocast):
                return accumulate_window(self.world.forward_model or self.run.model, batches, self.cfg.task,
                                         autocast=lambda: autocast_for(self.run), poison=step == self.nan_at,
                                         fused=self.cfg.fused_loss, liger=self.cfg.liger_kernels, counts=counts,
                                         world_size=self.world.size)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            self.run.optimizer.zero_grad(set_to_none=True)
            if self.run.device.type == "cuda":
                torch.cuda.empty_cache()
            seq = max(int(b["input_ids"].shape[1]) for b in batches)
            raise ResourceError(
                f"out of memory at step {step} with batch_size={self.cfg.batch_size} and sequence length {seq} "
                f"(seq_len={self.cfg.seq_len}); try a smaller --batch-size or --seq-len, "
                f"--gradient-checkpointing (gradient_checkpointing: true), or a PEFT method such as --method lora"
            ) from None

    def update(self, result: WindowResult, step: int) -> tuple[float, float]:
        """Clip, apply the NaN policy, step optimizer and schedule; returns (grad_norm, lr used)."""
        opt, sched = self.run.optimizer, self.run.scheduler
        lr = sched.get_last_lr()[0]
        max_norm = self.cfg.max_grad_norm or math.inf  # inf: measure the norm without clipping
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        loss_value, grad_norm = self.step_values(result, norm)
        if math.isfinite(loss_value) and math.isfinite(grad_norm):
            opt.step()
        elif self.cfg.nan_policy == "skip":
            self.state.nan_skipped += 1
            self.bar.say(f"step {step}: loss or gradient is not finite; update skipped (nan_policy=skip)")
        else:
            last = ckpt.find_latest(self.checkpoint_root())[0]
            raise ResourceError(
                f"step {step}: training loss is {loss_value} (gradient norm {grad_norm}); stopped "
                f"(nan_policy=stop); last good checkpoint: {last or 'none'}")
        opt.zero_grad(set_to_none=True)
        sched.step()
        return grad_norm, lr

    def step_values(self, result: WindowResult, norm: torch.Tensor) -> tuple[float, float]:
        """(loss sum, gradient norm) of the step, in one host sync; under torchrun the loss sum is the whole
        window's (put back in `result`), and the ranks agree here whether a stop signal arrived."""
        if not self.world.enabled:
            return tuple(torch.stack([result.loss_sum.float(), norm.float().to(result.loss_sum.device)]).tolist())
        loss_value, stops = dist.sum_across(self.world, [result.loss_sum.detach(), float(self.flag.signum is not None)])
        self.agreed_stop = stops > 0
        result.loss_sum = torch.tensor(loss_value)
        return loss_value, float(dist.full_value(norm))

    def log(self, step: int, result: WindowResult, grad_norm: float, lr: float) -> None:
        record = {"step": step, "loss": result.loss, "lr": lr, "tokens": result.tokens,
                  "target_tokens": result.targets, "grad_norm": grad_norm, "elapsed": round(self.elapsed(), 4)}
        self.metrics.write(record)
        self.bar.update(step, result.loss, self.outcome.throughput.recent())

    def evaluate(self, step: int) -> dict | None:
        """Evaluate on the validation split (if any) and log `{"step", "val_loss", "val_<metric>"}`."""
        val = self.run.dataset.val
        if not val:
            return None
        with self.bar.validating(batch_count(len(val), self.cfg.batch_size, self.cfg.eval_batches), step) as tick:
            result = evaluate(self.run.model, val, self.cfg.task, self.run.pad_id, self.cfg.batch_size,
                              max_batches=self.cfg.eval_batches, on_batch=tick)
        self.metrics.write({"step": step, **{f"val_{k}": v for k, v in result.items()}})
        self.outcome.last_eval = result
        return result

    def checkpoint_root(self) -> Path:
        return Path(self.cfg.output) / CHECKPOINTS

    def save(self) -> Path:
        """Write checkpoint `step-N` atomically, then apply retention; returns its path."""
        self.state.elapsed = self.elapsed()
        if self.world.enabled:
            path = dist_checkpoint.save(self.world, self.checkpoint_root(), self.run.trainables, self.run.optimizer,
                                        self.run.scheduler, self.state, self.cfg)
            self._saved_step = self.state.step
            return path
        writers = checkpoint_writers(self.run.trainables, self.run.optimizer, self.run.scheduler, self.state,
                                     self.cfg)
        path = ckpt.save_checkpoint(self.checkpoint_root(), self.state.step, writers)
        self._saved_step = self.state.step
        ckpt.apply_retention(self.checkpoint_root(), self.cfg.keep_last)
        return path
