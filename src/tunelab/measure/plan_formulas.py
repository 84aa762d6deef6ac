"""Byte formulas of the memory planner: what a training step keeps alive, per token and per layer.

Activation memory follows the accounting of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (arXiv:2205.05198): a block without recomputation keeps sbh(34 + 5as/h) bytes in fp16, a
sum over the tensors each op saves for its backward. Here the same sum is written for the blocks transformers
actually runs, with four changes:
- attention is PyTorch SDPA (flash / memory-efficient kernels): it saves q, k, v, its output and a fp32
  log-sum-exp per head and query, and no (s, s) score matrix. The a*s/h term returns only where SDPA falls back
  to its math path (on CPU when attention dropout is on): softmax output, dropout mask and dropped scores;
- Llama's gated MLP keeps gate, up and silu(gate) (3 * I) and its RMSNorm keeps an fp32 copy of its input;
- a frozen linear keeps nothing for its weight: only trainable linears keep their input (per input site, see
  `plan_model`), so PEFT methods keep far less than full fine-tuning, although every layer still keeps what
  the backward pass needs to carry the gradient down to the lowest adapter (or to the soft prompt);
- dtypes are tunelab's: the model runs in its dtype, on CUDA under bf16 autocast (`train.loop.autocast_for`),
  which runs LayerNorm and `pow` in fp32; adapters hold fp32 weights.

The formulas were checked op by op against the tensors autograd saves (`grad_fn._saved_*`) and against the
allocator peak of whole training steps on CPU (bench/plan_vs_measured.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.measure.plan_model import ModelInfo

FP32 = 4
ADAPTER_BYTES = FP32  # tunelab keeps adapter weights (and so their grads and AdamW moments) in fp32
ADAMW_MOMENTS = 2  # exp_avg and exp_avg_sq, in each parameter's dtype
INDEX_BYTES_PER_TOKEN = 3 * 8  # input_ids, attention_mask and labels as int64
NORM_STATS_BYTES = 2 * FP32  # LayerNorm's saved mean and rstd per token
LSE_BYTES = FP32  # SDPA's saved log-sum-exp, per head and query
# The loss: `causal_lm_loss_sum` upcasts the logits to fp32 and runs log_softmax + nll. At the log_softmax backward
# the fp32 log-probs, the nll gradient and the log_softmax input gradient are alive together: 3 x 4 bytes per
# logit. (The run-dtype logits are freed once the loss is computed: the loop keeps no reference to them.)
LOSS_BYTES_PER_LOGIT = 3 * FP32
# In the forward, the fp32 copy made for the loss and the log-probs (2 x 4 bytes) sit beside the logits.
LOSS_FORWARD_BYTES_PER_LOGIT = 2 * FP32
# QLoRA (Dettmers et al. 2023, arXiv:2305.14314, section 3): NF4 packs two weights per byte; double quantisation
# stores one 8-bit absmax per block of 64 weights and one fp32 constant per 256 blocks:
# 8/64 + 32/(64*256) = 0.127 bits per weight.
NF4_BYTES_PER_PARAM = 0.5 + (8 / 64 + 32 / (64 * 256)) / 8
# Dequantising an NF4 weight (torchao's NF4Tensor, which tunelab's qlora uses) unpacks both nibbles of each byte
# to int64 indices (2 x 8 bytes per two weights) and builds the weight through 3 tensors of the run dtype, all
# alive at once: measured 8 + 3 * 4 = 20 (fp32) and 8 + 3 * 2 = 14 (bf16) bytes per weight of the layer.
NF4_DEQUANT_INDEX_BYTES = 8
NF4_DEQUANT_COPIES = 3
# What a CUDA process holds beyond its tensors: the CUDA context and loaded kernels (about 0.5 GiB with PyTorch),
# cuBLAS/cuDNN workspaces, and slack in the caching allocator's segments. A fixed allowance; CPU runs add none.
CUDA_OVERHEAD_BYTES = 1 << 30
# cuBLAS workspaces, which PyTorch takes from its caching allocator (so they count in max_memory_allocated):
# 32 MiB per handle on recent GPUs, one handle for the forward thread and one for autograd's backward thread.
CUDA_WORKSPACE_BYTES = 2 * 32 * 2**20


@dataclass(frozen=True)
class Runtime:
    """How tunelab runs on the target device: dtype bytes, autocast, dropout masks, optimizer kernel."""

    device: str  # cuda | cpu
    param_bytes: int  # the model's dtype: 2 (bf16/fp16) or 4 (fp32)
    autocast: bool  # bf16 autocast around forward + loss (tunelab does this on CUDA with bf16)
    mask_bytes: int  # a dropout mask: bool on CUDA, the input's dtype on CPU
    fused_adamw: bool  # fused AdamW (CUDA) updates in place; the CPU loop makes two temporaries per tensor
    fused_loss: bool = True  # the causal-LM loss without full logits (`train.fused_loss`, RunConfig.fused_loss)
    # checkpointed block inputs wait in host memory (`train.activations`, RunConfig.offload_activations)
    offload_activations: bool = False

    @property
    def overhead_bytes(self) -> int:
        return CUDA_OVERHEAD_BYTES if self.device == "cuda" else 0

    @property
    def workspace_bytes(self) -> int:
        return CUDA_WORKSPACE_BYTES if self.device == "cuda" else 0

    @property
    def adapter_act_bytes(self) -> int:
        """Bytes of an adapter's own activations: autocast runs its matmuls in bf16, otherwise fp32."""
        return self.param_bytes if self.autocast else FP32


def runtime(device: str, param_bytes: int, fused_loss: bool = True, offload_activations: bool = False) -> Runtime:
    """tunelab's runtime on `device` for a model of `param_bytes` per weight (see `train.loop`, `train.optim`)."""
    cuda = device == "cuda"
    return Runtime(device=device, param_bytes=param_bytes, autocast=cuda and param_bytes == 2,
                   mask_bytes=1 if cuda else param_bytes, fused_adamw=cuda, fused_loss=fused_loss,
                   offload_activations=offload_activations)


@dataclass
class Keeps:
    """What a strategy makes the block keep beyond what carrying the gradient needs.

    `sites`: input sites whose tensor is kept because a linear there trains (full) or reads it for backward
    (4-bit linears keep their input whatever trains). `norm_weights`: norm weights train, so norms keep their
    normalised output. `head_input`: bytes per token the trained head keeps of its input (`head_input_bytes`).
    `extra_per_token`: the adapters' own saved tensors, bytes per token summed over all layers.
    `extra_per_sequence`: bytes per sequence summed over all layers (prefix keys/values). `extra_fixed`: bytes
    whatever the batch (under autocast, the bf16 casts of fp32 adapter weights their matmuls keep).
    `input_grad`: the embedding output needs a gradient (the embeddings or a soft prompt train). Otherwise the
    first block keeps nothing below the first thing that trains: its first norm (`first_block="all"`), also its
    attention (`"mlp"`: adapters after the attention output), or everything but the adapter's own tensors
    (`"none"`: adapters after the MLP only, or beside it).
    """

    sites: set[str] = field(default_factory=set)
    norm_weights: bool = False
    head_input: float = 0.0
    input_grad: bool = False
    first_block: str = "all"
    extra_per_token: float = 0.0
    extra_per_sequence: float = 0.0
    extra_fixed: float = 0.0


def math_attention(info: ModelInfo, rt: Runtime) -> bool:
    """Whether SDPA falls back to its math path, which stores the (s, s) scores: on CPU when attention dropout is
    on; on CUDA for fp32 with grouped-query attention (only the flash kernel, bf16/fp16, takes GQA)."""
    if rt.device == "cpu":
        return info.attn_dropout > 0
    return rt.param_bytes == FP32 and not rt.autocast and info.kv_heads < info.heads


def attention_bytes(info: ModelInfo, rt: Runtime, seq: int, kv_seq: int, kv_width: int) -> float:
    """Per token and layer: what SDPA saves. q, k, v (k/v over `kv_seq` keys of `kv_width`) and the output."""
    p, h = rt.param_bytes, info.hidden
    if not math_attention(info, rt):
        kv = p * kv_width * kv_seq / seq  # one of k, v
        return p * h + 2 * kv + p * h + LSE_BYTES * info.heads  # q, k, v, output, log-sum-exp
    # Math path (intermediates in fp32, also for bf16 inputs): scaled copies of q and k and a contiguous v, with
    # grouped key/value heads repeated to every head; the softmax output and, with dropout, its mask and the
    # dropped scores, (heads, s, kv_seq) each. The output is not kept (the output projection keeps its own
    # contiguous copy when it trains).
    mask = 1 if rt.device == "cuda" else FP32
    per_score = FP32 + (FP32 + mask if info.attn_dropout > 0 else 0)
    return FP32 * h * (1 + 2 * kv_seq / seq) + info.heads * kv_seq * per_score


def block_bytes(info: ModelInfo, rt: Runtime, keeps: Keeps, seq: int, kv_seq: int, kv_width: int) -> float:
    """Bytes one block keeps for backward, per token: architecture terms + kept sites (adapter extras apart)."""
    total = _arch_terms(info, rt, keeps) + attention_bytes(info, rt, seq, kv_seq, kv_width)
    return total + site_bytes(info, rt, keeps)


def first_block_unkept(info: ModelInfo, rt: Runtime, keeps: Keeps, seq: int, kv_seq: int, kv_width: int) -> float:
    """Per token: what the first block does not keep because nothing below it needs a gradient (see `Keeps`)."""
    if keeps.input_grad:
        return 0.0
    below = _norm_input(info, rt) + _embedding_dropout(info, rt)
    if keeps.first_block == "all":
        return below
    attention = attention_bytes(info, rt, seq, kv_seq, kv_width)
    if keeps.first_block == "mlp":
        return below + attention
    return _embedding_dropout(info, rt) + _arch_terms(info, rt, keeps) + attention


def _embedding_dropout(info: ModelInfo, rt: Runtime) -> float:
    """GPT-2 and BERT drop out the embedding output; the mask is kept when the embedding output needs a grad."""
    return rt.mask_bytes * info.hidden if info.arch in ("gpt2", "bert") and info.embd_dropout > 0 else 0.0


def _arch_terms(info: ModelInfo, rt: Runtime, keeps: Keeps) -> float:
    return (_layernorm_block if info.arch in ("gpt2", "bert") else _llama_block)(info, rt, keeps)


def _norm_input(info: ModelInfo, rt: Runtime) -> float:
    """What a norm keeps of its input: RMSNorm an fp32 copy, LayerNorm its input and statistics."""
    return _layernorm_input(info, rt) if info.arch in ("gpt2", "bert") else FP32 * info.hidden


def _llama_block(info: ModelInfo, rt: Runtime, keeps: Keeps) -> float:
    """Llama-style block: two RMSNorms (fp32 input copy kept by pow/mul; the normalised output when the norm
    weight trains), a gated MLP keeping gate, up and silu(gate) for the silu and product backward."""
    p, h = rt.param_bytes, info.hidden
    norms = 2 * (FP32 * h + (p * h if keeps.norm_weights else 0))
    return norms + 3 * p * info.intermediate


def _layernorm_input(info: ModelInfo, rt: Runtime) -> float:
    """A LayerNorm keeps its input (fp32 under CUDA autocast, which runs layer_norm in fp32) + mean, rstd."""
    return (FP32 if rt.autocast else rt.param_bytes) * info.hidden + NORM_STATS_BYTES


def _gelu_bytes(info: ModelInfo, rt: Runtime) -> float:
    """GPT-2's gelu_new is Python ops: 0.5x, x (for pow), tanh(.) and 1 + tanh(.) are kept (4 x I); under
    autocast `pow` runs in fp32, so all but 0.5x are fp32. A native GELU keeps only its input."""
    p, i = rt.param_bytes, info.intermediate
    if info.activation in ("gelu_new", "gelu_fast", "gelu_accurate"):
        wide = FP32 if rt.autocast else p
        return (p + 3 * wide) * i
    return p * i


def _dropout_masks(info: ModelInfo, rt: Runtime) -> float:
    """Two residual dropouts per block (after attention and after the MLP), one mask each."""
    return 2 * rt.mask_bytes * info.hidden if info.hidden_dropout > 0 else 0.0


def _layernorm_block(info: ModelInfo, rt: Runtime, keeps: Keeps) -> float:
    """GPT-2 (pre-LN) or BERT (post-LN) block: two LayerNorms, two residual dropouts, the GELU (attention is in
    `attention_bytes`). LayerNorm weights need no extra tensor for their gradient."""
    return 2 * _layernorm_input(info, rt) + _dropout_masks(info, rt) + _gelu_bytes(info, rt)


def site_bytes(info: ModelInfo, rt: Runtime, keeps: Keeps) -> float:
    """Per token and block: the inputs kept for weight gradients at `keeps.sites`.

    The attention output is SDPA's own output tensor, already kept by the attention backward, except on the math
    path, where the output projection reads a contiguous copy. Under autocast BERT's residual stream is fp32
    (its LayerNorms run in fp32), so each of query/key/value casts its own bf16 copy of the input.
    """
    dims = info.site_dims()
    p, total = rt.param_bytes, 0.0
    for site in keeps.sites:
        if site not in dims or (site == "attn_out" and not math_attention(info, rt)):
            continue
        copies = 3 if (site == "attn_in" and info.arch == "bert" and rt.autocast) else 1
        total += copies * p * dims[site]
    return total


def final_bytes(info: ModelInfo, rt: Runtime, keeps: Keeps) -> float:
    """Per token, outside the blocks: the final norm (or BERT's embedding LayerNorm), the embedding dropout
    mask, the head's input when the head trains, and the int64 batch tensors."""
    p, h = rt.param_bytes, info.hidden
    total = float(INDEX_BYTES_PER_TOKEN) + _norm_input(info, rt) + _embedding_dropout(info, rt)
    if info.arch not in ("gpt2", "bert"):
        total += p * h if keeps.norm_weights else 0
    return total + keeps.head_input


def head_input_bytes(info: ModelInfo, rt: Runtime, full: bool) -> float:
    """Per token: what the trained head keeps of its input. The LM head (under full fine-tuning) keeps the final
    hidden state; so does a classification head run on every position (Llama's `score`), for adapter methods as
    the input of their head copy. BERT's pooler reads the [CLS] position: a slice of the last hidden state that
    keeps all of it alive (under full fine-tuning without autocast, which would copy the slice instead); an adapter
    trains only the classifier, on the pooled (batch, hidden) vector."""
    p, h = rt.param_bytes, info.hidden
    if info.task == "causal-lm":
        return p * h if full else 0.0
    if info.arch == "bert":
        return p * h if (full and not rt.autocast) else 0.0
    return (p if full else rt.adapter_act_bytes) * h


def loss_buffers(info: ModelInfo, rt: Runtime, batch: int, seq: int, logit_seq: int) -> tuple[float, float]:
    """(forward, backward) bytes of the logits and the loss: in the forward the run-dtype logits over `logit_seq`
    positions + the loss's fp32 copy and log-probs; at the log_softmax backward 3 fp32 buffers."""
    classes = info.vocab if info.task == "causal-lm" else info.num_labels
    rows = batch * seq if info.task == "causal-lm" else batch
    fwd = rt.param_bytes * batch * (logit_seq if info.task == "causal-lm" else 1) * classes
    return fwd + LOSS_FORWARD_BYTES_PER_LOGIT * rows * classes, LOSS_BYTES_PER_LOGIT * rows * classes


def fused_loss_applies(info: ModelInfo, rt: Runtime) -> bool:
    """Whether the run computes this model's loss with the fused loss (causal-LM, a plain linear head)."""
    from tunelab.train.fused_loss import fusable_head

    return rt.fused_loss and info.task == "causal-lm" and fusable_head(info.meta_model) is not None


def fused_loss_buffers(info: ModelInfo, rt: Runtime, batch: int, seq: int, head_trains: bool) -> tuple[float, float]:
    """(forward, backward) bytes of `train.fused_loss`'s chunked loss over the n = batch * (seq - 1) targets.

    In the forward: the shifted hidden states (n, h) and their gradient (n, h) in the run dtype, the head weight's
    fp32 gradient (v, h) when the head trains, and one chunk's logits in fp32 (+ their run-dtype matmul output
    when that is narrower) beside a second fp32 chunk buffer (log-sum-exp's temporary, or the head gradient's
    per-chunk product). In the backward the stored gradients and their scaled copies. Liger-Kernel's kernel
    (CUDA, liger-kernel installed) holds bf16 chunks of about n x h elements instead: less than this.
    """
    from tunelab.train.fused_loss import CHUNK_ELEMENTS

    p, h, v = rt.param_bytes, info.hidden, info.vocab
    rows = batch * max(seq - 1, 0)
    chunk = min(rows, max(1, CHUNK_ELEMENTS // v))
    grad_w = FP32 * v * h if head_trains else 0.0
    logits = chunk * v * (FP32 + (p if p < FP32 else 0))
    fwd = 2 * p * rows * h + grad_w + logits + max(FP32 * chunk * v, grad_w)
    return fwd, 2 * (p * rows * h + grad_w)


def logits_bytes(info: ModelInfo, rt: Runtime, batch: int, seq: int, logit_seq: int,
                 head_trains: bool = False) -> float:
    """Peak bytes of the logits and the loss buffers (see `loss_buffers`, `fused_loss_buffers`)."""
    if fused_loss_applies(info, rt):
        return max(fused_loss_buffers(info, rt, batch, seq, head_trains))
    return max(loss_buffers(info, rt, batch, seq, logit_seq))


def optimizer_step_temp(rt: Runtime, largest_trainable_bytes: float) -> float:
    """Temporaries of AdamW's step: none for fused AdamW; the CPU loop builds denom = sqrt(v) / c as two
    tensors of the size of the parameter it updates (the largest one sets the peak)."""
    return 0.0 if rt.fused_adamw else 2 * largest_trainable_bytes
