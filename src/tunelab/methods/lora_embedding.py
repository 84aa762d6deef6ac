"""LoRA on embedding layers (`nn.Embedding` targets, e.g. `embed_tokens`), in PEFT's layout.

An embedding `E` (num_embeddings, dim) stays frozen; adapter `name` learns `lora_embedding_A[name]` (r,
num_embeddings) and `lora_embedding_B[name]` (dim, r), held in ParameterDicts on the embedding module itself (so
the saved keys are PEFT's `base_model.model.<path>.lora_embedding_A` / `_B`). The layer computes
`E[x] + scaling * (A.T)[x] @ B.T`: A's columns are looked up like the embedding's rows (same padding index and
norms), then projected by B. As PEFT (and the LoRA paper's code), A starts at zero and B normal, so the adapted
layer starts as the base; dropout does not apply to token ids. An `embed_scale` the module carries (Gemma's
scaled embeddings) scales the adapter's output too.

The embedding shares `lora_scaling`, `lora_merged` and `lora_variant` with the linear layers of
`lora_layer.py`; its own forward hook adds the active adapters (each row's own in a mixed batch). Merging adds
`scaling * (B A).T` (num_embeddings, dim) to the weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ArtifactError
from tunelab.methods.kit import AdapterState, peft_key, route
from tunelab.methods.lora_layer import LORA, Variant

CONTAINERS = ("lora_embedding_A", "lora_embedding_B")


def is_embedding(module: nn.Module) -> bool:
    """Whether LoRA adapts `module` as an embedding layer."""
    return isinstance(module, nn.Embedding)


def attach(module: nn.Embedding, name: str, r: int, alpha: float, rslora: bool, state: AdapterState,
           variant: Variant = LORA) -> None:
    """Add adapter `name`'s A (zeros) and B (normal) to the embedding `module`; the hook comes with the first."""
    if not hasattr(module, CONTAINERS[0]):
        for key in CONTAINERS:
            module.add_module(key, nn.ParameterDict())
        module.lora_scaling, module.lora_merged, module.lora_variant = {}, set(), {}
        module._tunelab_state = state
        module._lora_hook = module.register_forward_hook(_hook)
    kw = {"device": module.weight.device, "dtype": torch.float32}
    module.lora_embedding_A[name] = nn.Parameter(torch.zeros(r, module.num_embeddings, **kw))
    module.lora_embedding_B[name] = nn.Parameter(torch.randn(module.embedding_dim, r, **kw))
    module.lora_scaling[name] = alpha / (math.sqrt(r) if rslora else r)
    module.lora_variant[name] = variant


def detach(module: nn.Embedding, name: str) -> None:
    """Delete adapter `name` from `module`; one left without adapters loses its hook and attributes."""
    for key in CONTAINERS:
        del getattr(module, key)[name]
    module.lora_scaling.pop(name)
    module.lora_variant.pop(name)
    module.lora_merged.discard(name)
    if not len(module.lora_embedding_A):
        module._lora_hook.remove()
        for key in (*CONTAINERS, "lora_scaling", "lora_merged", "lora_variant", "_lora_hook", "_tunelab_state"):
            delattr(module, key)


def drop_saved_base(adapted: list[tuple[str, nn.Module]], sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` without the embedding weights PEFT saves beside an embedding LoRA (`<path>.base_layer.weight`, its
    `save_embedding_layers`), once each is checked to equal the base's: the base stays frozen and shared.

    Raises `ArtifactError` naming the key when the saved embedding differs (a resized or trained vocabulary).
    """
    out = dict(sd)
    for path, module in adapted:
        key = peft_key(path, "base_layer.weight")
        if is_embedding(module) and key in out:
            saved = out.pop(key)
            if saved.shape != module.weight.shape or not torch.equal(saved.to(module.weight.dtype), module.weight):
                raise ArtifactError(f"{key}: the adapter carries embedding weights {tuple(saved.shape)} that differ "
                                    f"from the base model's {tuple(module.weight.shape)} (a resized or trained "
                                    f"vocabulary); tunelab keeps the base frozen, load the adapter on the base it "
                                    f"was saved with")
    return out


def delta_weight(module: nn.Embedding, name: str) -> torch.Tensor:
    """scaling * (B A).T of adapter `name`: (num_embeddings, dim), fp32."""
    return (module.lora_embedding_B[name] @ module.lora_embedding_A[name]).T * module.lora_scaling[name]


@torch.no_grad()
def merge(module: nn.Embedding, name: str) -> None:
    """Fold adapter `name` into the embedding weight (once)."""
    if name not in module.lora_merged:
        module.weight += delta_weight(module, name).to(module.weight.dtype)
        module.lora_merged.add(name)


@torch.no_grad()
def unmerge(module: nn.Embedding, name: str) -> None:
    """Undo `merge` of adapter `name` (nothing when it is not merged)."""
    if name in module.lora_merged:
        module.weight -= delta_weight(module, name).to(module.weight.dtype)
        module.lora_merged.discard(name)


def output(module: nn.Embedding, name: str, ids: torch.Tensor) -> torch.Tensor:
    """scaling * (A.T)[ids] @ B.T: ids (batch, seq) -> (batch, seq, dim), fp32."""
    after_a = F.embedding(ids, module.lora_embedding_A[name].T, padding_idx=module.padding_idx,
                          max_norm=module.max_norm, norm_type=module.norm_type,
                          scale_grad_by_freq=module.scale_grad_by_freq, sparse=module.sparse)  # (batch, seq, r)
    out = after_a @ module.lora_embedding_B[name].T * module.lora_scaling[name]
    scale = getattr(module, "embed_scale", None)
    if scale is not None:
        out = out * (scale.to(out.dtype) if torch.is_tensor(scale) else scale)
    return out


def _hook(module: nn.Embedding, args: tuple, result: torch.Tensor) -> torch.Tensor:
    """Add each active, unmerged adapter's output (each row's own adapter in a mixed batch)."""
    ids, state = args[0], module._tunelab_state
    routing = route(state, ids.shape[0])
    total = result
    for n in module.lora_embedding_A:
        if n in module.lora_merged:
            continue
        if routing is None:
            if n in state.active:
                total = total + output(module, n, ids).to(result.dtype)
            continue
        index = routing.index(n, ids.device)
        if index is not None:
            total = total.index_add(0, index, output(module, n, ids.index_select(0, index)).to(result.dtype))
    return total
