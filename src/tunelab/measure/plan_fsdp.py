"""The per-GPU terms of a strategy trained on N GPUs (`tunelab plan --nproc N`): which of FSDP2 and DDP the run
takes (`distributed_strategy`, train's own rule), and what one GPU holds under it (`per_gpu`).

Under DDP a GPU holds what one process holds, plus DDP's gradient buckets (a flat copy of the gradients).

Under FSDP2, `fully_shard` on every transformer block and on the root (`train/distributed.py`) splits each
parameter, its gradient and its AdamW state over the N ranks: a rank holds 1/N of each. On top of that share it
holds, at the peak, the weights FSDP2 has gathered to compute with, in the run dtype (the bf16 mixed-precision
policy):
- the root group (embeddings, final norm, output head), gathered from the forward until the end of backward;
- two blocks: the one computing and the one prefetched; where the blocks keep their gathered weights from the
  forward to the backward (`reshard_after_forward`, train's rule `train/distributed.keeps_gathered`), every
  block from the end of the forward into the backward (not at the optimizer step: each block frees its weights
  after its backward);
- in backward, one block's whole gradient before its reduce-scatter, and its fp32 copy for the fp32 reduction.
Activations are those of one rank's micro-batch, as on one GPU. NCCL's own buffers are not counted.
"""

from __future__ import annotations

import dataclasses
import math

from tunelab.measure.plan_formulas import FP32
from tunelab.measure.plan_methods import Strategy
from tunelab.measure.plan_model import ModelInfo


def block_params(info: ModelInfo) -> tuple[float, float]:
    """(parameters of one block, parameters outside the blocks): embeddings, output head and the last norms."""
    embeddings = info.vocab * info.hidden * (1 if info.tied or info.task != "causal-lm" else 2)
    outside = embeddings + info.head_params + info.hidden
    return max(info.params_total - outside, 0) / max(info.layers, 1), outside


def sharded(st: Strategy, info: ModelInfo, nproc: int, keep_gathered: bool = False) -> Strategy:
    """`st` as one of `nproc` FSDP2 ranks holds it (see the module docstring); `nproc` 1 changes nothing.
    `keep_gathered`: every block's gathered weights are held to its backward."""
    if nproc <= 1:
        return st
    if st.nf4_linears:
        return dataclasses.replace(st, unsupported="NF4 base weights cannot be sharded by FSDP2 (train it with "
                                                    "--strategy ddp: a whole copy per GPU)")
    block, outside = block_params(info)
    p = st.param_bytes
    gathered = (outside + 2 * block) * p
    kept_blocks = (max(info.layers, 1) - 2) * block * p if keep_gathered else 0.0
    block_grad = (block if st.whole_model else st.params_trainable / max(info.layers, 1)) * (p + FP32)
    held = "every block (kept from forward to backward)" if keep_gathered else "two blocks"
    note = (f"FSDP2 on {nproc} GPUs: a 1/{nproc} share of weights, gradients and AdamW states per GPU, plus the "
            f"gathered root group and {held} in the run dtype")
    return dataclasses.replace(
        st, weights_bytes=st.weights_bytes / nproc + gathered + block_grad, gathered_bytes=kept_blocks,
        adapter_params=math.ceil(st.adapter_params / nproc), base_trainable=math.ceil(st.base_trainable / nproc),
        largest_trainable_bytes=st.largest_trainable_bytes / nproc, notes=[*st.notes, note])


def distributed_strategy(requested: str, st: Strategy, info: ModelInfo, nproc: int,
                         gpu_memory: int | None) -> str | None:
    """The strategy a `train --nproc N --strategy REQUESTED` run of `st` would take (None on one process), by
    train's own rule (`train/distributed.prefers_ddp`), with `gpu_memory` standing for the GPU's memory."""
    from tunelab.train.distributed import TRAINING_BYTES_PER_TRAINABLE, prefers_ddp

    if nproc <= 1:
        return None
    if requested != "auto":
        return requested
    if st.nf4_linears:  # FSDP2 cannot shard NF4: auto replicates qlora
        return "ddp"
    state = st.weights_bytes + st.params_trainable * TRAINING_BYTES_PER_TRAINABLE
    return "ddp" if prefers_ddp(state, info.params_total, gpu_memory) else "fsdp"


def per_gpu(whole: Strategy, info: ModelInfo, nproc: int, spread: str | None, master_weights: bool,
            reshard_after_forward: str = "auto", gpu_memory: int | None = None) -> Strategy:
    """`whole` as one GPU of the run holds it: with `--master-weights` on a 16-bit model, fp32 masters in the
    optimizer (one process, DDP) or fp32 shards (FSDP2); then sharded (FSDP2, its blocks keeping their gathered
    weights by train's rule for `reshard_after_forward` on a GPU of `gpu_memory`) or replicated (DDP)."""
    from tunelab.train.distributed import keeps_gathered

    if master_weights and whole.param_bytes < FP32 and whole.base_trainable:
        whole.master = "held" if spread == "fsdp" else "optimizer"
        if whole.master == "held":  # the trained weights' shards are fp32
            whole.weights_bytes += whole.base_trainable * (FP32 - whole.param_bytes)
    if spread == "fsdp":
        keep = keeps_gathered(reshard_after_forward, info.params_total * whole.param_bytes, gpu_memory)
        return sharded(whole, info, nproc, keep)
    return replicated(whole, nproc) if spread else whole


def replicated(st: Strategy, nproc: int) -> Strategy:
    """`st` as one of `nproc` DDP ranks holds it: the whole model, plus DDP's gradient buckets (a flat copy of
    the gradients it all-reduces)."""
    note = (f"DDP on {nproc} GPUs: a whole copy per GPU, plus DDP's gradient buckets "
            f"({st.trainable_bytes / 2**30:.2f} GiB, a copy of the gradients)")
    return dataclasses.replace(st, weights_bytes=st.weights_bytes + st.trainable_bytes, notes=[*st.notes, note])
