"""Activation checkpointing for training: which blocks recompute, and where their saved inputs wait.

`gradient_checkpointing` recomputes each transformer block in the backward pass, so a block keeps only its input
(batch, seq, hidden) between the forward and the backward. At long context those inputs are what is left: an 8B
Llama at 262,144 tokens keeps 32 x 2 GiB of them. Two switches shape that:

- `checkpoint_every: n` recomputes every n-th block only (selective checkpointing). The others keep their full
  activations and are not recomputed: faster, more memory.
- `offload_activations` parks each checkpointed block's input in pinned host memory during the forward pass
  and brings it back when the backward pass recomputes the block. The copies are asynchronous, on the
  compute stream, so they are ordered with the kernels that produce and consume them.

Both use the model's own checkpointing hook (HF's `GradientCheckpointingLayer` calls its
`_gradient_checkpointing_func`) with torch's non-reentrant `checkpoint`, which restores the RNG and autocast
state for the recomputation.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)


def enable_gradient_checkpointing(model: nn.Module, every: int = 1, offload: bool = False) -> int:
    """Recompute every `every`-th block in backward (non-reentrant), optionally parking inputs on the host.

    Frozen bases get inputs that require grad, so the recomputed blocks have a graph to differentiate. Returns
    the number of blocks that recompute.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not all(p.requires_grad for p in model.parameters()):
        model.enable_input_require_grads()
    blocks = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) and _is_block(m)]
    func = functools.partial(offloaded_checkpoint, use_reentrant=False) if offload else None
    for index, block in enumerate(blocks):
        block.gradient_checkpointing = index % every == 0
        if func is not None:
            block._gradient_checkpointing_func = func
    chosen = sum(1 for b in blocks if b.gradient_checkpointing)
    log.info("gradient checkpointing: %d of %d blocks recompute%s", chosen, len(blocks),
             ", inputs parked in host memory" if offload else "")
    return chosen


def _is_block(module: nn.Module) -> bool:
    """A repeated transformer block (HF's `GradientCheckpointingLayer`), not a model-level flag holder."""
    return any(cls.__name__ == "GradientCheckpointingLayer" for cls in type(module).__mro__)


def offloaded_checkpoint(function, hidden_states=None, *args, **kwargs):
    """`checkpoint(function, hidden_states, *args)` with `hidden_states` kept in pinned host memory.

    The block's input is copied to the host (a differentiable copy: its gradient flows back to the device) and
    the checkpoint holds only that host copy; the block's forward and its recomputation copy it back first.
    The host copy is pinned when the input is on CUDA. Blocks called without a positional tensor input take the
    plain checkpoint. (Training enables this on CUDA only: on the host it would copy for nothing.)
    """
    if not isinstance(hidden_states, torch.Tensor):
        return checkpoint(function, *([] if hidden_states is None else [hidden_states]), *args, **kwargs)
    device = hidden_states.device
    parked = torch.empty(hidden_states.shape, dtype=hidden_states.dtype, pin_memory=device.type == "cuda")
    parked.copy_(hidden_states, non_blocking=True)  # tracked by autograd: CopyBackwards sends the grad back

    def run(host, *rest):
        return function(host.to(device, non_blocking=True), *rest)

    return checkpoint(run, parked, *args, **kwargs)
