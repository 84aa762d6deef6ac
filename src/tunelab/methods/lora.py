"""LoRA: low-rank adaptation of large language models (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A target linear `W` (out, in) stays frozen; the adapter learns `A` (r, in) and `B` (out, r) and the layer
computes `W x + (alpha / r) * B A x` (rsLoRA, Kalajdzievski 2023: `alpha / sqrt(r)`). The layer mechanism (A, B
in ModuleDicts keyed by adapter name, one forward hook, merging) is in `lora_layer.py`; base-derived inits
(`init=pissa`, `pissa_niter_K`, `olora`) in `lora_init.py`. GPT-2's Conv1D stores `W` transposed (in, out); only
weight updates transpose. Adapter weights are fp32 whatever the base dtype.

LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv:2402.12354):
`loraplus_lr_ratio` gives the B matrices the learning rate `lr * ratio` (through `param_groups`; the model is
unchanged).

`LoRAFamily` holds the `Method` operations that `lora`, `dora` (`dora.py`) and `qlora` (`qlora.py`) share; each
of them is a direct `Method` subclass that mixes it in and differs in its per-layer `variant`, `setup_layer` and
a few class attributes.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods import heads, lora_embedding, lora_init, lora_layer, lora_select, nf4
from tunelab.methods.base import (
    Method, MethodOptions, ModulesToSave, adapter_module_prefixes, adapter_state, find_targets, modules_from_config,
    peft_common, register, target_matches,
)
from tunelab.modules import in_out_features, is_conv1d, linear_like
from tunelab.validation import parse_model

__all__ = ["LoRA", "LoRAFamily", "LoRAOptions", "RandomInitOptions", "default_target_modules", "resolve_targets",
           "portable_selection"]

# Default targets: the attention query/value projections, under the names the common architectures use
# (Llama/Mistral/Qwen, BERT, GPT-2, GPT-NeoX/Falcon, MPT, Phi-3, T5); the first pair the model has wins.
DEFAULT_TARGET_PROBES = (("q_proj", "v_proj"), ("query", "value"), ("c_attn",), ("query_key_value",),
                         ("Wqkv",), ("qkv_proj",), ("q", "v"))

# PEFT LoraConfig fields of features the LoRA family does not have, with the values that mean "not used".
_PEFT_UNUSED = {
    "use_dora": (False, None), "bias": ("none", None),
    "lora_bias": (False, None), "trainable_token_indices": (None,), "layer_replication": (None,),
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
    init: str = Field("default", description="A/B init: default (kaiming-uniform A, zero B), gaussian (normal "
                                             "std 1/r A), pissa, pissa_niter_<K> (fast SVD) or olora")
    loraplus_lr_ratio: float | None = Field(None, gt=0, description="LoRA+: B matrices train with lr * ratio")
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="module name pattern -> its rank")
    alpha_pattern: dict[str, int | float] = Field(default_factory=dict, description="module name pattern -> alpha")
    layers_to_transform: list[int] | int | None = Field(None, description="only the blocks of these indices")
    layers_pattern: list[str] | str | None = Field(None, description="the block list's name (layers, h, ...)")
    exclude_modules: list[str] | str | None = Field(None, description="module names or a regex never adapted")
    modules_to_save: ModulesToSave = None

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _valid_patterns(cls, v: dict):
        for key, value in v.items():
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(f"pattern {key!r} is not a valid regex ({e})") from None
            if value <= 0:
                raise ValueError(f"pattern {key!r}: expected a positive value, found {value}")
        return v

    @field_validator("layers_to_transform")
    @classmethod
    def _valid_layers(cls, v):
        if v == []:
            return None  # PEFT: an empty list selects every layer
        if any(i < 0 for i in ([v] if isinstance(v, int) else v or [])):
            raise ValueError(f"expected layer indices >= 0, found {v}")
        return v

    @model_validator(mode="after")
    def _layers_fit_targets(self):
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern applies only together with layers_to_transform")
        if self.layers_to_transform is not None and isinstance(self.target_modules, str) \
                and self.target_modules != "all-linear":
            raise ValueError("layers_to_transform applies to a list of module names, not to a regex "
                             "target_modules (as in PEFT)")
        if (self.rank_pattern or self.alpha_pattern) and lora_init.from_base(self.init):
            raise ValueError(f"rank_pattern / alpha_pattern are not supported with init={self.init}")
        return self

    def rank_alpha(self, path: str) -> tuple[int, int | float]:
        """(rank, alpha) of the module at `path`: the first matching `rank_pattern` / `alpha_pattern`, else r, alpha."""
        return (lora_select.pattern_value(self.rank_pattern, path, self.r),
                lora_select.pattern_value(self.alpha_pattern, path, self.alpha))

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

    @field_validator("init")
    @classmethod
    def _valid_init(cls, v: str) -> str:
        if not lora_init.INIT_PATTERN.fullmatch(v):
            raise ValueError(f"expected {lora_init.INIT_CHOICES}, found {v!r}")
        return v


class RandomInitOptions(LoRAOptions):
    """Options of the LoRA-family methods whose A starts random (dora, qlora): no base-derived init."""

    @field_validator("init")
    @classmethod
    def _random_init(cls, v: str) -> str:
        if v not in ("default", "gaussian"):
            raise ValueError(f"expected default or gaussian (pissa and olora are lora's), found {v!r}")
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
    """Qualified names of the modules `options.target_modules` selects (the default when unset), less those that
    `layers_to_transform` and `exclude_modules` leave out (`lora_select`)."""
    wanted = options.target_modules if options.target_modules is not None else default_target_modules(model)
    # embedding layers only when named (all-linear never selects one); which methods take them: `_check_targets`
    adaptable = linear_like if wanted == "all-linear" else (lambda m: linear_like(m) or lora_embedding.is_embedding(m))
    return lora_select.kept(find_targets(model, wanted, adaptable), options, wanted)


def portable_selection(model: nn.Module, options: LoRAOptions, targets: list[str]) -> dict[str, Any]:
    """adapter_config.json's `target_modules` and its filters, selecting exactly `targets` under PEFT's rules."""
    owned = adapter_module_prefixes(model)
    names = [n for n, _ in model.named_modules() if n and not n.startswith(owned)]
    return lora_select.portable_fields(names, options, targets)


def _init_from_peft(value) -> str:
    """PEFT's `init_lora_weights` as a tunelab `init` (false: random B; the weights are loaded anyway)."""
    if isinstance(value, bool):
        return "default"
    if isinstance(value, str) and value != "default" and lora_init.INIT_PATTERN.fullmatch(value):
        return value
    raise ConfigError(f"field 'init_lora_weights' = {value!r}: not supported "
                      f"(expected true, false, 'gaussian', 'pissa', 'pissa_niter_<K>' or 'olora')")


class LoRAFamily:
    """The `Method` operations of the LoRA family (lora, dora, qlora), mixed into each as `(LoRAFamily, Method)`.

    Class attributes a member sets: `variant` (the per-layer behaviour, `lora_layer.Variant`), `use_dora`
    (adapter_config.json's field), `on_nf4_base` (whether it may adapt layers whose weight is NF4), and
    `peft_fields` (PEFT feature fields its `options_from_config` accepts).
    """

    variant: ClassVar[lora_layer.Variant] = lora_layer.LORA
    use_dora: ClassVar[bool] = False
    on_nf4_base: ClassVar[bool] = False
    on_embeddings: ClassVar[bool] = False
    peft_fields: ClassVar[frozenset[str]] = frozenset()
    containers: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", *lora_embedding.CONTAINERS)

    def attach(self, model: nn.Module, options: LoRAOptions, name: str) -> list[str]:
        """Add adapter `name`'s A, B (and the variant's weights) to the target modules; return the targets."""
        targets = resolve_targets(model, options)
        self._check_targets(model, targets, options)
        state = adapter_state(model)
        for path in targets:
            module = model.get_submodule(path)
            r, alpha = options.rank_alpha(path)
            if lora_embedding.is_embedding(module):
                lora_embedding.attach(module, name, r, alpha, options.rslora, state, self.variant)
                continue
            lora_layer.attach(module, name, r, alpha, options.rslora, options.init, options.dropout, state,
                              self.variant)
            self.setup_layer(module, name, options)
        return targets

    def _check_targets(self, model: nn.Module, targets: list[str], options: LoRAOptions) -> None:
        """Refuse, before anything changes, targets this adapter cannot take."""
        for path in targets:
            module = model.get_submodule(path)
            if lora_embedding.is_embedding(module) and (not self.on_embeddings or lora_init.from_base(options.init)):
                why = f"init={options.init}" if self.on_embeddings else f"method '{self.name}' (only lora's)"
                raise ConfigError(f"target_modules {options.target_modules!r} selects {path}, an embedding layer: "
                                  f"LoRA on embedding layers is not supported with {why}")
            if nf4.is_quantized(module) and not self.on_nf4_base:
                raise ConfigError(f"module {path}: its weight is NF4-quantised for qlora; adapters of method "
                                  f"'{self.name}' would train on the quantised base, use method qlora")
            owner = next(iter(getattr(module, "lora_initial", {})), None)
            if owner is not None:
                raise ConfigError(f"module {path}: adapter {owner!r} (pissa/olora init) replaced its weight by a "
                                  f"residual; it cannot take other LoRA adapters")
        lora_init.check_targets(model, targets, options.init, options.r)

    def setup_layer(self, module: nn.Module, name: str, options: LoRAOptions) -> None:
        """Per-layer step after A and B are attached: the base-derived inits."""
        if lora_init.from_base(options.init):
            lora_init.init_from_base(module, name, options.init)

    def saved(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """PEFT's saved layout; a PiSSA/OLoRA adapter as the rank-2r plain LoRA of the original base."""
        sd = {k: t.detach() for k, t in self.tensors(model, name).items()}
        return lora_init.to_plain_lora(self.adapted(model, name), name, sd)

    def load_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor], name: str) -> None:
        """Load a saved adapter; a PiSSA/OLoRA adapter also takes the initial factors its file carries."""
        adapted = self.adapted(model, name)
        sd, initial = lora_init.from_plain_lora(adapted, name, lora_embedding.drop_saved_base(adapted, sd))
        super().load_state_dict(model, sd, name)
        lora_init.adopt_initial(name, initial)

    def param_groups(self, model: nn.Module, name: str, lr: float, weight_decay: float) -> list[dict]:
        """One group; with `loraplus_lr_ratio` (LoRA+), the B matrices in a second group at lr * ratio."""
        params = {k: p for k, p in self.parameters(model, name).items() if p.requires_grad}
        ratio = adapter_state(model).options[name].loraplus_lr_ratio
        if ratio is None:
            return [{"params": list(params.values()), "lr": lr, "weight_decay": weight_decay}]
        is_b = {k: f".lora_B.{name}." in k or k.endswith(f".lora_embedding_B.{name}") for k in params}
        return [{"params": [p for k, p in params.items() if not is_b[k]], "lr": lr, "weight_decay": weight_decay},
                {"params": [p for k, p in params.items() if is_b[k]], "lr": lr * ratio, "weight_decay": weight_decay}]

    def adapter_config(self, model: nn.Module, options: LoRAOptions, name: str) -> dict[str, Any]:
        """PEFT's LoraConfig fields; `PeftModel.from_pretrained` loads the artifact as it is."""
        targets = [p for p, _ in self.adapted(model, name)]
        config = {
            "peft_type": "LORA", **peft_common(model, options),
            "r": options.r, "lora_alpha": options.alpha, "lora_dropout": options.dropout,
            **portable_selection(model, options, targets),
            "use_rslora": options.rslora, "init_lora_weights": "gaussian" if options.init == "gaussian" else True,
            "bias": "none", "use_dora": self.use_dora, "rank_pattern": dict(options.rank_pattern),
            "alpha_pattern": dict(options.alpha_pattern),
            "fan_in_fan_out": any(is_conv1d(model.get_submodule(t)) for t in targets),
        }
        return lora_init.converted_config(config, options.init, options.rslora)

    def options_from_config(self, config: dict[str, Any]) -> LoRAOptions:
        """Options from an adapter_config.json (PEFT's field names); PEFT features tunelab lacks are refused."""
        for key, unused in _PEFT_UNUSED.items():
            if key not in self.peft_fields and config.get(key, unused[0]) not in unused:
                raise ConfigError(f"field {key!r} = {config[key]!r}: this LoRA feature is not supported by "
                                  f"tunelab's {self.name} (expected {unused[0]!r})")
        values = {"modules_to_save": modules_from_config(config), "r": config.get("r", 8), "alpha": config.get("lora_alpha", 8),
                  "dropout": config.get("lora_dropout", 0.0), "target_modules": config.get("target_modules"),
                  "rslora": config.get("use_rslora", False),
                  "init": _init_from_peft(config.get("init_lora_weights", True)),
                  "rank_pattern": config.get("rank_pattern") or {}, "alpha_pattern": config.get("alpha_pattern") or {},
                  **{k: None if config.get(k) in (None, [], "") else config[k]
                     for k in ("layers_to_transform", "layers_pattern", "exclude_modules")}}
        return parse_model(self.Options, values, where=f"{self.name} options")

    def matches_config(self, config: dict[str, Any]) -> bool:
        """A PEFT LORA config is this method's when its `use_dora` flag is this method's."""
        return bool(config.get("use_dora")) == self.use_dora

    @torch.no_grad()
    def fold(self, model: nn.Module, name: str, merged: bool) -> None:
        """Fold the adapter into each target's weight (an NF4 weight is dequantised), or take it out again."""
        adapted = self.adapted(model, name)
        for path, m in adapted if merged else ():
            lora_layer.check_mergeable(m, name, path)  # all checks first: a refused merge changes nothing
            tied = heads.tied_elsewhere(model, path) if lora_embedding.is_embedding(m) else None
            if tied is not None:
                raise ConfigError(f"module {path}: its weight is tied to {tied} (tie_word_embeddings), so merging "
                                  f"adapter {name!r} into it would change both; serve the adapter unmerged")
        for _, m in adapted:
            layer = lora_embedding if lora_embedding.is_embedding(m) else lora_layer
            (layer.merge if merged else layer.unmerge)(m, name)

    def detach(self, model: nn.Module, name: str) -> None:
        """Delete the adapter's layers (merged weights stay merged; a PiSSA/OLoRA residual gets its principal
        part back)."""
        for _, m in self.adapted(model, name):
            lora_init.restore_base(m, name)
            (lora_embedding if lora_embedding.is_embedding(m) else lora_layer).detach(m, name)

    def own_trainable(self, model: nn.Module, options: LoRAOptions) -> int:
        """r * (in + out) per target module (r from `rank_pattern` where one matches)."""
        return sum(options.rank_alpha(t)[0] * sum(in_out_features(model.get_submodule(t)))
                   for t in resolve_targets(model, options))


@register
class LoRA(LoRAFamily, Method):
    """Low-rank adapters beside chosen linear layers (Hu et al. 2021; rsLoRA: Kalajdzievski 2023; LoRA+: Hayou
    et al. 2024; PiSSA: Meng et al. 2024; OLoRA: Büyükakyüz 2024)."""

    name = "lora"
    family = "reparameterisation"
    trains = "low-rank A, B beside target linears"
    paper = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (arXiv:2106.09685)"
    Options = LoRAOptions
    mergeable = True
    supports_mixed_batch = True
    peft_type = "LORA"
    peft_loadable = True
    on_embeddings = True  # `nn.Embedding` targets (PEFT's lora_embedding_A/B); dora and qlora refuse them
