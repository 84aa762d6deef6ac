"""The per-GPU terms of a strategy trained with FSDP2 on N GPUs (`tunelab plan --nproc N`).

`fully_shard` on every transformer block and on the root (`train/distributed.py`) splits each parameter, its
gradient and its AdamW state over the N ranks: a rank holds 1/N of each. On top of that share it holds, at the
peak, the weights FSDP2 has gathered to compute with, in the run dtype (the bf16 mixed-precision policy):
- the root group (embeddings, final norm, output head), gathered from the forward until the end of backward;
- two blocks: the one computing and the one prefetched;
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


def sharded(st: Strategy, info: ModelInfo, nproc: int) -> Strategy:
    """`st` as one of `nproc` FSDP2 ranks holds it (see the module docstring); `nproc` 1 changes nothing."""
    if nproc <= 1:
        return st
    if st.nf4_linears:
        return dataclasses.replace(st, unsupported="NF4 base weights cannot be sharded by FSDP2 (train it with "
                                                    "--strategy ddp: a whole copy per GPU)")
    block, outside = block_params(info)
    p = st.param_bytes
    gathered = (outside + 2 * block) * p
    block_grad = (block if st.whole_model else st.params_trainable / max(info.layers, 1)) * (p + FP32)
    note = (f"FSDP2 on {nproc} GPUs: a 1/{nproc} share of weights, gradients and AdamW states per GPU, plus the "
            f"gathered root group and two blocks in the run dtype")
    return dataclasses.replace(
        st, weights_bytes=st.weights_bytes / nproc + gathered + block_grad,
        adapter_params=math.ceil(st.adapter_params / nproc), base_trainable=math.ceil(st.base_trainable / nproc),
        largest_trainable_bytes=st.largest_trainable_bytes / nproc, notes=[*st.notes, note])
