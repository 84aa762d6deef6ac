"""(IA)^3: learned vectors that rescale keys, values and feed-forward activations.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning".
Each target linear gets one vector per adapter name, initialised to ones (the identity):
- an attention target (`k_proj`, `v_proj`; GPT-2's fused `c_attn`, so queries too, as PEFT does) scales its
  output: y = l * (W x + b), l of shape (out, 1);
- a feed-forward target (the down projection) scales its input: y = W (l * x) + b, l of shape (1, in).
Saved in PEFT's IA3 layout (`base_model.model.<module>.ia3_l`), so PEFT loads tunelab's adapters and tunelab
loads PEFT's. Merging multiplies the weight rows (output scaling; the bias too) or columns (input scaling).
"""

from __future__ import annotations

from functools import partial

import torch
from pydantic import model_validator
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods import stacked
from tunelab.methods.base import (
    Method,
    MethodOptions,
    ModulesToSave,
    adapter_state,
    find_targets,
    peft_common,
    register,
    target_matches,
)
from tunelab.methods.kit import (
    applying,
    container,
    drop,
    has_hook,
    hook_once,
    route,
    unhook,
)
from tunelab.methods.precision import in_autocast
from tunelab.modules import in_out_features, is_conv1d

ATTR = "ia3_l"  # PEFT's attribute name, so saved keys read `<module>.ia3_l`
HOOK_IN, HOOK_OUT = "ia3_in", "ia3_out"

# model_type -> (target_modules, feedforward_modules): PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
# and TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING for the decoder and encoder families tunelab loads.
DEFAULT_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
}


class IA3Options(MethodOptions):
    """`--set` options of `ia3`. None means PEFT's default for the model's architecture."""

    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    modules_to_save: ModulesToSave = None

    @model_validator(mode="after")
    def _feedforward_within_targets(self) -> "IA3Options":
        targets, ff = self.target_modules, self.feedforward_modules
        if isinstance(targets, list) and isinstance(ff, list) and not set(ff) <= set(targets):
            extra = sorted(set(ff) - set(targets))
            raise ValueError(f"feedforward_modules must be a subset of target_modules; not in it: {extra}")
        return self


def _scale(module: nn.Module, state, like: torch.Tensor) -> torch.Tensor | None:
    """Product of the applying adapters' vectors: (features,), or (batch, 1, features) in a mixed batch."""
    box = getattr(module, ATTR)
    routing = route(state, like.shape[0])
    if routing is not None and stacked.usable(module):
        return stacked.ia3_scale(box, module, routing, like)
    scale = None
    for name, mask in applying(state, box.keys(), like):
        vec = box[name].flatten()  # (features,)
        if mask is not None:
            vec = 1 + mask * (vec - 1)  # rows of other adapters scale by 1
        scale = vec if scale is None else scale * vec
    return scale


def _scale_output(state, module, args, out):
    scale = _scale(module, state, out)
    return None if scale is None else (out * _like(scale, out)).to(out.dtype)


def _scale_input(state, module, args):
    x = args[0]  # (batch, seq, in_features)
    scale = _scale(module, state, x)
    return None if scale is None else ((x * _like(scale, x)).to(x.dtype), *args[1:])


def _like(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The fp32 scale vector in `x`'s dtype under autocast (no fp32 copy of the activation), else as it is."""
    return scale.to(x.dtype) if in_autocast(x) else scale


def _fold(module: nn.Module, vec: torch.Tensor, feedforward: bool, invert: bool) -> None:
    """Multiply (or divide, when `invert`) `module`'s weight rows/columns, and for output scaling its bias."""
    weight = module.weight
    v = vec.T if is_conv1d(module) else vec  # Conv1D's weight is (in, out): transpose the vector
    new = weight.float() / v if invert else weight.float() * v
    weight.copy_(new.to(weight.dtype))
    if not feedforward and module.bias is not None:
        bias, flat = module.bias, vec.flatten()
        bias.copy_((bias.float() / flat if invert else bias.float() * flat).to(bias.dtype))


@register
class IA3(Method):
    """(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
    Learning"): rescaling vectors on keys, values and feed-forward activations."""

    default_lr = 3e-3  # rescaling vectors start at one and need larger steps (PEFT's IA3 examples)
    name = "ia3"
    family = "selective"
    trains = "rescaling vectors for keys, values and FFN activations"
    paper = ("Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than "
             "In-Context Learning")
    Options = IA3Options
    mergeable = True
    supports_mixed_batch = True
    peft_type = "IA3"
    peft_loadable = True

    def resolve(self, model: nn.Module, options: IA3Options) -> tuple[list[str] | str, list[str] | str]:
        """(target_modules, feedforward_modules) with PEFT's per-architecture defaults filled in."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        targets, ff = options.target_modules, options.feedforward_modules
        default = DEFAULT_TARGETS.get(model_type)
        if default is None and (targets is None or ff is None):
            key = "target_modules" if targets is None else "feedforward_modules"
            raise ConfigError(
                f"ia3: no default {key} for model type {model_type!r} (defaults exist for "
                f"{', '.join(DEFAULT_TARGETS)}); set it, e.g. --set {key}=[k_proj,v_proj,down_proj]"
            )
        if targets is None:
            targets = default[0]
        if ff is None:  # the default feed-forward names among the chosen targets (PEFT needs a subset)
            ff = [f for f in default[1] if isinstance(targets, str) or f in targets]
        return targets, ff

    def attach(self, model: nn.Module, options: IA3Options, name: str) -> list[str]:
        """Add ones-initialised vectors named `name` to the target modules; return them."""
        targets, ff = self.resolve(model, options)
        paths = find_targets(model, targets)
        roles = {path: target_matches(path, ff) for path in paths}  # True: feed-forward (input) scaling
        for path, feedforward in roles.items():
            if has_hook(model.get_submodule(path), HOOK_OUT if feedforward else HOOK_IN):
                side = "output" if feedforward else "input"
                raise ConfigError(f"ia3: module {path} is already scaled on its {side} by another ia3 adapter; "
                                  "feedforward_modules must agree between adapters")
        state = adapter_state(model)
        for path, feedforward in roles.items():
            module = model.get_submodule(path)
            in_f, out_f = in_out_features(module)
            shape = (1, in_f) if feedforward else (out_f, 1)  # PEFT's shapes
            # fp32 vectors whatever the base dtype, on the base weight's device
            vector = nn.Parameter(torch.ones(shape, device=module.weight.device))
            container(module, ATTR, nn.ParameterDict)[name] = vector
            hook = partial(_scale_input if feedforward else _scale_output, state)
            hook_once(module, HOOK_IN if feedforward else HOOK_OUT, hook, pre=feedforward)
        return paths

    def own_trainable(self, model: nn.Module, options: IA3Options) -> int:
        """Analytic count: out_features per attention target, in_features per feed-forward target."""
        targets, ff = self.resolve(model, options)
        paths = find_targets(model, targets)
        return sum(in_out_features(model.get_submodule(p))[0 if target_matches(p, ff) else 1] for p in paths)

    containers = (ATTR,)  # the per-adapter dicts the shared operations read

    def adapter_config(self, model: nn.Module, options: IA3Options, name: str) -> dict:
        """PEFT's IA3Config fields, with the per-architecture defaults resolved."""
        targets, ff = self.resolve(model, options)
        modules = [m for _, m in self.adapted(model, name)]
        return {"peft_type": self.peft_type, **peft_common(model, options),
                "target_modules": targets, "feedforward_modules": ff,
                "fan_in_fan_out": any(is_conv1d(m) for m in modules), "init_ia3_weights": True}

    def options_from_config(self, config: dict) -> IA3Options:
        """Options from an `adapter_config.json` (ours or PEFT's); PEFT's `exclude_modules` is refused."""
        if config.get("exclude_modules"):
            raise ConfigError(f"field 'exclude_modules' = {config['exclude_modules']!r}: not supported by "
                              "tunelab's ia3 (expected null)")
        return super().options_from_config(config)

    def fold(self, model: nn.Module, name: str, merged: bool) -> None:
        """Merge (`merged`) or unmerge adapter `name`: multiply the vectors into the weights, or divide them out."""
        pairs = self.adapted(model, name)
        for path, module in [] if merged else pairs:  # dividing by a zero entry would lose the weights
            if bool((getattr(module, ATTR)[name] == 0).any()):
                raise ConfigError(f"ia3 adapter {name!r} scales module {path} by zero; its merge cannot be undone")
        with torch.no_grad():
            for _, module in pairs:
                _fold(module, getattr(module, ATTR)[name], has_hook(module, HOOK_IN), invert=not merged)

    def detach(self, model: nn.Module, name: str) -> None:
        """Delete adapter `name`'s vectors, and the hooks of modules no other ia3 adapter uses."""
        for _, module in self.adapted(model, name):
            stacked.forget(module)
            if drop(module, ATTR, name):
                unhook(module, HOOK_IN)
                unhook(module, HOOK_OUT)
