"""Per-strategy terms of the memory plan: what trains, in which dtype, what the weights cost, and what each
method's adapters keep for backward.

Each registered method has one entry in `TERMS`, keyed by its registered name: a function that fills a
`Strategy` from the model's meta inventory and the method's own `Options` (the pydantic model `--set` validates
for training, so the planner reads the same option names). Nothing else in the planner names a method: traits
come from the registered class (`family`; `artifact == "model"`: the whole model trains in its dtype) or from
the strategy its entry filled in. Adding a method is one file, one `@register` and one entry here (a test checks
that every registered method has one).

tunelab's scheme (see `tunelab.methods`): the base model keeps its dtype; adapter weights, the classification head
copy that every adapter method trains (PEFT's `modules_to_save`) and BitFit's bias deltas are fp32; under full
fine-tuning every weight trains in the model dtype. AdamW keeps two moments in each parameter's dtype.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from tunelab.errors import ConfigError
from tunelab.measure.plan_formulas import (
    ADAMW_MOMENTS, ADAPTER_BYTES, FP32, NF4_BYTES_PER_PARAM, NF4_DEQUANT_COPIES, NF4_DEQUANT_INDEX_BYTES, Keeps, Runtime,
    head_input_bytes,
)
from tunelab.measure.plan_model import Linear, ModelInfo
from tunelab.methods import get_method, heads, lora_embedding
from tunelab.methods.base import MethodOptions, saved_modules
from tunelab.methods.lora import resolve_targets
from tunelab.modules import in_out_features, name_matches

ALL_SITES = {"attn_in", "attn_out", "mlp_in", "mlp_mid"}
ADAPTER_POSITIONS = {"houlsby": 2, "pfeiffer": 1, "parallel": 1}  # bottleneck adapters per block


@dataclass
class Strategy:
    """The method-dependent terms of one strategy's estimate (batch-independent)."""

    method: str
    family: str
    param_bytes: int  # the model dtype's bytes per weight
    whole_model: bool = False  # every weight trains in the model dtype (the method's artifact is a model)
    adapter_params: int = 0  # fp32 trainable parameters (adapters, head copy, bias deltas)
    base_trainable: int = 0  # trainable parameters in the model dtype (full fine-tuning)
    # `--master-weights` on a 16-bit model: "optimizer" (fp32 copies in MasterWeightAdamW's state) or "held"
    # (FSDP2: the trained weights, their gradients and moments in fp32 shards); None: off
    master: str | None = None
    weights_bytes: float = 0.0
    nf4_linears: bool = False  # the frozen linears below the head are stored as NF4 (4-bit)
    keeps: Keeps = field(default_factory=Keeps)
    extra_tokens: int = 0  # prompt: virtual tokens every block processes
    prefix_tokens: int = 0  # prefix: extra keys/values per layer
    # FSDP2 blocks that keep their gathered weights to the backward: held from the end of the forward into the
    # backward (the loss and recompute phases), freed block by block before the optimizer step
    gathered_bytes: float = 0.0
    transient_bytes: float = 0.0  # largest per-op temporary (dequantised 4-bit weight, DoRA's weight norm)
    largest_trainable_bytes: float = 0.0
    artifact_bytes: float = 0.0
    unsupported: str | None = None  # why tunelab cannot train this model with the method
    no_checkpointing: str | None = None  # why the method refuses gradient checkpointing, if it does
    notes: list[str] = field(default_factory=list)

    @property
    def params_trainable(self) -> int:
        return self.adapter_params + self.base_trainable

    @property
    def trainable_bytes(self) -> float:
        """Bytes of the trainable parameters, which is also the bytes of their gradients."""
        base = FP32 if self.master == "held" else self.param_bytes
        return self.adapter_params * ADAPTER_BYTES + self.base_trainable * base

    @property
    def optimizer_bytes(self) -> float:
        """AdamW's two moments (in the trained parameter's dtype, fp32 with master weights), plus the fp32
        master copies when the optimizer holds them."""
        if self.master is None:
            return ADAMW_MOMENTS * self.trainable_bytes
        moments = ADAMW_MOMENTS * (self.adapter_params * ADAPTER_BYTES + self.base_trainable * FP32)
        return moments + (self.base_trainable * FP32 if self.master == "optimizer" else 0)


def build_strategy(method: str, info: ModelInfo, opts: MethodOptions, rt: Runtime) -> Strategy:
    """The `Strategy` of registered method `method` for `info` under its own options `opts` on runtime `rt`."""
    impl = get_method(method)
    if method not in TERMS:
        raise ConfigError(f"method '{method}': the planner has no terms for it (measure/plan_methods.py TERMS)")
    st = Strategy(method=method, family=impl.family, param_bytes=rt.param_bytes, whole_model=impl.artifact == "model")
    terms = TERMS[method]
    terms.build(st, info, opts, rt)
    changed = [k for k in terms.unmodelled if k in opts.model_fields_set
               and getattr(opts, k) != type(opts).model_fields[k].default]
    if changed:
        st.notes.append(f"planned without the effect of {', '.join(changed)} (not modelled)")
    if not st.whole_model:
        # an fp32 copy of the classification head (and of `modules_to_save`) trains with adapters
        copies = heads.head_numel(info.meta_model, saved_modules(opts)) if info.meta_model is not None \
            else info.head_params
        st.adapter_params += copies
        st.keeps.head_input = head_input_bytes(info, rt, full=False)
        st.weights_bytes += _base_weights(st, info, rt) + st.adapter_params * ADAPTER_BYTES
        st.artifact_bytes = st.adapter_params * ADAPTER_BYTES
        st.largest_trainable_bytes = max(st.largest_trainable_bytes, copies * FP32)
    return st


def _full(st: Strategy, info: ModelInfo, opts: MethodOptions, rt: Runtime) -> None:
    """Every weight trains in the model dtype; every linear, norm and the LM head keep their inputs."""
    p = rt.param_bytes
    st.base_trainable = info.params_total
    st.weights_bytes = st.artifact_bytes = info.params_total * p
    st.keeps = Keeps(sites=set(ALL_SITES), norm_weights=True, head_input=head_input_bytes(info, rt, full=True),
                     input_grad=True)
    st.largest_trainable_bytes = info.max_param_numel * p


def _base_weights(st: Strategy, info: ModelInfo, rt: Runtime) -> float:
    """Frozen base weights: the model dtype, or NF4 linears (embeddings, norms, head in the dtype; qlora)."""
    if not st.nf4_linears:
        return info.params_total * rt.param_bytes
    quantised = sum(lin.in_features * lin.out_features for lin in info.linears)
    return quantised * NF4_BYTES_PER_PARAM + (info.params_total - quantised) * rt.param_bytes


def lora_targets(info: ModelInfo, opts) -> list[Linear]:
    """The linears a LoRA-family method adapts: `opts.target_modules` resolved as the method does (its default
    when unset: attention q and v for lora and dora, every linear but the output head for qlora)."""
    names = set(resolve_targets(info.meta_model, opts))
    return [lin for lin in info.linears if lin.name in names]


def _lora(st: Strategy, info: ModelInfo, opts, rt: Runtime) -> list[Linear]:
    """LoRA (Hu et al. 2021): each target adds A (r, in) and B (out, r), fp32 (r per target: `rank_pattern`).

    Kept for backward, per token: the adapter's input (the shared block input in fp32 runs and under autocast,
    where adapters read the bf16 activations as they are (`adapter_autocast`); an fp32 copy for a bf16 model
    without autocast), A's output (r), and with dropout the mask and the dropped input. Under autocast A and B
    are cast to bf16 and kept for backward. Returns the targets (DoRA and QLoRA add their own terms).
    """
    targets = lora_targets(info, opts)
    act = rt.adapter_act_bytes
    rank = {t.name: opts.rank_alpha(t.name)[0] for t in targets}  # r, or the rank_pattern's rank
    st.adapter_params = sum(rank[t.name] * (t.in_features + t.out_features) for t in targets)
    st.adapter_params += embedding_lora_params(info, opts)
    shared_input = (rt.autocast or rt.param_bytes == FP32) and opts.dropout == 0
    per_token = 0.0
    for t in targets:
        per_token += act * rank[t.name] + (0 if shared_input else act * t.in_features)
        if opts.dropout > 0:
            per_token += rt.mask_bytes * t.in_features
    casts = rt.param_bytes * st.adapter_params if rt.autocast else 0.0  # A and B cast to bf16, kept for backward
    st.keeps = Keeps(sites={t.site for t in targets} if shared_input else set(), extra_per_token=per_token,
                     extra_fixed=casts)
    st.largest_trainable_bytes = FP32 * max((rank[t.name] * max(t.in_features, t.out_features) for t in targets),
                                            default=0)
    return targets


def embedding_lora_params(info: ModelInfo, opts) -> int:
    """A (r, num_embeddings) and B (dim, r) of each embedding layer LoRA adapts (`lora_embedding.py`); what
    they keep for backward (r per token) is left out, as small."""
    model = info.meta_model
    names = [n for n in resolve_targets(model, opts) if lora_embedding.is_embedding(model.get_submodule(n))]
    return sum(opts.rank_alpha(n)[0] * sum(in_out_features(model.get_submodule(n))) for n in names)


def _dora(st: Strategy, info: ModelInfo, opts, rt: Runtime) -> None:
    """DoRA (Liu et al. 2024, arXiv:2402.09353): LoRA plus a magnitude vector (out) per target. It also keeps the
    base output W x and the LoRA output to rescale them (both in the adapter's compute dtype), and builds W and
    W + sBA in fp32 for the column norm (transient)."""
    targets = _lora(st, info, opts, rt)
    st.keeps.extra_per_token += sum(2 * rt.adapter_act_bytes * t.out_features for t in targets)
    st.adapter_params += sum(t.out_features for t in targets)
    st.transient_bytes = 2 * FP32 * max(t.in_features * t.out_features for t in targets)


def _qlora(st: Strategy, info: ModelInfo, opts, rt: Runtime) -> None:
    """QLoRA (Dettmers et al. 2023): LoRA on NF4 linears. torchao's `linear_nf4` keeps only the 4-bit weight and
    dequantises it in forward and backward: two int64 nibble-index tensors and three run-dtype tensors per
    weight, alive together (measured, `NF4_DEQUANT_BYTES`)."""
    _lora(st, info, opts, rt)
    st.nf4_linears = True
    largest = max((lin.in_features * lin.out_features for lin in info.linears), default=0)
    st.transient_bytes = (NF4_DEQUANT_INDEX_BYTES + NF4_DEQUANT_COPIES * rt.param_bytes) * largest


def _adapter(st: Strategy, info: ModelInfo, opts, rt: Runtime) -> None:
    """Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020; parallel: He et al. 2022), as tunelab's
    `adapter`: width m = `opts.size(hidden)` (hidden // 16 by default).

    Per adapter: down (hidden -> m) with bias, up (m -> hidden) with bias: 2*h*m + m + h parameters. Kept per
    token: the down projection's input (h) and the activation's output (m), which the up projection shares; an
    activation that saves its input (GELU, SiLU) keeps the down projection's output (m) too.
    """
    h, act = info.hidden, rt.adapter_act_bytes
    m = opts.size(h)
    count = info.layers * ADAPTER_POSITIONS[opts.variant]
    st.adapter_params = count * (2 * h * m + m + h)
    kept_m = m if opts.non_linearity in ("relu", "tanh") else 2 * m  # relu/tanh backward reads their output
    first_block = "mlp" if opts.variant == "houlsby" else "none"  # where the first adapter sits
    st.keeps = Keeps(extra_per_token=count * act * (h + kept_m), first_block=first_block)
    st.largest_trainable_bytes = FP32 * h * m


def _prefix(st: Strategy, info: ModelInfo, opts, rt: Runtime) -> None:
    """Prefix-tuning (Li & Liang 2021): 2 * layers * n * kv_dim fp32 prefixes (no reparameterisation).

    Keys and values are n longer in every layer; the prefixes need an attention mask, under which transformers
    repeats grouped key/value heads (`repeat_kv`) before SDPA, and the (s, n + s) boolean mask is kept.
    """
    n = opts.num_virtual_tokens
    takes = inspect.signature(info.meta_model.forward).parameters
    if not {"past_key_values", "cache"} & set(takes):
        st.unsupported = f"{type(info.meta_model).__name__} takes no key/value cache, which the prefixes need"
    st.no_checkpointing = "tunelab's prefix method refuses gradient checkpointing (it drops the prefix cache)"
    st.adapter_params = 2 * info.layers * n * info.kv_dim
    st.prefix_tokens = n
    st.largest_trainable_bytes = FP32 * st.adapter_params


def _prompt(st: Strategy, info: ModelInfo, opts, rt: Runtime) -> None:
    """Prompt tuning (Lester et al. 2021): n * hidden fp32 embeddings in front of every sequence, so every
    block runs n more tokens, and the logits cover them before the loop's loss drops them."""
    st.adapter_params = opts.num_virtual_tokens * info.hidden
    st.extra_tokens = opts.num_virtual_tokens
    st.keeps = Keeps(input_grad=True)
    st.largest_trainable_bytes = FP32 * st.adapter_params


def _matches(name: str, spec: list[str] | str) -> bool:
    """The target rule of `find_targets`: a regex (full match) or a list of names."""
    return re.fullmatch(spec, name) is not None if isinstance(spec, str) else name_matches(name, spec)


def _ia3(st: Strategy, info: ModelInfo, opts, rt: Runtime) -> None:
    """(IA)^3 (Liu et al. 2022): a vector scales each attention target's output (out) and each feed-forward
    target's input (in); the scaling multiply keeps the unscaled tensor (model dtype) for the vector's grad.
    Targets as the method resolves them (PEFT's per-architecture defaults when unset)."""
    try:
        targets, ff = get_method(st.method).resolve(info.meta_model, opts)
    except ConfigError as e:  # no default targets for this architecture: the method refuses it too
        st.unsupported = str(e)
        return
    dims = [lin.in_features if _matches(lin.name, ff) else lin.out_features
            for lin in info.linears if _matches(lin.name, targets)]
    if not dims:
        st.unsupported = f"target_modules {targets!r} matched no linear layer of this model"
    st.adapter_params = sum(dims)
    st.keeps = Keeps(extra_per_token=rt.param_bytes * sum(dims))
    st.largest_trainable_bytes = FP32 * max(dims, default=0)


def _bitfit(st: Strategy, info: ModelInfo, opts, rt: Runtime) -> None:
    """BitFit (Ben Zaken et al. 2022): fp32 deltas of every bias; with norm weights (the only choice for models
    without biases, such as Llama, where it is planned by default) each norm's hook recomputes the normalised
    input and keeps it."""
    include_norms = opts.include_norms or ("include_norms" not in opts.model_fields_set and info.bias_params == 0)
    st.adapter_params = info.bias_params + (info.norm_params if include_norms else 0)
    if include_norms:
        p, h = rt.param_bytes, info.hidden
        upcast = FP32 * h if (info.arch not in ("gpt2", "bert") and p != FP32) else 0  # RMSNorm's fp32 copy
        st.keeps = Keeps(extra_per_token=info.norm_count * (p * h + upcast))
        if not opts.include_norms:
            st.notes.append("the model has no biases: planned with norm weights (--set include_norms=true)")
    elif not st.adapter_params:
        st.unsupported = "the model has no biases and include_norms is false: nothing would train"
    widest_bias = max((lin.out_features for lin in info.linears if lin.bias), default=info.hidden)
    st.largest_trainable_bytes = FP32 * max(widest_bias, info.hidden)


@dataclass(frozen=True)
class Terms:
    """One method's planner entry: `build(strategy, info, options, runtime)` fills its terms; `unmodelled` are
    options that change memory but are planned as at their default (a note says so when they are set)."""

    build: Callable[[Strategy, ModelInfo, MethodOptions, Runtime], object]
    unmodelled: tuple[str, ...] = ()


# Registered method name -> its terms. The only per-method table of the planner (tests check its coverage).
TERMS: dict[str, Terms] = {
    "full": Terms(_full), "lora": Terms(_lora), "dora": Terms(_dora), "qlora": Terms(_qlora),
    "adapter": Terms(_adapter), "prefix": Terms(_prefix, ("prefix_projection", "encoder_hidden_size")),
    "prompt": Terms(_prompt), "ia3": Terms(_ia3), "bitfit": Terms(_bitfit, ("target_modules",)),
}
