"""The dtype adapter computations read their input in.

Adapter weights are fp32 whatever the base dtype. Under autocast (bf16 training on a GPU) the adapter's matmuls
run in the autocast dtype anyway: autocast casts the small fp32 weights (once per forward, cached) and leaves the
bf16 activations as they are. Casting each input to fp32 first (the plain rule, kept for every run without
autocast, so CPU numerics never change) copies a (batch, seq, in) activation per adapter, which backward then
keeps alive, and autocast casts it straight back to bf16 before the matmul: time and memory for the same result.
`adapter_input` skips that round trip under autocast unless `cast_inputs(True)` restores it.
"""

from __future__ import annotations

import contextlib

import torch

_CAST = [False]  # True: cast every adapter input to the adapter's dtype even under autocast (the old path)


def in_autocast(x: torch.Tensor) -> bool:
    """Whether adapter compute on `x` runs in the autocast dtype (autocast on for its device, and not switched off)."""
    return not _CAST[0] and torch.is_autocast_enabled(x.device.type)


def adapter_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` as an adapter's matmuls should read it: unchanged under autocast, else cast to `dtype` (the weights')."""
    return x if x.dtype == dtype or in_autocast(x) else x.to(dtype)


@contextlib.contextmanager
def cast_inputs(enabled: bool):
    """While active, cast adapter inputs to the adapter dtype even under autocast (`adapter_autocast: false`)."""
    before = _CAST[0]
    _CAST[0] = enabled
    try:
        yield
    finally:
        _CAST[0] = before
