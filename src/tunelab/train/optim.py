"""The optimizer (AdamW over the method's parameter groups) and the learning-rate schedules."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from tunelab.config import RunConfig
from tunelab.methods.base import Method

FALLBACK_LR = 2e-4


def resolve_lr(cfg: RunConfig, method: Method) -> float:
    """The peak learning rate: `cfg.lr`, else the method's `default_lr` class attribute."""
    return cfg.lr if cfg.lr is not None else float(getattr(method, "default_lr", FALLBACK_LR))


def build_optimizer(groups: list[dict], cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter, 2019) over `groups`; the fused kernel on CUDA, the default loop elsewhere."""
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the method returned no trainable parameters")
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, **fused)


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """The multiplier of the peak learning rate for optimizer step `step` (0-based).

    Linear warm-up over `warmup` steps ((step+1)/warmup, so the first update already moves), then cosine or
    linear decay that reaches 0 at step `total`, or a constant 1.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying `lr_factor` with the run's schedule, warm-up and total steps."""
    fn = functools.partial(lr_factor, warmup=cfg.warmup_steps, total=total, schedule=cfg.schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def trainable_parameters(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Every parameter the optimizer updates, in group order (what gradient clipping sees)."""
    return [p for g in optimizer.param_groups for p in g["params"]]
