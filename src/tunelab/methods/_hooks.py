"""Plumbing for methods that keep per-name weights on existing modules and act through forward hooks
(`ia3`, `bitfit`, `adapter`).

A method stores its weights for one module in container children (`nn.ParameterDict` / `nn.ModuleDict` keyed by
adapter name), registers one hook on that module however many adapters share it, and asks `applying` on each
forward which of its adapters apply: the active ones, or, in a mixed-adapter batch, each row's own adapter.
Merged adapters are skipped (their effect is already in the base weights). For classification models every
adapter also trains its own copy of the head (`tunelab.methods.heads`), included in its parameters, its saved
weights, merge and remove by the helpers below.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from tunelab.errors import ArtifactError, ConfigError
from tunelab.methods import heads
from tunelab.methods.base import (
    AdapterState, Method, MethodOptions, adapter_state, add_adapter, check_loaded, forget_adapter, mark_trainable,
    peft_key,
)

HOOKS_ATTR = "_tunelab_hooks"  # module.__dict__ entry: hook key -> RemovableHandle
MERGED_ATTR = "tunelab_merged"  # model.__dict__ entry: names of hook-method adapters merged into the base


# --- containers and hooks ---------------------------------------------------------------------------------

def container(module: nn.Module, attr: str, kind: type[nn.Module] = nn.ParameterDict) -> nn.Module:
    """`module.<attr>`, the per-adapter-name dict of one method's weights, created empty on first use."""
    held = getattr(module, attr, None)
    if held is None:
        setattr(module, attr, held := kind())
    elif not isinstance(held, kind):
        raise ConfigError(f"module {type(module).__name__} already has an attribute {attr!r} of its own; "
                          "this method cannot attach to it")
    return held


def drop(module: nn.Module, attr: str, name: str) -> bool:
    """Delete adapter `name` from `module.<attr>`; delete the container once empty. True if none is left."""
    box = getattr(module, attr, None)
    if box is None:
        return True
    if name in box:
        del box[name]
    if len(box) == 0:
        delattr(module, attr)
        return True
    return False


def hook_once(module: nn.Module, key: str, fn: Callable, *, pre: bool = False) -> None:
    """Register `fn` as `module`'s forward hook (or pre-hook when `pre`) under `key`, once."""
    hooks = module.__dict__.setdefault(HOOKS_ATTR, {})
    if key not in hooks:
        hooks[key] = module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn)


def has_hook(module: nn.Module, key: str) -> bool:
    """Whether a hook is registered on `module` under `key`."""
    return key in module.__dict__.get(HOOKS_ATTR, {})


def unhook(module: nn.Module, key: str) -> None:
    """Remove the hook registered under `key` (if any)."""
    hooks = module.__dict__.get(HOOKS_ATTR, {})
    handle = hooks.pop(key, None)
    if handle is not None:
        handle.remove()
    if not hooks:
        module.__dict__.pop(HOOKS_ATTR, None)


def matches(qname: str, patterns: str | list[str]) -> bool:
    """Whether `qname` matches `patterns` by `find_targets`' rule (regex full match, or name / `.name` suffix)."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, qname) is not None
    return any(qname == t or qname.endswith("." + t) for t in patterns)


# --- which adapters apply to a forward ------------------------------------------------------------------

def merged_names(model: nn.Module) -> set[str]:
    """The names of adapters merged into `model`'s base weights (a live set the hooks read)."""
    return model.__dict__.setdefault(MERGED_ATTR, set())


def applying(
    state: AdapterState, merged: set[str], names: Iterable[str], like: torch.Tensor
) -> list[tuple[str, torch.Tensor | None]]:
    """The adapters among `names` that apply to this forward, each with its row mask.

    Without `state.row_adapters`: every active, unmerged name, with mask None (the whole batch).
    With it (one adapter name or None per batch row of `like`): each name some row uses, with a mask of
    shape (batch, 1, ..., 1) in `like`'s dtype and rank, 1.0 on that adapter's rows and 0.0 elsewhere.
    """
    rows = state.row_adapters
    if rows is None:
        return [(n, None) for n in names if n in state.active and n not in merged]
    if len(rows) != like.shape[0]:
        raise ConfigError(f"row_adapters has {len(rows)} entries, the batch has {like.shape[0]} rows")
    out = []
    for n in names:
        hit = [r == n for r in rows]
        if any(hit):
            if n in merged:
                raise ConfigError(f"adapter {n!r} is merged into the base weights; "
                                  "unmerge it before serving mixed-adapter batches")
            mask = torch.tensor(hit, dtype=like.dtype, device=like.device)
            out.append((n, mask.view(-1, *([1] * (like.dim() - 1)))))
    return out


# --- adapter lifecycle -----------------------------------------------------------------------------------

def begin_inject(model: nn.Module, method: Method, name: str, options: MethodOptions, paths: list[str]) -> None:
    """Record adapter `name` (the only active adapter now) with its module paths and the classification heads."""
    add_adapter(model, method, name, options, [*paths, *heads.head_names(model)])


def end_inject(model: nn.Module, method: Method, name: str) -> None:
    """Give adapter `name` its classification-head copy, then make exactly its parameters trainable."""
    heads.attach_heads(model, name)
    mark_trainable(model, method.parameters(model, name))


def adapted(model: nn.Module, name: str, method: Method) -> list[tuple[str, nn.Module]]:
    """(path, module) of the modules holding weights of adapter `name` in one of `method.containers`.

    Raises `ConfigError` unless `name` is an adapter of `method`.
    """
    state = adapter_state(model)
    if state.methods.get(name) != method.name:
        have = ", ".join(f"{n} ({m})" for n, m in state.methods.items()) or "none"
        raise ConfigError(f"no {method.name} adapter named {name!r} on this model; adapters: {have}")
    out = []
    for path in state.targets[name]:
        module = model.get_submodule(path)
        if any(name in getattr(module, attr, {}) for attr in method.containers):
            out.append((path, module))
    return out


def set_merged(model: nn.Module, name: str, merged: bool) -> None:
    """Record adapter `name` as merged (it leaves the active set) or unmerged (it rejoins it).

    Raises `ConfigError` when it already is in that state: call it before changing any weight.
    """
    state, names = adapter_state(model), merged_names(model)
    if (name in names) == merged:
        raise ConfigError(f"adapter {name!r} is {'already' if merged else 'not'} merged into the base weights")
    if merged:
        names.add(name)
        state.active = tuple(n for n in state.active if n != name)
    else:
        names.discard(name)
        state.active = state.active if name in state.active else (*state.active, name)


def finish_remove(model: nn.Module, name: str) -> None:
    """Drop adapter `name`'s head copies and its record (merged weights stay merged)."""
    heads.remove_heads(model, name)
    merged_names(model).discard(name)
    forget_adapter(model, name)


# --- weights: parameters, saved keys, loading -----------------------------------------------------------

def adapter_weights(model: nn.Module, name: str, method: Method):
    """(qualified name in `model`, PEFT saved key, parameter) for each weight of adapter `name` (head excluded).

    In container `attr` (one of `method.containers`) of the module at `path`, a Parameter per name is
    `<path>.<attr>.<name>`, saved as `<path>.<attr>`; a Module per name holds `<path>.<attr>.<name>.<param>`,
    saved as `<path>.<attr>.<param>`: PEFT's layout, the adapter name dropped from saved keys.
    """
    out = []
    for path, module in adapted(model, name, method):
        for attr in method.containers:
            box = getattr(module, attr, None)
            if box is None or name not in box:
                continue
            item = box[name]
            named = [("", item)] if isinstance(item, nn.Parameter) else list(item.named_parameters())
            for pname, param in named:
                tail = f".{pname}" if pname else ""
                out.append((f"{path}.{attr}.{name}{tail}", peft_key(path, f"{attr}{tail}"), param))
    return out


def _live_tensors(method: Method, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    own = {key: p for _, key, p in adapter_weights(model, name, method)}
    return {**own, **heads.head_tensors(model, name)}


# `Method` operations the hook methods share as they are: assigned in their class bodies
# (`parameters = hooked_parameters`), they read the class's `containers` (its per-adapter dict attributes)
# and, for merging, call its `fold(model, name, merged)`.

def hooked_parameters(method: Method, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Adapter `name`'s trainable parameters keyed by qualified name in `model`, its head copy included."""
    own = {qname: p for qname, _, p in adapter_weights(model, name, method)}
    return {**own, **heads.head_parameters(model, name)}


def hooked_state_dict(method: Method, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s weights keyed by PEFT's saved key, its head included."""
    return {key: t.detach().clone() for key, t in _live_tensors(method, model, name).items()}


def hooked_load_state_dict(method: Method, model: nn.Module, sd: dict[str, torch.Tensor],
                           name: str) -> None:
    """Copy `sd` (saved keys) into adapter `name`; `ArtifactError` on missing, unexpected or misshapen keys,
    before any weight changes."""
    live = _live_tensors(method, model, name)
    source = f"{method.name} adapter {name!r}"
    check_loaded(live, sd, source)
    extra = sorted(set(sd) - set(live))
    if extra:
        raise ArtifactError(f"{source}: unexpected keys {', '.join(extra[:5])} "
                            "(modules this base lacks or the adapter does not target)")
    with torch.no_grad():
        for key, tensor in live.items():
            tensor.copy_(sd[key])


def hooked_merge(method: Method, model: nn.Module, name: str) -> None:
    """Fold adapter `name` into the base weights (the class's `fold`); the adapter becomes inactive."""
    method.fold(model, name, merged=True)


def hooked_unmerge(method: Method, model: nn.Module, name: str) -> None:
    """Take adapter `name` back out of the base weights (the class's `fold`); it is active again."""
    method.fold(model, name, merged=False)


def peft_common(model: nn.Module) -> dict:
    """The `adapter_config.json` fields every tunelab adapter writes the way PEFT does."""
    head_paths = heads.head_names(model)
    return {"task_type": "SEQ_CLS" if head_paths else "CAUSAL_LM",
            "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
            "modules_to_save": sorted({p.rsplit(".", 1)[-1] for p in head_paths}) or None,
            "inference_mode": True}
