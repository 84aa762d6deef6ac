"""Bottleneck adapters: a small down projection, a non-linearity and an up projection inside each block.

Variants (`--set variant=...`):
- `houlsby` (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"): serial adapters after the
  attention output projection and after the FFN, before the residual add (and, in BERT, before its LayerNorm):
  h <- h + up(act(down(h))).
- `pfeiffer` (Pfeiffer et al. 2020, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning"):
  one serial adapter, after the FFN only.
- `parallel` (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning"): beside the
  FFN, reading the FFN's input x: FFN(x) + s * up(act(down(x))), s the `scaling` option.
The up projection starts at zero, so an untrained adapter leaves the model's outputs exactly unchanged.

Adapters attach with forward hooks on existing modules found by name inside each numbered block (`PLACEMENTS`);
no model code is copied. Bottleneck adapters are nonlinear, so they cannot be merged into the base weights.

Artifact: PEFT has no bottleneck-adapter type. tunelab writes PEFT's file names (`adapter_config.json` with
`"peft_type": "BOTTLENECK"`, `adapter_model.safetensors` with keys `base_model.model.<module>.bottleneck.down.weight`
and so on); HF PEFT cannot load it, tunelab can.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods.base import Method, MethodOptions, adapter_state, register
from tunelab.methods.kit import applying, container, drop, hook_once, unhook
from tunelab.methods.precision import adapter_input

ATTR, HOOK = "bottleneck", "bottleneck"
SOURCE_HOOK = "bottleneck_ffn_input"
STASH = "_tunelab_ffn_input"  # site.__dict__: the FFN input a source pre-hook saw in this forward
SOURCE = "_tunelab_ffn_source"  # site.__dict__: the module whose pre-hook feeds the site's parallel adapters

# Block layouts, as module paths inside each numbered block (`<...>.<i>.<path>`), tried in order.
# attn_out / ffn_out: modules whose output serial adapters adapt (the sublayer output before its residual add);
# ffn_in: the module whose first input is the FFN's input (parallel adapters read it, add to ffn_out's output).
PLACEMENTS: dict[str, dict[str, str]] = {
    "llama-style": {"attn_out": "self_attn.o_proj", "ffn_out": "mlp", "ffn_in": "mlp"},
    "gpt2-style": {"attn_out": "attn.c_proj", "ffn_out": "mlp", "ffn_in": "mlp"},
    "bert-style": {"attn_out": "attention.output.dense", "ffn_out": "output.dense", "ffn_in": "intermediate"},
}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class AdapterOptions(MethodOptions):
    """`--set` options of `adapter`. The bottleneck is hidden // reduction_factor (16 when neither is set)."""

    variant: Literal["houlsby", "pfeiffer", "parallel"] = "houlsby"
    reduction_factor: int | None = Field(default=None, gt=0)
    bottleneck_size: int | None = Field(default=None, gt=0)
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    scaling: float = 1.0  # s of the parallel variant (He et al. use 4)

    @model_validator(mode="after")
    def _consistent(self) -> "AdapterOptions":
        if self.reduction_factor is not None and self.bottleneck_size is not None:
            raise ValueError("set reduction_factor or bottleneck_size, not both")
        if self.scaling != 1.0 and self.variant != "parallel":
            raise ValueError(f"scaling applies to variant 'parallel' only (variant is {self.variant!r})")
        return self

    def size(self, hidden: int) -> int:
        """The bottleneck width for a model of width `hidden`."""
        return self.bottleneck_size or max(1, hidden // (self.reduction_factor or 16))


class Bottleneck(nn.Module):
    """up(act(down(x))) * scaling, hidden -> size -> hidden; `up` starts at zero, so a new one adds nothing."""

    def __init__(self, hidden: int, size: int, non_linearity: str, parallel: bool, scaling: float):
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(size, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.parallel, self.scaling = parallel, scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, seq, hidden) -> (batch, seq, hidden), in the adapter's dtype (fp32 on a bf16 base)
        return self.up(self.act(self.down(adapter_input(x, self.down.weight.dtype)))) * self.scaling


def _by_block(names: list[str], path: str) -> dict[str, str]:
    """{block prefix: module path} for modules named `<block>.<path>` where the block ends in a number."""
    pattern = re.compile(rf"(.*\.\d+)\.{re.escape(path)}")
    return {m.group(1): n for n in names if (m := pattern.fullmatch(n))}


def _layout(names: list[str]) -> dict[str, str]:
    """The first `PLACEMENTS` layout whose modules all exist; `ConfigError` listing what was looked for."""
    for layout in PLACEMENTS.values():
        if all(_by_block(names, path) for path in layout.values()):
            return layout
    looked = "; ".join(f"{k}: <block>.{v['attn_out']} and <block>.{v['ffn_out']}" for k, v in PLACEMENTS.items())
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n})[:8]
    raise ConfigError(f"adapter: no supported block layout in this model; looked for {looked}; "
                      f"some module names here: {', '.join(leaves) or 'none'}")


def sites(model: nn.Module, variant: str) -> list[tuple[str, str | None]]:
    """(site, FFN-input source or None) module paths for `variant`, in block order.

    A site is the module whose output the adapter adds to. The source is set for parallel adapters whose FFN
    input is not the site's own input (BERT: the input of `intermediate`, added at `output.dense`).
    """
    names = [n for n, _ in model.named_modules()]
    layout = _layout(names)
    ffn_out = _by_block(names, layout["ffn_out"])
    if variant == "parallel":
        ffn_in = _by_block(names, layout["ffn_in"])
        return [(site, None if ffn_in[b] == site else ffn_in[b]) for b, site in ffn_out.items() if b in ffn_in]
    attn_out = _by_block(names, layout["attn_out"]) if variant == "houlsby" else {}
    return [(p, None) for p in sorted([*attn_out.values(), *ffn_out.values()], key=names.index)]


def _hidden_size(model: nn.Module) -> int:
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise ConfigError("adapter: the model's config has no integer hidden_size to size the adapters from")
    return hidden


def _stash_input(site: nn.Module, module: nn.Module, args: tuple) -> None:
    """Pre-hook on a parallel adapter's source: keep the FFN input (batch, seq, hidden) for the site's hook."""
    site.__dict__[STASH] = args[0]


def _adapt(state, module: nn.Module, args: tuple, out):
    """Forward hook on a site: out + sum of the applying adapters, each on the site output h (serial) or on
    the FFN input x (parallel); h and x are (batch, seq, hidden)."""
    x = module.__dict__.pop(STASH, None)  # always taken, so no activation outlives its forward
    h = out[0] if isinstance(out, tuple) else out
    x = args[0] if x is None else x
    box, total = getattr(module, ATTR), None
    for name, mask in applying(state, box.keys(), h):
        adapter = box[name]
        delta = adapter(x if adapter.parallel else h)
        delta = delta if mask is None else mask * delta
        total = delta if total is None else total + delta
    if total is None:
        return None
    new = (h + total).to(h.dtype)
    return (new, *out[1:]) if isinstance(out, tuple) else new


@register
class BottleneckAdapter(Method):
    """Bottleneck adapters: Houlsby et al. 2019 ("Parameter-Efficient Transfer Learning for NLP"), Pfeiffer et
    al. 2020 (AdapterFusion) and the parallel adapter of He et al. 2022 ("Towards a Unified View of
    Parameter-Efficient Transfer Learning")."""

    default_lr = 1e-3  # bottleneck adapters start near identity (Houlsby et al. use 1e-3 to 1e-4)
    name = "adapter"
    family = "additive"
    trains = "small down/up projections inside each block"
    paper = ("Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP; Pfeiffer et al. 2020, "
             "AdapterFusion; He et al. 2022, Towards a Unified View of Parameter-Efficient Transfer Learning")
    Options = AdapterOptions
    mergeable = False
    supports_mixed_batch = True
    # Not a PEFT type (HF PEFT cannot load it: peft_loadable is False); tunelab's loader reads it by this name.
    peft_type = "BOTTLENECK"
    peft_loadable = False

    def attach(self, model: nn.Module, options: AdapterOptions, name: str) -> list[str]:
        """Add adapter `name` at every site of its variant; return the site modules."""
        found, hidden = sites(model, options.variant), _hidden_size(model)
        state = adapter_state(model)
        for site_path, source_path in found:
            site = model.get_submodule(site_path)
            device = next(site.parameters()).device  # fp32 adapter weights whatever the base dtype
            adapter = Bottleneck(hidden, options.size(hidden), options.non_linearity,
                                 options.variant == "parallel", options.scaling).to(device, torch.float32)
            container(site, ATTR, nn.ModuleDict)[name] = adapter
            hook_once(site, HOOK, partial(_adapt, state))
            if source_path is not None:
                site.__dict__[SOURCE] = source = model.get_submodule(source_path)
                hook_once(source, SOURCE_HOOK, partial(_stash_input, site), pre=True)
        return [site for site, _ in found]

    def own_trainable(self, model: nn.Module, options: AdapterOptions) -> int:
        """Analytic count: per site, down (hidden x size + size) and up (size x hidden + hidden)."""
        hidden = _hidden_size(model)
        size = options.size(hidden)
        return len(sites(model, options.variant)) * (2 * hidden * size + size + hidden)

    containers = (ATTR,)  # the per-adapter dicts the shared operations read

    def fold(self, model: nn.Module, name: str, merged: bool) -> None:
        raise ConfigError("method 'adapter' cannot be merged into the base weights: up(act(down(h))) is "
                          "nonlinear; save the adapter and load it on the base instead")

    def detach(self, model: nn.Module, name: str) -> None:
        """Delete adapter `name`, and the hooks no remaining (parallel) adapter needs."""
        for _, site in self.adapted(model, name):
            if drop(site, ATTR, name):
                unhook(site, HOOK)
            source = site.__dict__.get(SOURCE)
            if source is not None and not any(a.parallel for a in getattr(site, ATTR, {}).values()):
                unhook(source, SOURCE_HOOK)
                del site.__dict__[SOURCE]
