"""The LoRA family's layer mechanism: adapter weights attached to a linear-like module, and one forward hook.

A target (nn.Linear, or GPT-2's Conv1D, whose weight is stored transposed as (in, out)) gets ModuleDicts
`lora_A` / `lora_B` / `lora_dropout` keyed by adapter name, and plain attributes `lora_scaling` (name -> alpha/r
or alpha/sqrt(r)), `lora_merged` (names folded into the weight) and `lora_variant` (name -> the `Variant` that
computes that adapter's output and merges it: plain LoRA here, DoRA in `dora.py`). Adapters initialised from
the base weight (PiSSA, OLoRA: `lora_init.py`) also keep their initial factors in `lora_initial`.

One forward hook per target adds the output of each active, unmerged adapter to the base output. The base output
comes from the module's own forward (or the NF4 forward of `nf4.py`), so the module tree and the base parameter
names never change. Adapter weights are fp32 whatever the base dtype; adapter outputs are computed in fp32 (in the
autocast dtype under autocast: `precision`) and cast to the base output's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods import nf4, stacked
from tunelab.methods.kit import AdapterState, route
from tunelab.methods.precision import adapter_input, in_autocast
from tunelab.modules import in_out_features, is_conv1d


def weight_oi(module: nn.Module) -> torch.Tensor:
    """The base weight as fp32 (out, in), dequantised when stored as NF4. Read only: it may be the weight itself."""
    w = module.weight.detach().to(torch.float32)
    return w.T if is_conv1d(module) else w


def layout(module: nn.Module, w_oi: torch.Tensor) -> torch.Tensor:
    """(out, in) values in the layout and dtype of `module.weight`: transposed for Conv1D."""
    return (w_oi.T if is_conv1d(module) else w_oi).to(module.weight.dtype)


@torch.no_grad()
def add_to_weight(module: nn.Module, delta_oi: torch.Tensor) -> None:
    """weight += delta (out, in), in place; an NF4 weight is dequantised first (it cannot be updated as NF4)."""
    nf4.dequantize(module)
    module.weight += layout(module, delta_oi)


@torch.no_grad()
def set_weight(module: nn.Module, w_oi: torch.Tensor) -> None:
    """weight = w (out, in), in place; an NF4 weight is dequantised first."""
    nf4.dequantize(module)
    module.weight.copy_(layout(module, w_oi))


def delta_weight(module: nn.Module, name: str) -> torch.Tensor:
    """scaling * B @ A of adapter `name`: (out, in), fp32."""
    return module.lora_B[name].weight @ module.lora_A[name].weight * module.lora_scaling[name]


def delta(module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """scaling * B A dropout(x): (..., in) -> (..., out), in fp32 (in the autocast dtype under autocast)."""
    a, drop = module.lora_A[name], module.lora_dropout[name]
    x = adapter_input(x, a.weight.dtype)
    h = a(x if type(drop) is nn.Identity else drop(x))  # (..., r); dropout 0 is an Identity: no call
    return module.lora_B[name](h) * module.lora_scaling[name]


def add_delta(module: nn.Module, name: str, x: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """total + scaling * B A dropout(x), for a plain LoRA adapter: total (..., out).

    Under autocast the scaling multiplies the small (..., r) factor and the addition rides in B's matmul
    (addmm), so no (..., out) temporary is written, scaled and added; elsewhere, exactly `delta` added.
    """
    if not in_autocast(x):
        return total + delta(module, name, x).to(total.dtype)
    h = module.lora_A[name](module.lora_dropout[name](x)) * module.lora_scaling[name]  # (..., r)
    out = torch.addmm(total.reshape(-1, total.shape[-1]), h.reshape(-1, h.shape[-1]), module.lora_B[name].weight.T)
    return out.view(total.shape)


class Variant:
    """How one adapter of a layer computes its output and merges: plain LoRA. DoRA subclasses it.

    `exclusive_merge`: the adapter merges only into a weight no other adapter is merged into (and none merges
    into a weight it is merged into), because its merged form rescales the whole weight.
    """

    exclusive_merge = False

    def output(self, module: nn.Module, name: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to the base output `base` (..., out) for input `x` (..., in)."""
        return delta(module, name, x)

    def inference_scale(self, module: nn.Module, name: str) -> torch.Tensor | None:
        """At inference, the adapted output is g * (W x + s B A x) + (1 - g) * bias for a constant g (out,):
        this g (fp32), or None when it is 1 (plain LoRA). The stacked serving path folds it in (`stacked.py`)."""
        return None

    def merge(self, module: nn.Module, name: str) -> None:
        add_to_weight(module, delta_weight(module, name).detach())

    def unmerge(self, module: nn.Module, name: str) -> None:
        add_to_weight(module, -delta_weight(module, name).detach())

    def detach(self, module: nn.Module, name: str) -> None:
        """Drop what the variant added to `module` for adapter `name`."""


LORA = Variant()


class InitialFactors(nn.Module):
    """A PiSSA/OLoRA adapter's initial A0 (r, in) and B0 (out, r): buffers, never trained, not in state_dict."""

    def __init__(self, a0: torch.Tensor, b0: torch.Tensor):
        super().__init__()
        self.register_buffer("lora_A", a0, persistent=False)
        self.register_buffer("lora_B", b0, persistent=False)


def attach(module: nn.Module, name: str, r: int, alpha: float, rslora: bool, init: str, dropout: float,
           state: AdapterState, variant: Variant = LORA) -> None:
    """Add adapter `name`'s A, B and dropout to `module`; register the hook with the first adapter.

    A starts kaiming-uniform (`default`) or normal with std 1/r (`gaussian`), B at zero, so the adapted layer
    starts as the base. Base-derived inits (`pissa`, `olora`) are written afterwards by `lora_init`.
    """
    if not hasattr(module, "lora_A"):
        for key in ("lora_A", "lora_B", "lora_dropout"):
            module.add_module(key, nn.ModuleDict())
        module.lora_scaling, module.lora_merged, module.lora_variant = {}, set(), {}
        module._tunelab_state = state
        module._lora_hook = module.register_forward_hook(_lora_hook, with_kwargs=True)
    d_in, d_out = in_out_features(module)
    kw = {"bias": False, "device": module.weight.device, "dtype": torch.float32}
    a, b = nn.Linear(d_in, r, **kw), nn.Linear(r, d_out, **kw)
    if init == "gaussian":
        nn.init.normal_(a.weight, std=1 / r)
    elif init == "default":
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    nn.init.zeros_(b.weight)  # delta starts at zero: the adapted model starts as the base
    module.lora_A[name], module.lora_B[name] = a, b
    module.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    module.lora_scaling[name] = alpha / (math.sqrt(r) if rslora else r)
    module.lora_variant[name] = variant


def detach(module: nn.Module, name: str) -> None:
    """Delete adapter `name` from `module`; a module left without adapters loses its hook and attributes."""
    module.lora_variant.pop(name).detach(module, name)
    for key in ("lora_A", "lora_B", "lora_dropout"):
        del getattr(module, key)[name]
    module.lora_scaling.pop(name)
    module.lora_merged.discard(name)
    initial = getattr(module, "lora_initial", None)
    if initial is not None and name in initial:
        del initial[name]
        if not len(initial):
            del module.lora_initial
    stacked.forget(module)
    if not len(module.lora_A):
        module._lora_hook.remove()
        for key in ("lora_A", "lora_B", "lora_dropout", "lora_scaling", "lora_merged", "lora_variant",
                    "_lora_hook", "_tunelab_state"):
            delattr(module, key)


def check_mergeable(module: nn.Module, name: str, path: str) -> None:
    """Refuse to stack a merge onto or under a DoRA merge (DoRA's merged form rescales the whole weight)."""
    if name in module.lora_merged:
        return
    exclusive = sorted(n for n in module.lora_merged if module.lora_variant[n].exclusive_merge)
    if exclusive or (module.lora_variant[name].exclusive_merge and module.lora_merged):
        other = (exclusive or sorted(module.lora_merged))[0]
        raise ConfigError(f"module {path}: adapter {other!r} is merged into its weight and adapter {name!r} "
                          f"cannot be merged on top of it (DoRA rescales the whole weight); unmerge {other!r} first")


def merge(module: nn.Module, name: str) -> None:
    """Fold adapter `name` into `module.weight` (once; `check_mergeable` first)."""
    if name not in module.lora_merged:
        module.lora_variant[name].merge(module, name)
        module.lora_merged.add(name)


def unmerge(module: nn.Module, name: str) -> None:
    """Undo `merge` of adapter `name` (nothing when it is not merged)."""
    if name in module.lora_merged:
        module.lora_variant[name].unmerge(module, name)
        module.lora_merged.discard(name)


def _lora_hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    """Add each active, unmerged adapter's output: x (batch, ..., in) -> output (batch, ..., out)."""
    x = args[0] if args else next(iter(kwargs.values()))
    state = module._tunelab_state
    routing = route(state, x.shape[0])
    if routing is not None:
        stacked_out = stacked.lora_rows(module, x, output, routing)
        return _mixed_rows(module, x, output, routing) if stacked_out is None else stacked_out
    total = output
    for n in state.active:
        if n in module.lora_A and n not in module.lora_merged:
            variant = module.lora_variant[n]
            if variant is LORA:
                total = add_delta(module, n, x, total)
            else:
                total = total + variant.output(module, n, x, output).to(output.dtype)
    # a submodule: `_modules.get`, not getattr, whose miss (the usual case) raises inside nn.Module.__getattr__
    for n in module._modules.get("lora_initial") or ():
        if n not in state.active and n not in module.lora_merged:
            total = total + _initial_output(module, n, x).to(output.dtype)
    return total


def _initial_output(module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """scaling * B0 A0 x: the part of the base weight a PiSSA/OLoRA adapter took out (added back while it is off)."""
    f = module.lora_initial[name]
    return (adapter_input(x, f.lora_A.dtype) @ f.lora_A.T @ f.lora_B.T) * module.lora_scaling[name]  # (..., out)


def _mixed_rows(module: nn.Module, x: torch.Tensor, output: torch.Tensor, routing) -> torch.Tensor:
    """Mixed-adapter batch (checked by `route`): each row gets only its own adapter's output (None: the base)."""
    total = output
    for n in module.lora_A:
        index = routing.index(n, x.device)
        if index is not None:
            out = module.lora_variant[n].output(module, n, x.index_select(0, index), output.index_select(0, index))
            total = total.index_add(0, index, out.to(output.dtype))  # (rows of n, ..., out)
    for n in getattr(module, "lora_initial", ()):
        index = routing.others(n, x.device)
        if index is not None:
            total = total.index_add(0, index, _initial_output(module, n, x.index_select(0, index)).to(output.dtype))
    return total
