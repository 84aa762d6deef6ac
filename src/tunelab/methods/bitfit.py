"""BitFit: train the bias terms only.

Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
Language-models". The biases of the linear layers (nn.Linear, GPT-2's Conv1D) and of the LayerNorms train; the
output layer is left out (a classifier trains whole, through `Method`). To keep the frozen base bit-identical and let several
named adapters share it, each adapter holds *delta* biases, initialised to zero, that a forward hook adds to
the module's output. With `include_norms`, LayerNorm/RMSNorm weights train too, also as deltas: the norm's
output w * n(x) + b becomes (w + dw) * n(x) + b + db, where the hook recomputes n(x), the normalised input.
This is how models without biases (Llama) can use the method at all.

Merge adds the deltas into the base biases and norm weights: the trained biases replace the base ones.

Artifact: PEFT has no BitFit type. tunelab writes PEFT's file names (`adapter_config.json` with
`"peft_type": "BITFIT"`, `adapter_model.safetensors` holding the deltas as `base_model.model.<module>.bitfit_bias`
and `.bitfit_weight`); HF PEFT cannot load it, tunelab can.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods.base import (
    Method, MethodOptions, adapter_module_prefixes, adapter_state, output_head_names, register, target_matches,
)
from tunelab.methods.kit import applying, container, drop, hook_once, unhook
from tunelab.modules import linear_like

BIAS, WEIGHT = "bitfit_bias", "bitfit_weight"  # containers of delta biases / delta norm weights
HOOK = "bitfit"


class BitFitOptions(MethodOptions):
    """`--set` options of `bitfit`."""

    include_norms: bool = False  # also train LayerNorm/RMSNorm weights (as deltas)
    target_modules: list[str] | str | None = None  # restrict to these modules (names or a regex); None: all


def _is_norm(module: nn.Module) -> bool:
    """LayerNorm or RMSNorm, torch's or a model's own class of that name."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _normalized(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """n(x): the norm's output before its learned scale and shift, shaped like `x` (batch, seq, features)."""
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or torch.finfo(x.dtype).eps
    shape = tuple(getattr(norm, "normalized_shape", None) or (x.shape[-1],))
    # HF's RMS norms (some named ...LayerNorm, e.g. T5's) keep `variance_epsilon` and normalise in fp32
    if isinstance(norm, nn.RMSNorm) or hasattr(norm, "variance_epsilon") or "RMSNorm" in type(norm).__name__:
        return F.rms_norm(x.float(), shape, eps=eps).to(x.dtype)
    return F.layer_norm(x, shape, eps=eps)


def _parts(module: nn.Module, options: BitFitOptions) -> tuple[bool, bool]:
    """(trains a delta bias, trains a delta weight) for `module`."""
    if not (linear_like(module) or _is_norm(module)):
        return False, False
    has_bias = isinstance(getattr(module, "bias", None), torch.Tensor)
    norm_weight = isinstance(getattr(module, "weight", None), torch.Tensor) and _is_norm(module)
    has_weight = options.include_norms and norm_weight
    return has_bias, has_weight


def _targets(model: nn.Module, options: BitFitOptions) -> list[tuple[str, nn.Module, bool, bool]]:
    """(path, module, delta bias?, delta weight?) for each module the adapter trains; `ConfigError` if none."""
    skip = tuple(f"{h}." for h in output_head_names(model)) + adapter_module_prefixes(model)
    found = []
    for path, module in model.named_modules():
        if not path or f"{path}.".startswith(skip):  # the output head, and layers inside other adapters
            continue
        if options.target_modules is not None and not target_matches(path, options.target_modules):
            continue
        bias, weight = _parts(module, options)
        if bias or weight:
            found.append((path, module, bias, weight))
    if not found:
        raise ConfigError(_nothing_found(model, options))
    return found


def has_bias_terms(model: nn.Module) -> bool:
    """Whether bitfit finds bias terms to train in `model` with its default options (no `include_norms`)."""
    try:
        return bool(_targets(model, BitFitOptions()))
    except ConfigError:
        return False


def _nothing_found(model: nn.Module, options: BitFitOptions) -> str:
    """The one-line error when no module qualifies, with what to do about it."""
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    if options.target_modules is not None:
        names = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if any(_parts(m, options))})[:8]
        what = "a bias or norm weight" if options.include_norms else "a bias"
        return (f"bitfit: target_modules {options.target_modules!r} matched no linear or norm layer with {what}; "
                f"such modules here: {', '.join(names) or 'none'}")
    if not options.include_norms:
        return (f"bitfit: the model ({model_type}) has no bias terms in its linear or norm layers; "
                "use --set include_norms=true to train its norm weights (as deltas) instead")
    return f"bitfit: the model ({model_type}) has no biases and no LayerNorm/RMSNorm weights to train"


def _add_deltas(state, module, args, out):
    """Forward hook: out + db (+ dw * n(x) on norms) for each applying adapter; out is (batch, seq, features)."""
    biases, weights = getattr(module, BIAS, None), getattr(module, WEIGHT, None)
    names = list(dict.fromkeys([*(biases.keys() if biases is not None else ()),
                                *(weights.keys() if weights is not None else ())]))
    total, normed = None, None
    for name, mask in applying(state, names, out):
        delta = biases[name] if biases is not None and name in biases else 0
        if weights is not None and name in weights:
            normed = _normalized(module, args[0]) if normed is None else normed
            delta = delta + weights[name] * normed
        delta = delta if mask is None else mask * delta
        total = delta if total is None else total + delta
    return None if total is None else (out + total).to(out.dtype)


def _fold(module: nn.Module, biases, weights, name: str, sign: int) -> None:
    """Add (sign 1) or subtract (sign -1) adapter `name`'s deltas into `module`'s bias and weight."""
    for base, box in ((getattr(module, "bias", None), biases), (getattr(module, "weight", None), weights)):
        if box is not None and name in box:
            base.copy_((base.float() + sign * box[name]).to(base.dtype))


@register
class BitFit(Method):
    """BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
    Masked Language-models"): bias terms only, held as per-adapter deltas on a frozen base."""

    default_lr = 1e-3  # bias deltas start at zero (Ben Zaken et al. sweep 1e-4 to 1e-3)
    name = "bitfit"
    family = "selective"
    trains = "bias terms (and norm weights with include_norms)"
    paper = ("Ben Zaken et al. 2022, BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based "
             "Masked Language-models")
    Options = BitFitOptions
    mergeable = True
    supports_mixed_batch = True
    peft_type = None  # written as "BITFIT" (our own type); HF PEFT cannot load it
    peft_loadable = False

    def attach(self, model: nn.Module, options: BitFitOptions, name: str) -> list[str]:
        """Add zero delta biases (and norm weights) named `name`; return the modules they belong to."""
        found = _targets(model, options)
        state = adapter_state(model)
        for _, module, bias, weight in found:
            for wanted, attr, base in ((bias, BIAS, getattr(module, "bias", None)),
                                       (weight, WEIGHT, getattr(module, "weight", None))):
                if wanted:  # fp32 deltas whatever the base dtype, on the base's device
                    box = container(module, attr, nn.ParameterDict)
                    box[name] = nn.Parameter(torch.zeros(base.shape, device=base.device))
            hook_once(module, HOOK, partial(_add_deltas, state))
        return [path for path, *_ in found]

    def own_trainable(self, model: nn.Module, options: BitFitOptions) -> int:
        """Analytic count: every trained bias, and every norm weight with include_norms."""
        return sum((m.bias.numel() if bias else 0) + (m.weight.numel() if weight else 0)
                   for _, m, bias, weight in _targets(model, options))

    containers = (BIAS, WEIGHT)  # the per-adapter dicts the shared operations read

    def fold(self, model: nn.Module, name: str, merged: bool) -> None:
        """Merge (`merged`) or unmerge adapter `name`: add its deltas into the base biases and norm weights,
        or subtract them."""
        with torch.no_grad():
            for _, module in self.adapted(model, name):
                _fold(module, getattr(module, BIAS, None), getattr(module, WEIGHT, None), name, 1 if merged else -1)

    def detach(self, model: nn.Module, name: str) -> None:
        """Delete adapter `name`'s deltas, and the hooks of modules no other bitfit adapter uses."""
        for _, module in self.adapted(model, name):
            if drop(module, BIAS, name) & drop(module, WEIGHT, name):  # `&`: drop from both containers
                unhook(module, HOOK)
