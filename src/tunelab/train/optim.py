"""The optimizer (AdamW over the method's parameter groups) and the learning-rate schedules.

`--master-weights` (mixed precision with fp32 master weights): a parameter that trains in a 16-bit dtype (full
fine-tuning of a bf16 model; adapters and BitFit's deltas are fp32 already) loses every update smaller than half
a step of its dtype at its magnitude (bf16 keeps 8 significant bits: about 6e-5 for a weight of 0.02, so an lr
of 1e-5 rounds away).
`MasterWeightAdamW` keeps an fp32 copy of each such parameter in its state, applies AdamW to the copy, and
writes the rounded result back, so the model still computes in bf16 and small updates accumulate. Under FSDP2
the trained parameters are held in fp32 instead and the mixed-precision policy casts them for compute
(`train/distributed.py`).
"""

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


LOW_PRECISION = (torch.bfloat16, torch.float16)


def build_optimizer(groups: list[dict], cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter, 2019) over `groups`; the fused kernel on CUDA, the default loop elsewhere.
    With `cfg.master_weights` and a trained parameter in a 16-bit dtype: `MasterWeightAdamW`."""
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the method returned no trainable parameters")
    fused = {"fused": True} if device.type == "cuda" else {}
    low = any(p.dtype in LOW_PRECISION for g in groups for p in g["params"])
    kind = MasterWeightAdamW if cfg.master_weights and low else torch.optim.AdamW
    return kind(groups, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, **fused)


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW whose 16-bit parameters are updated through fp32 master copies (`state[p]["master"]`).

    The parameter groups hold the model's own parameters, so gradient clipping, `state_dict` and DCP's
    optimizer state dicts name them as for plain AdamW; the masters and the moments (fp32) ride in the state
    and are saved and restored with it. fp32 parameters (adapters) step as in plain AdamW.
    """

    CHUNK_BYTES = 1 << 30  # fp32 gradient copies alive at once: the step runs over chunks of parameters

    @staticmethod
    def _swapped(state: dict, params: list[nn.Parameter]) -> list:
        """Point each 16-bit parameter of `params` at its fp32 master (a copy of it on the first step) and its
        gradient at an fp32 copy; returns what to put back."""
        swaps = []
        for p in params:
            if p.dtype not in LOW_PRECISION:
                continue
            master = state[p].get("master")
            swaps.append((p, p.data, p.grad))
            p.data = p.detach().float() if master is None else master
            if p.grad is not None:
                p.grad = p.grad.float()
        return swaps

    @staticmethod
    def _restore(state: dict, swaps: list) -> None:
        for p, low, grad in swaps:
            master = p.data
            state[p]["master"] = master  # after AdamW made its state (it initialises an empty one only)
            p.data = low
            p.grad = grad
            low.copy_(master)  # rounded to the parameter's dtype

    def _chunks(self, params: list[nn.Parameter]):
        chunk, size = [], 0
        for p in params:
            chunk.append(p)
            size += 4 * p.numel()
            if size >= self.CHUNK_BYTES:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        try:
            for group in groups:
                for chunk in self._chunks(group["params"]):
                    self.param_groups = [{**group, "params": chunk}]  # AdamW steps this chunk alone
                    swaps = self._swapped(self.state, chunk)
                    try:
                        super().step()
                    finally:
                        self._restore(self.state, swaps)
        finally:
            self.param_groups = groups
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As AdamW's, but the fp32 state (masters, moments) stays fp32: the base class casts a floating state
        value to its parameter's dtype, so the 16-bit parameters are fp32 while it loads."""
        swaps = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype in LOW_PRECISION:
                    swaps.append((p, p.data))
                    p.data = p.data.float()
        try:
            super().load_state_dict(state_dict)
        finally:
            for p, low in swaps:
                p.data = low


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
