"""The causal-LM loss without full logits: the output head's input is captured, and the linear head and the
cross-entropy run together, a chunk of tokens at a time.

The plain path materialises (batch, seq, vocab) logits, an fp32 copy of them, their log-probabilities and, in
backward, gradients of each: at a 128k vocabulary that is most of a step's memory. Here, while the training
forward runs, the head's forward is replaced by one that keeps its input (batch, seq, hidden) and returns an
empty (batch, seq, 0) tensor. `LinearCrossEntropySum` then computes, chunk by chunk, the logits (in the matmul
dtype the plain path would use: bf16 under autocast), their fp32 log-sum-exp, the summed loss and, in the same
pass, the gradients for the hidden states and the head's weight (softmax - one-hot): each chunk's logits are
freed before the next, and backward only scales the stored gradients by the incoming scalar. The loss is the
same sum as `causal_lm_loss_sum` (train/loss.py), so gradient accumulation stays exact.

On CUDA with liger-kernel installed (and `liger_kernels` on), Liger-Kernel's fused linear cross-entropy
(reduction "sum") does the same in one Triton kernel a chunk, in place over the logits; the chunked PyTorch
version above is the fallback everywhere else.

It applies to every method, since only the head's input is read; models whose logits are not a plain
`head(hidden)` (soft-capped or scaled logits), heads that carry hooks or adapters, and classification keep the
plain path.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from tunelab.train.loss import IGNORE_INDEX

log = logging.getLogger("tunelab.train")
_LIGER_BROKEN: list[str] = []  # set when liger-kernel's loss raised once: the chunked loss is used from then on

CHUNK_ELEMENTS = 1 << 26  # fp32 logits per chunk: 256 MiB (523 tokens at a 128,256 vocabulary)
# config keys under which a model changes its logits after the head: those keep the plain path
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def fusable_head(model: nn.Module) -> nn.Linear | None:
    """The model's output head when the fused loss can replace it: a plain nn.Linear whose output is the logits."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks or hasattr(head, "lora_A"):
        return None
    if "forward" in vars(head) or (type(head.weight) is not nn.Parameter and not _fsdp_sharded(head.weight)):
        return None  # a forward of its own (an NF4 head) or a weight of another tensor type computes its own way
    config = getattr(model, "config", None)
    if any(getattr(config, key, None) not in (None, 0, 1, 1.0) for key in LOGIT_TRANSFORMS):
        return None
    return head


def _fsdp_sharded(weight: torch.Tensor) -> bool:
    """An FSDP2-sharded parameter (a DTensor): in the model's forward FSDP2 gathers it, and the root group (the
    head's) stays gathered until backward, so the fused loss reads the whole weight after the forward."""
    return type(weight).__name__ == "DTensor"


@contextlib.contextmanager
def head_input(head: nn.Linear):
    """While active, `head(x)` records x (batch, seq, hidden) in the yielded list and returns (batch, seq, 0)."""
    seen: list[torch.Tensor] = []

    def capture(x: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return x.new_empty(*x.shape[:-1], 0)

    head.forward = capture  # an instance attribute: shadows the class's forward for this module only
    try:
        yield seen
    finally:
        del head.forward


def fused_causal_lm_loss_sum(model: nn.Module, head: nn.Linear, inputs: dict[str, torch.Tensor],
                             labels: torch.Tensor, liger: bool = False) -> tuple[torch.Tensor, int]:
    """Forward `model` on `inputs` (its keyword inputs: `data.forward_inputs`) with the head captured; the summed
    shifted cross-entropy and the target count.

    Equal to `causal_lm_loss_sum(model(...).logits, labels)` up to rounding. Virtual tokens a method prepends
    (prompt tuning) are dropped as its own hook drops their logits: the last `seq` positions are the user's.
    """
    with head_input(head) as seen:
        model(**inputs)
    if len(seen) != 1:
        raise RuntimeError(f"the output head ran {len(seen)} times in one forward, expected once; "
                           f"set fused_loss: false for this model")
    hidden = seen[0][:, -labels.shape[1]:]  # (batch, seq, hidden)
    shift_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (batch * (seq-1), hidden)
    shift_labels = labels[:, 1:].to(hidden.device).reshape(-1)  # (batch * (seq-1),)
    loss_sum = linear_cross_entropy_sum(shift_hidden, head.weight, head.bias, shift_labels, liger=liger)
    return loss_sum, int((labels[:, 1:] != IGNORE_INDEX).sum())


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             labels: torch.Tensor, chunk: int | None = None, liger: bool = False) -> torch.Tensor:
    """sum over rows with labels != -100 of cross_entropy(hidden @ weight.T + bias, labels), a 0-dim fp32 tensor.

    hidden (n, h), weight (vocab, h), bias (vocab,) or None, labels (n,). The matmuls run in the autocast dtype
    when autocast is on (as `F.linear` would), else in the weight's dtype; softmax and the sum in fp32. With
    `liger` on CUDA, Liger-Kernel's kernel when it is installed.
    """
    fused = liger_kernel_loss() if liger and hidden.is_cuda else None
    if fused is not None:
        try:
            return fused(hidden.contiguous(), weight, labels, bias, ignore_index=IGNORE_INDEX, reduction="sum").float()
        except TypeError as e:  # an installed liger-kernel whose function takes other arguments
            _LIGER_BROKEN.append(str(e))
            log.warning("liger-kernel's fused linear cross-entropy failed (%s); using tunelab's chunked loss", e)
    rows = chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else weight.dtype
    return LinearCrossEntropySum.apply(hidden, weight, bias, labels, rows, dtype)


def liger_kernel_loss():
    """Liger-Kernel's `liger_fused_linear_cross_entropy`, or None when liger-kernel is not installed (or failed)."""
    if _LIGER_BROKEN:
        return None
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


class LinearCrossEntropySum(torch.autograd.Function):
    """Chunked linear + cross-entropy (summed); gradients are computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows, dtype):
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden, dtype=dtype) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            for start in range(0, hidden.shape[0], rows):
                h = hidden[start:start + rows].to(dtype)  # (c, h)
                y = labels[start:start + rows]  # (c,)
                logits = (h @ w.T if b is None else torch.addmm(b, h, w.T)).float()  # (c, vocab)
                valid = y != IGNORE_INDEX
                target = y.clamp(min=0).unsqueeze(1)
                lse = torch.logsumexp(logits, dim=1)  # (c,)
                total += ((lse - logits.gather(1, target).squeeze(1)) * valid).sum()
                if not (need_h or need_w or need_b):
                    continue
                grad = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
                grad.scatter_add_(1, target, torch.full_like(lse, -1.0).unsqueeze(1))  # - one-hot
                keep = valid.unsqueeze(1).to(dtype)  # (c, 1): ignored rows get no gradient
                if need_b:
                    grad_b += (grad * keep).sum(0)
                grad = grad.to(dtype)
                if need_h:
                    grad_h[start:start + rows] = (grad @ w) * keep
                if need_w:
                    grad_w += (grad.T @ (h * keep)).float()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads = []
        for g, dt in zip(ctx.saved_tensors, ctx.dtypes):
            grads.append(None if g is None else (g * grad_out).to(dt))
        return (*grads, None, None, None)
