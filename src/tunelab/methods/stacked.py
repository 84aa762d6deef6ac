"""Mixed-adapter batches at inference as one gather and two batched matmuls per module (Punica's BGMV, in PyTorch).

Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving" (arXiv:2310.18547), and Sheng et al. 2023, "S-LoRA: Serving
Thousands of Concurrent LoRA Adapters" (arXiv:2311.03285): keep every loaded adapter's A and B in stacked device
tensors and let each row gather its own, so a batch of 32 rows on 32 adapters costs about what one adapter does.

Per LoRA-family module, a `LoRAStack` holds, for every loaded adapter in the order of `Routing.names` (slot
`i + 1`; slot 0 is the base and holds zeros):
- `a` (slots, in, r) and `b` (slots, r, out) in the activation dtype (A and B transposed), ranks padded with zeros
  to the largest (exact: the padded rank directions contribute 0), the scaling alpha/r (or alpha/sqrt(r)) folded
  into `b`;
- for DoRA, whose adapted output at inference is g * (W x + s B A x) + (1 - g) * bias with the constant
  g = m / ||W + s B A||_c (`Variant.inference_scale`): g folded into `b` too, and `dora` (slots, out) = g - 1.
The rows' slots come from `Routing.slots` (one (batch,) index per batch, shared by every module). A batch whose
rows all use one adapter (`Routing.only`) skips the gather and multiplies by that slot's A and B.

IA3 keeps a (slots, features) stack of its vectors (slot 0 and adapters it lacks: ones), gathered per row.

A stack is built on first use and cached on the module; a newly loaded adapter is appended to it (its factors
alone are read), and it is rebuilt when an adapter leaves (`forget`), the device or dtype changes, or a weight
it was built from changes. Weight changes are found through the tensors' in-place version counters, so
`load_state_dict`, an optimizer step or a manual edit are all seen whoever makes them; what is read per forward
is only what that forward uses: a batch on one adapter reads the counters of that adapter's A and B (DoRA: also
its magnitude and the base weight, which its g reads), two or four numbers, and the stack is rebuilt when they
moved; a mixed batch reads every counter the stack was built from (one C-level pass, `_version_sum`). A slot
whose weights moved while no batch used it is caught by the first batch that reads it, before any output uses
it. (Inference tensors keep no counter; they cannot be written outside inference mode.) The path is taken only
at inference (no grad, module in eval mode): training and dropout keep the per-adapter path in `lora_layer`.
Modules holding a PiSSA/OLoRA adapter (whose initial factors are added back for other rows) keep the
per-adapter path too.

Per module and forward the uniform branch is two kernels (x A^T, then `addmm` adding (x A^T) B^T to the base
output, scaling already folded into B) and the mixed branch four (two `index_select` gathers, `bmm`, `baddbmm`); the factors are
stored transposed, (slots, in, r) and (slots, r, out), so neither needs a transpose or a copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter

import torch
from torch import nn

from tunelab.modules import in_out_features

LORA_STACK = "_tunelab_lora_stack"
IA3_STACK = "_tunelab_ia3_stack"
_VERSION = attrgetter("_version")


def _counted(tensors) -> list[torch.Tensor]:
    """`tensors` that keep an in-place version counter (an inference tensor keeps none)."""
    return [t for t in tensors if not t.is_inference()]


def _version_sum(tensors: list[torch.Tensor]) -> int:
    """Sum of the in-place version counters of `tensors` (from `_counted`): it grows whenever one is written."""
    return sum(map(_VERSION, tensors))


@dataclass
class LoRAStack:
    """One module's loaded LoRA-family adapters, stacked by slot (see the module docstring)."""

    key: tuple  # (names, dtype, device): what the stack was built for
    parts: list[list[torch.Tensor]]  # per slot, the weights it was built from (slot 0, the base: none)
    versions: list[int]  # per slot, `_version_sum` of its parts when built
    a: torch.Tensor  # (slots, in, r)
    b: torch.Tensor  # (slots, r, out), scaling (and DoRA's g) folded in
    dora: torch.Tensor | None  # (slots, out): g - 1 per slot, 0 for plain LoRA and the base; None: no DoRA here
    tensors: list[torch.Tensor] = field(init=False)  # every slot's parts, one list
    version: int = field(init=False)  # their `_version_sum` when built
    _one: dict[int, tuple] = field(init=False, default_factory=dict, repr=False)  # slot -> (a[slot], b[slot])

    def __post_init__(self):
        self.tensors = [t for part in self.parts for t in part]
        self.version = sum(self.versions)

    def fresh(self, slot: int | None = None) -> bool:
        """Whether no weight slot `slot` (None: any slot) was built from has been written since."""
        if slot is None:
            return _version_sum(self.tensors) == self.version
        return _version_sum(self.parts[slot]) == self.versions[slot]

    def one(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot `slot`'s factors, (in, r) and (r, out): views, made once."""
        if slot not in self._one:
            self._one[slot] = (self.a[slot], self.b[slot])
        return self._one[slot]


def usable(module: nn.Module) -> bool:
    """Whether this forward may take the stacked path: inference only (no grad, eval mode)."""
    return not torch.is_grad_enabled() and not module.training


def forget(module: nn.Module) -> None:
    """Drop `module`'s cached stacks (an adapter was removed: free its memory now, not at the next batch)."""
    module.__dict__.pop(LORA_STACK, None)
    module.__dict__.pop(IA3_STACK, None)


# --- LoRA family -----------------------------------------------------------------------------------------

def _slot_tensors(module: nn.Module, name: str) -> list[torch.Tensor]:
    """The weights adapter `name`'s slot is built from: A, B, and for DoRA its magnitude and the base weight."""
    tensors = [module.lora_A[name].weight, module.lora_B[name].weight]
    magnitudes = getattr(module, "lora_magnitude_vector", None)
    if magnitudes is not None and name in magnitudes:
        tensors += [magnitudes[name], module.weight]  # DoRA's g reads both
    return _counted(tensors)


@torch.no_grad()
def _slots(module: nn.Module, names: tuple[str, ...], dtype, device):
    """Stacked factors of `names` on `module` (zeros for a name it lacks): a (n, in, r), b (n, r, out), and
    dora (n, out) or None when none of them is DoRA here. Ranks are padded to the largest among them."""
    present = [(i, n) for i, n in enumerate(names) if n in module.lora_A]
    rank = max([module.lora_A[n].weight.shape[0] for _, n in present], default=1)
    d_in, d_out = in_out_features(module)
    a = torch.zeros(len(names), d_in, rank, dtype=dtype, device=device)
    b = torch.zeros(len(names), rank, d_out, dtype=dtype, device=device)
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
        a[i, :, :r] = wa.T.to(dtype)
        b[i, :r] = scaled.T.to(dtype)
    return a, b, dora


def _joined(head, tail):
    """Stacked factors one after the other, ranks padded to the larger; DoRA rows 0 where a part has none."""
    (a1, b1, d1), (a2, b2, d2) = head, tail
    rank = max(a1.shape[2], a2.shape[2])
    a = torch.cat([nn.functional.pad(t, (0, rank - t.shape[2])) for t in (a1, a2)])
    b = torch.cat([nn.functional.pad(t, (0, 0, 0, rank - t.shape[1])) for t in (b1, b2)])
    if d1 is None and d2 is None:
        return a, b, None
    d1 = d1 if d1 is not None else a1.new_zeros(a1.shape[0], b1.shape[2])
    d2 = d2 if d2 is not None else a2.new_zeros(a2.shape[0], b2.shape[2])
    return a, b, torch.cat([d1, d2])


@torch.no_grad()
def _build_lora(module: nn.Module, key: tuple, held: LoRAStack | None) -> LoRAStack:
    """The stack for `key`; when `held` was built for a prefix of its names from weights unchanged since (an
    adapter was loaded), only the new names are read and appended, so a load costs one adapter, not all."""
    names, dtype, device = key
    parts = [[]] + [_slot_tensors(module, n) if n in module.lora_A else [] for n in names]
    versions = [_version_sum(p) for p in parts]  # read before the weights are: a write during the build is seen
    old = held.key[0] if held is not None else ()
    if held is not None and held.key[1:] == key[1:] and names[:len(old)] == old and held.fresh():
        a, b, dora = _joined((held.a, held.b, held.dora), _slots(module, names[len(old):], dtype, device))
    else:
        zero = _slots(module, ("",), dtype, device)  # slot 0, the base: zeros
        a, b, dora = _joined(zero, _slots(module, names, dtype, device))
    return LoRAStack(key, parts, versions, a, b, dora)


def lora_stack(module: nn.Module, names: tuple[str, ...], dtype: torch.dtype, device: torch.device,
               slot: int | None = None) -> LoRAStack:
    """`module`'s stack for the loaded adapters `names` in `dtype` on `device`, from the cache when it was built
    for them and no weight of slot `slot` (None: of any slot) has been written since; else built and cached."""
    key = (names, dtype, device)
    held = module.__dict__.get(LORA_STACK)
    if held is not None and held.key == key and held.fresh(slot):
        return held
    module.__dict__.pop(LORA_STACK, None)  # free the old stack before the new one is allocated
    module.__dict__[LORA_STACK] = stack = _build_lora(module, key, held)
    return stack


def lora_rows(module: nn.Module, x: torch.Tensor, output: torch.Tensor, routing) -> torch.Tensor | None:
    """The module's output with each row's own adapter added: x (batch, ..., in), output (batch, ..., out).

    None when this forward cannot take the stacked path (training, or a PiSSA/OLoRA adapter on the module).
    """
    if not usable(module) or module._modules.get("lora_initial"):  # a submodule; getattr's miss raises inside
        return None
    only = routing.only
    if only is None:  # every row on the base
        return output
    dtype, d_in, d_out = output.dtype, x.shape[-1], output.shape[-1]
    xs = x if x.dtype == dtype else x.to(dtype)
    if only is not False:  # one adapter for the whole batch: no gather
        slot = routing.slot(only)
        stack = lora_stack(module, routing.names, dtype, output.device, slot)
        a, b = stack.one(slot)  # (in, r), (r, out)
        base2d = output.reshape(-1, d_out)  # (tokens, out)
        y = torch.addmm(base2d, xs.reshape(-1, d_in) @ a, b)  # W x + B A x
        if stack.dora is not None:  # g (W x + s B A x) + (1 - g) bias = that + (g - 1) W x
            y = y + stack.dora[slot] * _without_bias(module, base2d)
        return y.view(output.shape)
    stack = lora_stack(module, routing.names, dtype, output.device)
    slots = routing.slots(x.device)  # (batch,)
    batch = x.shape[0]
    base3d = output.reshape(batch, -1, d_out)  # (batch, tokens, out)
    # index_select, not a[slots]: the same gather with a fraction of advanced indexing's host work
    h = torch.bmm(xs.reshape(batch, -1, d_in), stack.a.index_select(0, slots))  # (batch, tokens, r)
    y = torch.baddbmm(base3d, h, stack.b.index_select(0, slots))  # (batch, tokens, out)
    if stack.dora is not None:
        y = y + stack.dora.index_select(0, slots)[:, None, :] * _without_bias(module, base3d)
    return y.view(output.shape)


def _without_bias(module: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """W x: the base output less the module's bias."""
    return output if module.bias is None else output - module.bias.to(output.dtype)


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
    only = routing.only
    if only is None or (only is not False and only not in box):
        return None
    key = (routing.names, like.dtype, like.device)
    stack = module.__dict__.get(IA3_STACK)
    if stack is None or stack.key != key or _version_sum(stack.tensors) != stack.version:
        module.__dict__.pop(IA3_STACK, None)
        module.__dict__[IA3_STACK] = stack = _build_ia3(box, key)
    if only is not False:
        return stack.v[routing.slot(only)]
    rows = stack.v.index_select(0, routing.slots(like.device))  # (batch, features)
    return rows.view(rows.shape[0], *([1] * (like.dim() - 2)), rows.shape[1])


@torch.no_grad()
def _build_ia3(box: nn.ParameterDict, key: tuple) -> IA3Stack:
    names, dtype, device = key
    tensors = _counted(box.values())
    version = _version_sum(tensors)
    first = next(iter(box.values()))
    v = torch.ones(len(names) + 1, first.numel(), dtype=dtype, device=device)
    for slot, n in enumerate(names, 1):
        if n in box:
            v[slot] = box[n].flatten().to(dtype)
    return IA3Stack(key, tensors, version, v)
