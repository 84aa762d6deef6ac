"""LoRA: low-rank adaptation of large language models (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A target linear `W` (out, in) stays frozen; the adapter learns `A` (r, in) and `B` (out, r) and the layer
computes `W x + (alpha / r) * B A x` (rsLoRA, Kalajdzievski 2023: `alpha / sqrt(r)`). `A`, `B` live in
`lora_A` / `lora_B` ModuleDicts (keyed by adapter name) attached as children of the target, and a forward hook
adds the delta, so base parameter names never change. GPT-2's Conv1D stores `W` transposed (in, out); the hook
is the same, only merge transposes. Adapter weights are fp32 whatever the base dtype.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from tunelab.config import parse_model
from tunelab.errors import ArtifactError, ConfigError
from tunelab.methods import heads, register
from tunelab.methods.base import (
    Method, MethodOptions, adapter_module_prefixes, adapter_state, add_adapter, check_loaded, find_targets,
    forget_adapter, linear_like, mark_trainable, peft_key,
)

# Default targets: the attention query/value projections, under the names the common architectures use
# (Llama/Mistral/Qwen, BERT, GPT-2, GPT-NeoX/Falcon, MPT, Phi-3, T5); the first pair the model has wins.
DEFAULT_TARGET_PROBES = (("q_proj", "v_proj"), ("query", "value"), ("c_attn",), ("query_key_value",),
                         ("Wqkv",), ("qkv_proj",), ("q", "v"))

_INIT_TO_PEFT = {"default": True, "gaussian": "gaussian"}
_INIT_FROM_PEFT = {True: "default", False: "default", "gaussian": "gaussian"}  # False: random B, weights are loaded

# PEFT LoraConfig fields of features tunelab's lora does not have, with the values that mean "not used".
_PEFT_UNUSED = {
    "use_dora": (False, None), "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "bias": ("none", None),
    "lora_bias": (False, None), "layers_to_transform": (None, []), "layers_pattern": (None, [], ""),
    "exclude_modules": (None, [], ""), "trainable_token_indices": (None,), "layer_replication": (None,),
    "target_parameters": (None, []), "use_qalora": (False, None), "alora_invocation_tokens": (None,),
    "use_bdlora": (None, False), "arrow_config": (None,), "megatron_config": (None,),
}


class LoRAOptions(MethodOptions):
    """`--set` options of `lora`."""

    r: int = Field(8, gt=0, description="rank of A and B")
    alpha: int | float = Field(16, gt=0, description="scaling numerator: delta = alpha / r * B A x")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] | str | None = Field(
        None, description="module names, a regex (full match), or 'all-linear'; default: attention q/v")
    rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r)")
    init: Literal["default", "gaussian"] = Field(
        "default", description="A: kaiming-uniform (default) or normal std 1/r; B: zeros")
    # Room for DoRA (`use_dora`), PiSSA/OLoRA init (more `init` values) and LoRA+ (`loraplus_lr_ratio`, through
    # `param_groups`): each also loosens `_PEFT_UNUSED` / `_INIT_FROM_PEFT` and extends `adapter_config`.

    @field_validator("target_modules")
    @classmethod
    def _valid_targets(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("expected at least one module name")
        if isinstance(v, str) and v != "all-linear":
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regex ({e})") from None
        return v


def default_target_modules(model: nn.Module) -> list[str]:
    """The attention query/value projections of `model`, found by the names its architecture uses."""
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if linear_like(m)}
    for probe in DEFAULT_TARGET_PROBES:
        if set(probe) <= leaves:
            return list(probe)
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise ConfigError(f"lora: no default target_modules for model type {kind!r}; set target_modules "
                      f"(e.g. all-linear); linear modules here: {', '.join(sorted(leaves)[:8]) or 'none'}")


def resolve_targets(model: nn.Module, options: LoRAOptions) -> list[str]:
    """Qualified names of the modules `options.target_modules` selects (the default when unset)."""
    wanted = options.target_modules if options.target_modules is not None else default_target_modules(model)
    return find_targets(model, wanted)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear-like module; Conv1D stores its weight as (in, out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)


def is_conv1d(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear)


# --- the layer mechanism ---------------------------------------------------------------------------------

def _attach(module: nn.Module, name: str, options: LoRAOptions, state) -> None:
    """Add adapter `name`'s A, B and dropout to `module`; register the hook on the first adapter."""
    if not hasattr(module, "lora_A"):
        for key in ("lora_A", "lora_B", "lora_dropout"):
            module.add_module(key, nn.ModuleDict())
        module.lora_scaling, module.lora_merged = {}, set()
        module._tunelab_state = state
        module._lora_hook = module.register_forward_hook(_lora_hook, with_kwargs=True)
    d_in, d_out = in_out_features(module)
    kw = {"bias": False, "device": module.weight.device, "dtype": torch.float32}
    a, b = nn.Linear(d_in, options.r, **kw), nn.Linear(options.r, d_out, **kw)
    if options.init == "gaussian":
        nn.init.normal_(a.weight, std=1 / options.r)
    else:
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    nn.init.zeros_(b.weight)  # delta starts at zero: the adapted model starts as the base
    module.lora_A[name], module.lora_B[name] = a, b
    module.lora_dropout[name] = nn.Dropout(options.dropout) if options.dropout > 0 else nn.Identity()
    module.lora_scaling[name] = options.alpha / (math.sqrt(options.r) if options.rslora else options.r)


def _delta(module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """scaling * B A dropout(x): (..., in) -> (..., out), computed in fp32."""
    a = module.lora_A[name]
    h = a(module.lora_dropout[name](x.to(a.weight.dtype)))  # (..., r)
    return module.lora_B[name](h) * module.lora_scaling[name]


def _lora_hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    """Add each active, unmerged adapter's delta: x (batch, ..., in) -> output (batch, ..., out)."""
    x = args[0] if args else next(iter(kwargs.values()))
    state = module._tunelab_state
    if state.row_adapters is not None:
        return _mixed_rows(module, x, output, state)
    for n in state.active:
        if n in module.lora_A and n not in module.lora_merged:
            output = output + _delta(module, n, x).to(output.dtype)
    return output


def _mixed_rows(module: nn.Module, x: torch.Tensor, output: torch.Tensor, state) -> torch.Tensor:
    """Mixed-adapter batch: row i gets only adapter rows[i]'s delta (None: the base alone)."""
    rows = state.row_adapters
    if len(rows) != x.shape[0]:
        raise ConfigError(f"row_adapters has {len(rows)} entries, the batch has {x.shape[0]} rows")
    unknown = sorted({r for r in rows if r is not None} - set(state.methods))
    if unknown:
        raise ConfigError(f"row_adapters: unknown adapter {unknown[0]!r}; loaded: {sorted(state.methods)}")
    if module.lora_merged:
        raise ConfigError(f"adapter {sorted(module.lora_merged)[0]!r} is merged into the base weights; "
                          f"unmerge it before serving mixed-adapter batches")
    for n in module.lora_A:
        idx = [i for i, r in enumerate(rows) if r == n]
        if idx:
            index = torch.tensor(idx, device=x.device)
            delta = _delta(module, n, x.index_select(0, index))  # (rows of n, ..., out)
            output = output.index_add(0, index, delta.to(output.dtype))
    return output


def _delta_weight(module: nn.Module, name: str) -> torch.Tensor:
    """scaling * B @ A in the layout of module.weight: (out, in), or (in, out) for Conv1D."""
    delta = module.lora_B[name].weight @ module.lora_A[name].weight * module.lora_scaling[name]  # (out, in)
    return delta.T if is_conv1d(module) else delta


def _adapted(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module carrying LoRA adapter `name`."""
    state = adapter_state(model)
    if state.methods.get(name) != "lora":
        lora = sorted(n for n, m in state.methods.items() if m == "lora")
        raise ConfigError(f"no lora adapter named {name!r} in this model; lora adapters: {lora or 'none'}")
    return [(p, m) for p, m in model.named_modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and name in m.lora_A]


def portable_target_modules(model: nn.Module, options: LoRAOptions, targets: list[str]) -> list[str] | str:
    """`target_modules` for adapter_config.json that selects exactly `targets` under PEFT's matching rules.

    PEFT matches every module type, not only linears, so the user's value is kept only when it selects the same
    set there; otherwise the leaf names, or failing that a regex of the exact paths.
    """
    owned = adapter_module_prefixes(model)
    names = [n for n, _ in model.named_modules() if n and not n.startswith(owned)]
    want = set(targets)

    def selects(spec) -> bool:
        if isinstance(spec, str):
            return {n for n in names if re.fullmatch(spec, n)} == want
        return {n for n in names if any(n == t or n.endswith(f".{t}") for t in spec)} == want

    user = options.target_modules
    if user is not None and user != "all-linear" and selects(user):
        return user
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    return leaves if selects(leaves) else "(" + "|".join(re.escape(t) for t in targets) + ")"


@register
class LoRA(Method):
    """Low-rank adapters beside chosen linear layers (Hu et al. 2021; rsLoRA: Kalajdzievski 2023)."""

    name = "lora"
    family = "reparameterisation"
    trains = "low-rank A, B beside target linears"
    paper = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (arXiv:2106.09685)"
    Options = LoRAOptions
    mergeable = True
    peft_type = "LORA"
    peft_loadable = True

    def inject(self, model: nn.Module, options: LoRAOptions, name: str) -> list[str]:
        """Add LoRA adapter `name` to the target modules, make it active and trainable; return touched modules."""
        targets = resolve_targets(model, options)
        state = adapter_state(model)
        add_adapter(model, self, name, options, targets)
        for path in targets:
            _attach(model.get_submodule(path), name, options, state)
        heads.attach_heads(model, name)
        touched = targets + heads.head_names(model)
        state.targets[name] = touched
        mark_trainable(model, self.parameters(model, name))
        return touched

    def parameters(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        """A and B of every adapted module, and the adapter's classification head copy."""
        params = {}
        for path, m in _adapted(model, name):
            params[f"{path}.lora_A.{name}.weight"] = m.lora_A[name].weight
            params[f"{path}.lora_B.{name}.weight"] = m.lora_B[name].weight
        return {**params, **heads.head_parameters(model, name)}

    def _tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """Live tensors under PEFT's saved keys: `base_model.model.<path>.lora_A.weight` (no adapter name)."""
        out = {}
        for path, m in _adapted(model, name):
            out[peft_key(path, "lora_A.weight")] = m.lora_A[name].weight
            out[peft_key(path, "lora_B.weight")] = m.lora_B[name].weight
        return {**out, **heads.head_tensors(model, name)}

    def state_dict(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        return {k: t.detach() for k, t in self._tensors(model, name).items()}

    @torch.no_grad()
    def load_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor], name: str) -> None:
        expected = self._tensors(model, name)
        source = f"lora adapter {name!r}"
        check_loaded(expected, sd, source)
        extra = sorted(set(sd) - set(expected))
        if extra:
            raise ArtifactError(f"{source}: unexpected keys {', '.join(extra[:5])} (modules this base lacks "
                                f"or the adapter does not target)")
        for key, t in expected.items():
            t.copy_(sd[key])

    def adapter_config(self, model: nn.Module, options: LoRAOptions, name: str) -> dict[str, Any]:
        """PEFT's LoraConfig fields; `PeftModel.from_pretrained` loads the artifact as it is."""
        targets = [p for p, _ in _adapted(model, name)]
        head_paths = heads.head_names(model)
        return {
            "peft_type": self.peft_type, "task_type": "SEQ_CLS" if head_paths else "CAUSAL_LM",
            "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
            "r": options.r, "lora_alpha": options.alpha, "lora_dropout": options.dropout,
            "target_modules": portable_target_modules(model, options, targets),
            "use_rslora": options.rslora, "init_lora_weights": _INIT_TO_PEFT[options.init],
            "bias": "none", "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
            "fan_in_fan_out": any(is_conv1d(model.get_submodule(t)) for t in targets),
            "modules_to_save": sorted({p.rsplit(".", 1)[-1] for p in head_paths}) or None,
            "inference_mode": True,
        }

    def options_from_config(self, config: dict[str, Any]) -> LoRAOptions:
        """Options from an adapter_config.json (PEFT's field names); PEFT features tunelab lacks are refused."""
        for key, unused in _PEFT_UNUSED.items():
            if config.get(key, unused[0]) not in unused:
                raise ConfigError(f"field {key!r} = {config[key]!r}: this LoRA feature is not supported by tunelab "
                                  f"(expected {unused[0]!r})")
        init = config.get("init_lora_weights", True)
        if not isinstance(init, (bool, str)) or init not in _INIT_FROM_PEFT:
            raise ConfigError(f"field 'init_lora_weights' = {init!r}: not supported "
                              f"(expected true, false or 'gaussian')")
        extra = set(config.get("modules_to_save") or ()) - set(heads.HEAD_NAMES)
        if extra:
            raise ConfigError(f"field 'modules_to_save': {sorted(extra)} not supported "
                              f"(only the classification heads {list(heads.HEAD_NAMES)})")
        values = {"r": config.get("r", 8), "alpha": config.get("lora_alpha", 8),
                  "dropout": config.get("lora_dropout", 0.0), "target_modules": config.get("target_modules"),
                  "rslora": config.get("use_rslora", False), "init": _INIT_FROM_PEFT[init]}
        return parse_model(LoRAOptions, values, where="lora options")

    @torch.no_grad()
    def merge(self, model: nn.Module, name: str) -> None:
        """W += scaling * B @ A (transposed for Conv1D) in each target; the adapter then goes inactive."""
        for _, m in _adapted(model, name):
            if name not in m.lora_merged:
                m.weight += _delta_weight(m, name).to(m.weight.dtype)
                m.lora_merged.add(name)
        heads.merge_heads(model, name)
        state = adapter_state(model)
        state.active = tuple(n for n in state.active if n != name)

    @torch.no_grad()
    def unmerge(self, model: nn.Module, name: str) -> None:
        """Subtract the merged delta again and make the adapter active."""
        for _, m in _adapted(model, name):
            if name in m.lora_merged:
                m.weight -= _delta_weight(m, name).to(m.weight.dtype)
                m.lora_merged.discard(name)
        heads.unmerge_heads(model, name)
        state = adapter_state(model)
        if name not in state.active:
            state.active = (*state.active, name)

    def remove(self, model: nn.Module, name: str) -> None:
        """Delete adapter `name` (merged weights stay merged); a module left without adapters loses its hook."""
        for _, m in _adapted(model, name):
            for key in ("lora_A", "lora_B", "lora_dropout"):
                del getattr(m, key)[name]
            m.lora_scaling.pop(name)
            m.lora_merged.discard(name)
            if not len(m.lora_A):
                m._lora_hook.remove()
                for key in ("lora_A", "lora_B", "lora_dropout", "lora_scaling", "lora_merged", "_lora_hook",
                            "_tunelab_state"):
                    delattr(m, key)
        heads.remove_heads(model, name)
        forget_adapter(model, name)

    def expected_trainable(self, model: nn.Module, options: LoRAOptions) -> int:
        """r * (in + out) per target module, plus one copy of the classification head."""
        targets = resolve_targets(model, options)
        return sum(options.r * sum(in_out_features(model.get_submodule(t))) for t in targets) + heads.head_numel(model)
