"""Frozen base weights stored as 4-bit NormalFloat with double quantisation (QLoRA's NF4), through torchao.

`quantize(module)` replaces the `weight` Parameter of a linear-like module by a frozen Parameter holding torchao's
`NF4Tensor`, under the same name and with the same shape (nn.Linear (out, in), GPT-2's Conv1D (in, out)), and
gives the module a forward that multiplies with the weight dequantised block by block: torchao's `linear_nf4` for
nn.Linear, the same pattern transposed for Conv1D. Neither keeps a full-precision copy of the weight between
forward and backward (backward dequantises again). `dequantize(module)` puts back a plain Parameter holding the
dequantised values in the original dtype. torchao's NF4 runs on CPU and on GPU.

Blocks run along the stored weight's last dimension (the input dim of nn.Linear): the block size is the largest of
64, 32, 16 that divides it, and the scalers (one per block) are quantised again to int8 in blocks of the largest of
256, 128, ..., 1 that divides their count (torchao requires both to divide exactly). A weight whose last dim none
of the block sizes divides stays as it is.

The module keeps a record of its quantisation (`NF4_ATTR`: bytes before and after, dtype, block sizes), which is
also how the rest of tunelab tells a quantised module apart without importing torchao.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
from dataclasses import dataclass

import torch
from torch import nn

NF4_ATTR = "_tunelab_nf4"
BLOCK_SIZES = (64, 32, 16)  # QLoRA uses 64
SCALER_BLOCK_SIZES = (256, 128, 64, 32, 16, 8, 4, 2, 1)  # QLoRA uses 256


@dataclass(frozen=True)
class NF4Record:
    """What quantising one module did: its weight's bytes before and after, the original dtype, the block sizes."""

    bytes_before: int
    bytes_after: int
    dtype: torch.dtype
    block_size: int
    scaler_block_size: int


@functools.cache
def _torchao():
    """torchao's `(to_nf4, linear_nf4)`, imported on first use (newer and older module paths): torchao takes
    seconds to import and only qlora needs it, so the one function-level import in methods/ stays here.

    torchao logs about optional GPU kernels it cannot load on import; those lines are silenced.
    """
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        try:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4
        except ImportError:  # torchao before 0.14
            from torchao.dtypes.nf4tensor import linear_nf4, to_nf4
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return to_nf4, linear_nf4


def is_quantized(module: nn.Module) -> bool:
    """Whether `quantize` stored this module's weight as NF4 (and it has not been dequantised since)."""
    return getattr(module, NF4_ATTR, None) is not None


def block_sizes(weight: torch.Tensor) -> tuple[int, int] | None:
    """(block_size, scaler_block_size) for `weight`, or None when no NF4 block size divides its last dim."""
    block = next((b for b in BLOCK_SIZES if weight.shape[-1] % b == 0), None)
    if block is None:
        return None
    n_blocks = weight.numel() // block
    return block, next(s for s in SCALER_BLOCK_SIZES if n_blocks % s == 0)


def unquantizable_reason(module: nn.Module) -> str:
    """Why `quantize` leaves this module as it is (for the memory report)."""
    return (f"last weight dim {module.weight.shape[-1]} is not divisible by any NF4 block size "
            f"{'/'.join(map(str, BLOCK_SIZES))}")


def inner_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: the sum of the inner tensors of a wrapper subclass such as NF4Tensor."""
    if hasattr(type(t), "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(getattr(t, n).nbytes for n in names)
    return t.nbytes


@torch.no_grad()
def quantize(module: nn.Module) -> NF4Record | None:
    """Store `module.weight` as frozen NF4 and route the forward through it; None if it cannot be quantised.

    The Parameter keeps its name and shape, so the module tree and the base parameter names stay as they were.
    """
    if is_quantized(module):
        return getattr(module, NF4_ATTR)
    sizes = block_sizes(module.weight)
    if sizes is None:
        return None
    to_nf4, _ = _torchao()
    weight = module.weight.detach().contiguous()
    nf4 = to_nf4(weight, block_size=sizes[0], scaler_block_size=sizes[1])
    record = NF4Record(weight.nbytes, inner_bytes(nf4), weight.dtype, *sizes)
    module.weight = nn.Parameter(nf4, requires_grad=False)
    setattr(module, NF4_ATTR, record)
    module.forward = types.MethodType(_forward, module)  # instance attribute: the class's forward is untouched
    return record


@torch.no_grad()
def dequantize(module: nn.Module) -> None:
    """Give `module` back a plain weight Parameter (the NF4-dequantised values, original dtype) and its forward."""
    record = getattr(module, NF4_ATTR, None)
    if record is None:
        return
    values = module.weight.get_original_weight().to(record.dtype)
    module.weight = nn.Parameter(values, requires_grad=False)
    delattr(module, NF4_ATTR)
    with contextlib.suppress(AttributeError):
        del module.forward  # the class's forward again


def _forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x (..., in) -> (..., out) with the NF4 weight, plus the bias."""
    _, linear_nf4 = _torchao()
    if isinstance(module, nn.Linear):
        out = linear_nf4(x, module.weight)
    else:  # Conv1D: weight (in, out)
        out = _MatmulNF4.apply(x, module.weight)
    return out if module.bias is None else out + module.bias.to(out.dtype)


class _MatmulNF4(torch.autograd.Function):
    """x @ W for an NF4 weight stored (in, out) (Conv1D); W is dequantised in forward and again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)  # the NF4 tensor itself, not a dequantised copy
        return x @ weight.to(x.dtype)  # (..., in) @ (in, out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype).T, None  # the frozen weight gets no gradient
