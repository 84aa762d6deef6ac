"""Mixed-adapter batches at inference as one gather and two batched matmuls per module (Punica's BGMV, in PyTorch).

Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving" (arXiv:2310.18547), and Sheng et al. 2023, "S-LoRA: Serving
Thousands of Concurrent LoRA Adapters" (arXiv:2311.03285): keep every loaded adapter's A and B in stacked device
tensors and let each row gather its own, so a batch of 32 rows on 32 adapters costs about what one adapter does.

Per LoRA-family module, a `LoRAStack` holds, for every loaded adapter in the order of `Routing.names` (slot
`i + 1`; slot 0 is the base and holds zeros):
- `a` (slots, r, in) and `b` (slots, out, r) in the activation dtype, ranks padded with zeros to the largest
  (exact: the padded rank directions contribute 0), the scaling alpha/r (or alpha/sqrt(r)) folded into `b`;
- for DoRA, whose adapted output at inference is g * (W x + s B A x) + (1 - g) * bias with the constant
  g = m / ||W + s B A||_c (`Variant.inference_scale`): g folded into `b` too, and `dora` (slots, out) = g - 1.
The rows' slots come from `Routing.slots` (one (batch,) index per batch, shared by every module). A batch whose
rows all use one adapter (`Routing.groups` has one key) skips the gather and multiplies by that slot's A and B.

IA3 keeps a (slots, features) stack of its vectors (slot 0 and adapters it lacks: ones), gathered per row.

A stack is built on first use and cached on the module; a newly loaded adapter is appended to it (its factors
alone are read), and it is rebuilt when an adapter leaves, the device or dtype changes, or any weight it was
built from changes (each tensor's in-place version counter is part of the key, so
`load_state_dict`, an optimizer step or a manual edit are all seen). The path is taken only at inference (no
grad, module in eval mode): training and dropout keep the per-adapter path in `lora_layer`. Modules holding a
PiSSA/OLoRA adapter (whose initial factors are added back for other rows) keep the per-adapter path too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tunelab.modules import in_out_features

LORA_STACK = "_tunelab_lora_stack"
IA3_STACK = "_tunelab_ia3_stack"


@dataclass
class LoRAStack:
    """One module's loaded LoRA-family adapters, stacked by slot (see the module docstring)."""

    key: tuple  # (names, dtype, device): what the stack was built for
    tensors: list[torch.Tensor]  # the weights it was built from; `version` is their in-place versions' sum
    version: int
    a: torch.Tensor  # (slots, r, in)
    b: torch.Tensor  # (slots, out, r), scaling (and DoRA's g) folded in
    dora: torch.Tensor | None  # (slots, out): g - 1 per slot, 0 for plain LoRA and the base; None: no DoRA here


def usable(module: nn.Module) -> bool:
    """Whether this forward may take the stacked path: inference only (no grad, eval mode)."""
    return not torch.is_grad_enabled() and not module.training


def forget(module: nn.Module) -> None:
    """Drop `module`'s cached stacks (an adapter was removed: free its memory now, not at the next batch)."""
    module.__dict__.pop(LORA_STACK, None)
    module.__dict__.pop(IA3_STACK, None)


def _versions(tensors) -> int:
    """Sum of the in-place version counters of `tensors` (changes whenever any of them is written in place)."""
    total = 0
    for t in tensors:
        try:
            total += t._version
        except RuntimeError:  # an inference tensor keeps no counter; it cannot be written outside inference mode
            pass
    return total


def _cached(module: nn.Module, attr: str, key: tuple, build):
    """The stack cached on `module` under `attr` if it was built for `key` from weights unchanged since;
    else `build()`, cached (the old stack is freed first). Costs a few attribute reads per module and forward."""
    held = module.__dict__.get(attr)
    if held is not None and held.key == key and held.version == _versions(held.tensors):
        return held
    module.__dict__.pop(attr, None)
    held = build()
    module.__dict__[attr] = held
    return held


# --- LoRA family -----------------------------------------------------------------------------------------

def _lora_tensors(module: nn.Module) -> list[torch.Tensor]:
    tensors = [module.weight]  # DoRA's g reads it
    for n in module.lora_A:
        tensors += [module.lora_A[n].weight, module.lora_B[n].weight]
    magnitudes = getattr(module, "lora_magnitude_vector", None)
    return tensors + (list(magnitudes.values()) if magnitudes is not None else [])


@torch.no_grad()
def _slots(module: nn.Module, names: tuple[str, ...], dtype, device):
    """Stacked factors of `names` on `module` (zeros for a name it lacks): a (n, r, in), b (n, out, r), and
    dora (n, out) or None when none of them is DoRA here. Ranks are padded to the largest among them."""
    present = [(i, n) for i, n in enumerate(names) if n in module.lora_A]
    rank = max([module.lora_A[n].weight.shape[0] for _, n in present], default=1)
    d_in, d_out = in_out_features(module)
    a = torch.zeros(len(names), rank, d_in, dtype=dtype, device=device)
    b = torch.zeros(len(names), d_out, rank, dtype=dtype, device=device)
    dora = None
    for i, n in present:
        wa, wb = module.lora_A[n].weight, module.lora_B[n].weight  # (r, in), (out, r) fp32
        r = wa.shape[0]
        g = module.lora_variant[n].inference_scale(module, n)  # (out,) or None
        scaled = wb * module.lora_scaling[n]
        if g is not None:
            scaled = scaled * g.to(scaled.dtype)[:, None]
            if dora is None:
                dora = torch.zeros(len(names), d_out, dtype=dtype, device=device)
            dora[i] = (g - 1).to(dtype)
        a[i, :r] = wa.to(dtype)
        b[i, :, :r] = scaled.to(dtype)
    return a, b, dora


def _joined(head, tail):
    """Stacked factors one after the other, ranks padded to the larger; DoRA rows 0 where a part has none."""
    (a1, b1, d1), (a2, b2, d2) = head, tail
    rank = max(a1.shape[1], a2.shape[1])
    a = torch.cat([nn.functional.pad(t, (0, 0, 0, rank - t.shape[1])) for t in (a1, a2)])
    b = torch.cat([nn.functional.pad(t, (0, rank - t.shape[2])) for t in (b1, b2)])
    if d1 is None and d2 is None:
        return a, b, None
    d1 = d1 if d1 is not None else a1.new_zeros(a1.shape[0], b1.shape[1])
    d2 = d2 if d2 is not None else a2.new_zeros(a2.shape[0], b2.shape[1])
    return a, b, torch.cat([d1, d2])


@torch.no_grad()
def _build_lora(module: nn.Module, key: tuple, held: LoRAStack | None = None) -> LoRAStack:
    """The stack for `key`; when `held` was built for a prefix of its names from weights unchanged since (an
    adapter was loaded), only the new names are read and appended, so a load costs one adapter, not all."""
    names, dtype, device = key
    tensors = _lora_tensors(module)
    old = held.key[0] if held is not None else ()
    if held is not None and held.key[1:] == key[1:] and names[:len(old)] == old and \
            held.version == _versions(held.tensors):
        a, b, dora = _joined((held.a, held.b, held.dora), _slots(module, names[len(old):], dtype, device))
        return LoRAStack(key, tensors, _versions(tensors), a, b, dora)
    zero = _slots(module, ("",), dtype, device)  # slot 0, the base: zeros
    a, b, dora = _joined(zero, _slots(module, names, dtype, device))
    return LoRAStack(key, tensors, _versions(tensors), a, b, dora)


def lora_stack(module: nn.Module, names: tuple[str, ...], dtype: torch.dtype, device: torch.device) -> LoRAStack:
    """`module`'s stack for the loaded adapters `names` in `dtype` on `device`, built or taken from the cache."""
    key = (names, dtype, device)
    held = module.__dict__.get(LORA_STACK)
    return _cached(module, LORA_STACK, key, lambda: _build_lora(module, key, held))


def lora_rows(module: nn.Module, x: torch.Tensor, output: torch.Tensor, routing) -> torch.Tensor | None:
    """The module's output with each row's own adapter added: x (batch, ..., in), output (batch, ..., out).

    None when this forward cannot take the stacked path (training, or a PiSSA/OLoRA adapter on the module).
    """
    if not usable(module) or getattr(module, "lora_initial", None):
        return None
    only = next(iter(routing.groups)) if len(routing.groups) == 1 else False
    if only is None:  # every row on the base
        return output
    stack = lora_stack(module, routing.names, output.dtype, output.device)
    xs = x.reshape(x.shape[0], -1, x.shape[-1]).to(output.dtype)  # (batch, tokens, in)
    if only is not False:  # one adapter for the whole batch: no gather
        slot = routing.slot(only)
        y = (xs @ stack.a[slot].T) @ stack.b[slot].T  # (batch, tokens, out)
        g1 = None if stack.dora is None else stack.dora[slot]  # (out,)
    else:
        slots = routing.slots(x.device)  # (batch,)
        a, b = stack.a[slots], stack.b[slots]  # (batch, r, in), (batch, out, r)
        y = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))  # (batch, tokens, out)
        g1 = None if stack.dora is None else stack.dora[slots][:, None, :]  # (batch, 1, out)
    y = y.reshape(output.shape)
    if g1 is None:
        return output + y
    base = output if module.bias is None else output - module.bias.to(output.dtype)  # W x
    return output + y + (g1 * base.reshape(y.shape[0], -1, y.shape[-1])).reshape(output.shape)


# --- IA3 -------------------------------------------------------------------------------------------------

@dataclass
class IA3Stack:
    """One module's IA3 vectors by slot: `v` (slots, features), ones where a slot has no vector here."""

    key: tuple
    tensors: list[torch.Tensor]
    version: int
    v: torch.Tensor


def ia3_scale(box: nn.ParameterDict, module: nn.Module, routing, like: torch.Tensor) -> torch.Tensor | None:
    """Each row's IA3 vector for `like` (batch, ..., features): (batch, 1, ..., features), or (features,) when
    every row has the same adapter; None when no row has an IA3 adapter on this module."""
    only = next(iter(routing.groups)) if len(routing.groups) == 1 else False
    if only is None or (only is not False and only not in box):
        return None
    names, dtype, device = routing.names, like.dtype, like.device
    key = (names, dtype, device)

    @torch.no_grad()
    def build() -> IA3Stack:
        tensors = list(box.values())
        v = torch.ones(len(names) + 1, tensors[0].numel(), dtype=dtype, device=device)
        for slot, n in enumerate(names, 1):
            if n in box:
                v[slot] = box[n].flatten().to(dtype)
        return IA3Stack(key, tensors, _versions(tensors), v)

    stack = _cached(module, IA3_STACK, key, build)
    if only is not False:
        return stack.v[routing.slot(only)]
    rows = stack.v[routing.slots(device)]  # (batch, features)
    return rows.view(rows.shape[0], *([1] * (like.dim() - 2)), rows.shape[1])
