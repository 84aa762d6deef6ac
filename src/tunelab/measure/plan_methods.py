"""Per-strategy terms of the memory plan: what trains, in which dtype, what the weights cost, and what each
method's adapters keep for backward. Estimated by family from the model's meta inventory, so a method need not
be registered for the planner to cover it.

tunelab's scheme (see `tunelab.methods`): the base model keeps its dtype; adapter weights, the classification head
copy that every adapter method trains (PEFT's `modules_to_save`) and BitFit's bias deltas are fp32; under full
fine-tuning every weight trains in the model dtype. AdamW keeps two moments in each parameter's dtype.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.measure.plan_formulas import (
    ADAPTER_BYTES, FP32, NF4_BYTES_PER_PARAM, NF4_DEQUANT_COPIES, NF4_DEQUANT_INDEX_BYTES, Keeps, Runtime,
    head_input_bytes,
)
from tunelab.measure.plan_model import Linear, ModelInfo
from tunelab.methods.base import find_targets

FAMILIES = {
    "full": "full fine-tuning", "lora": "reparameterisation", "dora": "reparameterisation",
    "qlora": "reparameterisation", "adapter": "additive", "prefix": "input-side", "prompt": "input-side",
    "ia3": "scaling / selective", "bitfit": "scaling / selective",
}
ALL_SITES = {"attn_in", "attn_out", "mlp_in", "mlp_mid"}
ADAPTER_POSITIONS = {"houlsby": 2, "pfeiffer": 1, "parallel": 1}  # bottleneck adapters per block


class PlanOptions(BaseModel):
    """Method options the plan uses (`method_options=`); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, gt=0, description="LoRA/DoRA/QLoRA rank")
    target_modules: list[str] | str | None = Field(
        None, description="LoRA/DoRA/QLoRA targets: names, a regex or 'all-linear'; default: attention q, v "
                          "(lora, dora) and all-linear (qlora), as tunelab's methods")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    num_virtual_tokens: int = Field(20, gt=0, description="prefix / prompt length")
    bottleneck: int | None = Field(None, gt=0, description="bottleneck adapter width; default hidden // 16")
    adapter_variant: Literal["houlsby", "pfeiffer", "parallel"] = "houlsby"
    bitfit_include_norms: bool | None = Field(
        None, description="BitFit also trains norm weights; default: only when the model has no biases")


@dataclass
class Strategy:
    """The method-dependent terms of one strategy's estimate (batch-independent)."""

    method: str
    param_bytes: int  # the model dtype's bytes per weight
    adapter_params: int = 0  # fp32 trainable parameters (adapters, head copy, bias deltas)
    base_trainable: int = 0  # trainable parameters in the model dtype (full fine-tuning)
    weights_bytes: float = 0.0
    keeps: Keeps = field(default_factory=Keeps)
    extra_tokens: int = 0  # prompt: virtual tokens every block processes
    prefix_tokens: int = 0  # prefix: extra keys/values per layer
    transient_bytes: float = 0.0  # largest per-op temporary (dequantised 4-bit weight, DoRA's weight norm)
    largest_trainable_bytes: float = 0.0
    artifact_bytes: float = 0.0
    unsupported: str | None = None  # why tunelab cannot train this model with the method
    notes: list[str] = field(default_factory=list)

    @property
    def family(self) -> str:
        return FAMILIES[self.method]

    @property
    def params_trainable(self) -> int:
        return self.adapter_params + self.base_trainable

    @property
    def trainable_bytes(self) -> float:
        """Bytes of the trainable parameters, which is also the bytes of their gradients."""
        return self.adapter_params * ADAPTER_BYTES + self.base_trainable * self.param_bytes


def build_strategy(method: str, info: ModelInfo, opts: PlanOptions, rt: Runtime) -> Strategy:
    """The `Strategy` of `method` for `info` under `opts` on runtime `rt`."""
    builders = {"full": _full, "lora": _lora, "dora": _lora, "qlora": _lora, "adapter": _adapter,
                "prefix": _prefix, "prompt": _prompt, "ia3": _ia3, "bitfit": _bitfit}
    st = Strategy(method=method, param_bytes=rt.param_bytes)
    builders[method](st, info, opts, rt)
    if method != "full":
        st.adapter_params += info.head_params  # an fp32 copy of the classification head trains with adapters
        st.keeps.head_input = head_input_bytes(info, rt, full=False)
        st.weights_bytes += _base_weights(st, info, rt) + st.adapter_params * ADAPTER_BYTES
        st.artifact_bytes = st.adapter_params * ADAPTER_BYTES
        st.largest_trainable_bytes = max(st.largest_trainable_bytes, info.head_params * FP32)
    return st


def _full(st: Strategy, info: ModelInfo, opts: PlanOptions, rt: Runtime) -> None:
    """Every weight trains in the model dtype; every linear, norm and the LM head keep their inputs."""
    p = rt.param_bytes
    st.base_trainable = info.params_total
    st.weights_bytes = st.artifact_bytes = info.params_total * p
    st.keeps = Keeps(sites=set(ALL_SITES), norm_weights=True, head_input=head_input_bytes(info, rt, full=True),
                     input_grad=True)
    st.largest_trainable_bytes = info.max_param_numel * p


def _base_weights(st: Strategy, info: ModelInfo, rt: Runtime) -> float:
    """Frozen base weights: the model dtype, or for qlora NF4 linears (embeddings, norms, head in the dtype)."""
    if st.method != "qlora":
        return info.params_total * rt.param_bytes
    quantised = sum(lin.in_features * lin.out_features for lin in info.linears)
    return quantised * NF4_BYTES_PER_PARAM + (info.params_total - quantised) * rt.param_bytes


def lora_targets(info: ModelInfo, target_modules, method: str = "lora") -> list[Linear]:
    """The linears a LoRA-family method adapts: `target_modules` resolved like `tunelab.methods.lora`; the default
    is the attention q and v (lora, dora), or every linear but the output head (qlora, as the QLoRA paper)."""
    if target_modules is None:
        target_modules = "all-linear" if method == "qlora" else _default_lora_targets(info)
    names = set(find_targets(info.meta_model, target_modules))
    return [lin for lin in info.linears if lin.name in names]


def _default_lora_targets(info: ModelInfo) -> list[str]:
    try:
        from tunelab.methods.lora import default_target_modules
    except ImportError:  # the method may not be written yet: attention query and value, as PEFT defaults
        leaves = {lin.name.rsplit(".", 1)[-1] for lin in info.linears}
        probes = (("q_proj", "v_proj"), ("query", "value"), ("c_attn",))
        return next((list(p) for p in probes if set(p) <= leaves), ["q_proj", "v_proj"])
    return default_target_modules(info.meta_model)


def _lora(st: Strategy, info: ModelInfo, opts: PlanOptions, rt: Runtime) -> None:
    """LoRA (Hu et al. 2021), DoRA (Liu et al. 2024, arXiv:2402.09353) and QLoRA (Dettmers et al. 2023).

    Each target adds A (r, in) and B (out, r); DoRA adds a magnitude vector (out). Kept for backward, per token:
    the adapter's input (the shared block input in fp32 runs and under autocast, where adapters read the bf16
    activations as they are (`adapter_autocast`); an fp32 copy for a bf16 model without autocast), A's output (r),
    with dropout the mask and the dropped input; DoRA also keeps the base output W x and the LoRA output to
    rescale them (both in the adapter's compute dtype), and builds W and W + sBA in fp32 for the column norm
    (transient). QLoRA's NF4 linears (torchao's `linear_nf4`) keep only the 4-bit weight and
    dequantise it in forward and backward: two int64 nibble-index tensors and three run-dtype tensors per
    weight, alive together (measured, `NF4_DEQUANT_BYTES`).
    """
    targets = lora_targets(info, opts.target_modules, st.method)
    r, act, p = opts.r, rt.adapter_act_bytes, rt.param_bytes
    st.adapter_params = sum(r * (t.in_features + t.out_features) for t in targets)
    shared_input = (rt.autocast or p == FP32) and opts.lora_dropout == 0
    per_token = 0.0
    for t in targets:
        per_token += act * r + (0 if shared_input else act * t.in_features)
        if opts.lora_dropout > 0:
            per_token += rt.mask_bytes * t.in_features
        if st.method == "dora":
            per_token += 2 * act * t.out_features
    casts = p * st.adapter_params if rt.autocast else 0.0  # A and B cast to bf16, kept for backward
    st.keeps = Keeps(sites={t.site for t in targets} if shared_input else set(), extra_per_token=per_token,
                     extra_fixed=casts)
    if st.method == "dora":
        st.adapter_params += sum(t.out_features for t in targets)
        st.transient_bytes = 2 * FP32 * max(t.in_features * t.out_features for t in targets)
    if st.method == "qlora":
        largest = max((lin.in_features * lin.out_features for lin in info.linears), default=0)
        st.transient_bytes = (NF4_DEQUANT_INDEX_BYTES + NF4_DEQUANT_COPIES * p) * largest
    st.largest_trainable_bytes = FP32 * max(r * max(t.in_features, t.out_features) for t in targets)


def _adapter(st: Strategy, info: ModelInfo, opts: PlanOptions, rt: Runtime) -> None:
    """Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020; parallel: He et al. 2022), as tunelab's
    `adapter`: width m = hidden // 16 by default, ReLU.

    Per adapter: down (hidden -> m) with bias, up (m -> hidden) with bias: 2*h*m + m + h parameters. Kept per
    token: the down projection's input (h) and the ReLU output (m), which ReLU and the up projection share.
    """
    h, act = info.hidden, rt.adapter_act_bytes
    m = opts.bottleneck or max(1, h // 16)
    count = info.layers * ADAPTER_POSITIONS[opts.adapter_variant]
    st.adapter_params = count * (2 * h * m + m + h)
    first_block = "mlp" if opts.adapter_variant == "houlsby" else "none"  # where the first adapter sits
    st.keeps = Keeps(extra_per_token=count * act * (h + m), first_block=first_block)
    st.largest_trainable_bytes = FP32 * h * m


def _prefix(st: Strategy, info: ModelInfo, opts: PlanOptions, rt: Runtime) -> None:
    """Prefix-tuning (Li & Liang 2021): 2 * layers * n * kv_dim fp32 prefixes (no reparameterisation).

    Keys and values are n longer in every layer; the prefixes need an attention mask, under which transformers
    repeats grouped key/value heads (`repeat_kv`) before SDPA, and the (s, n + s) boolean mask is kept.
    """
    n = opts.num_virtual_tokens
    takes = inspect.signature(info.meta_model.forward).parameters
    if not {"past_key_values", "cache"} & set(takes):
        st.unsupported = f"{type(info.meta_model).__name__} takes no key/value cache, which the prefixes need"
    st.adapter_params = 2 * info.layers * n * info.kv_dim
    st.prefix_tokens = n
    st.largest_trainable_bytes = FP32 * st.adapter_params


def _prompt(st: Strategy, info: ModelInfo, opts: PlanOptions, rt: Runtime) -> None:
    """Prompt tuning (Lester et al. 2021): n * hidden fp32 embeddings in front of every sequence, so every
    block runs n more tokens, and the logits cover them before the loop's loss drops them."""
    st.adapter_params = opts.num_virtual_tokens * info.hidden
    st.extra_tokens = opts.num_virtual_tokens
    st.keeps = Keeps(input_grad=True)
    st.largest_trainable_bytes = FP32 * st.adapter_params


def _ia3_defaults(info: ModelInfo) -> tuple[list[str], list[str]]:
    try:
        from tunelab.methods.ia3 import DEFAULT_TARGETS
    except ImportError:  # the method may not be written yet: PEFT's Llama default
        DEFAULT_TARGETS = {}
    return DEFAULT_TARGETS.get(info.model_type, (["k_proj", "v_proj", "down_proj"], ["down_proj"]))


def _matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _ia3(st: Strategy, info: ModelInfo, opts: PlanOptions, rt: Runtime) -> None:
    """(IA)^3 (Liu et al. 2022): a vector scales each attention target's output (out) and each feed-forward
    target's input (in); the scaling multiply keeps the unscaled tensor (model dtype) for the vector's grad."""
    targets, ff = _ia3_defaults(info)
    names = set(find_targets(info.meta_model, targets))
    dims = [lin.in_features if _matches(lin.name, ff) else lin.out_features
            for lin in info.linears if lin.name in names]
    st.adapter_params = sum(dims)
    st.keeps = Keeps(extra_per_token=rt.param_bytes * sum(dims))
    st.largest_trainable_bytes = FP32 * max(dims)


def _bitfit(st: Strategy, info: ModelInfo, opts: PlanOptions, rt: Runtime) -> None:
    """BitFit (Ben Zaken et al. 2022): fp32 deltas of every bias; with norm weights (the only choice for models
    without biases, such as Llama) each norm's hook recomputes the normalised input and keeps it."""
    include_norms = opts.bitfit_include_norms if opts.bitfit_include_norms is not None else info.bias_params == 0
    st.adapter_params = info.bias_params + (info.norm_params if include_norms else 0)
    if include_norms:
        p, h = rt.param_bytes, info.hidden
        upcast = FP32 * h if (info.arch not in ("gpt2", "bert") and p != FP32) else 0  # RMSNorm's fp32 copy
        st.keeps = Keeps(extra_per_token=info.norm_count * (p * h + upcast))
        if opts.bitfit_include_norms is None:
            st.notes.append("the model has no biases: planned with norm weights (--set include_norms=true)")
    widest_bias = max((lin.out_features for lin in info.linears if lin.bias), default=info.hidden)
    st.largest_trainable_bytes = FP32 * max(widest_bias, info.hidden)
