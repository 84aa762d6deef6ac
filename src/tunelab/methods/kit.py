"""The plumbing every method shares: the registry, the adapter state on a model, per-adapter containers and hooks,
loading saved weights into live tensors, and the mixed-batch router.

This is the floor of `tunelab.methods`: it imports no other module of the package, and `base` and each method's
helpers build on it.

Mixed-adapter batches: `AdapterState.row_adapters` names one adapter (or None, the base) per batch row. `route`
checks it once per batch (one entry per row, every adapter loaded, none merged, every method declaring
`supports_mixed_batch`) and groups the rows by adapter; the grouping (`Routing`) is cached on the state, and the
row-index tensors and masks it hands out are built once per batch and device, whichever module asks. The LoRA
family, the hook methods and the classification heads all read it; a stacked (gathered) serving path can read
`Routing.groups` the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tunelab.errors import ArtifactError, ConfigError

STATE_ATTR = "tunelab_adapters"
HOOKS_ATTR = "_tunelab_hooks"  # module.__dict__ entry: hook key -> RemovableHandle
REGISTRY: dict[str, Any] = {}  # method name -> its one `Method` instance (filled by `register`)


@dataclass
class AdapterState:
    """Adapters attached to one model: which method owns each name, its options, and which are active.

    `active` is a tuple of adapter names; an empty tuple means the base model alone. `merged` holds the adapters
    folded into the base weights. `row_adapters`, when set, gives one adapter name (or None for the base) per batch
    row, for mixed-adapter batches in serving: assign a new list per batch (see `route`).
    """

    methods: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, list[str]] = field(default_factory=dict)
    active: tuple[str, ...] = ()
    row_adapters: list[str | None] | None = None
    merged: set[str] = field(default_factory=set)
    routing: Routing | None = field(default=None, repr=False, compare=False)


def adapter_state(model: nn.Module) -> AdapterState:
    """Return the model's `AdapterState`, creating an empty one on first use."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        state = AdapterState()
        object.__setattr__(model, STATE_ATTR, state)  # plain attribute, not a submodule or buffer
    return state


def adapter_module_prefixes(model: nn.Module) -> tuple[str, ...]:
    """`"<path>."` for every ModuleDict keyed by a loaded adapter name: the modules below them belong to adapters."""
    names = set(adapter_state(model).methods)
    if not names:
        return ()
    return tuple(f"{n}." for n, m in model.named_modules()
                 if n and isinstance(m, nn.ModuleDict) and names.intersection(m.keys()))


# --- per-adapter containers and hooks ----------------------------------------------------------------------

def container(module: nn.Module, attr: str, kind: type[nn.Module] | None = None) -> nn.Module | None:
    """`module.<attr>`, one method's dict of weights keyed by adapter name (`ParameterDict` / `ModuleDict`).

    None when there is none, unless `kind` is given: then an empty one is created on first use, and an attribute
    of that name that is not a `kind` is refused.
    """
    held = getattr(module, attr, None)
    if kind is None:
        return held
    if held is None:
        module.add_module(attr, held := kind())
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


def hook_once(module: nn.Module, key: str, fn: Callable, *, pre: bool = False, kwargs: bool = False) -> None:
    """Register `fn` as `module`'s forward hook (or pre-hook when `pre`) under `key`, once."""
    hooks = module.__dict__.setdefault(HOOKS_ATTR, {})
    if key not in hooks:
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        hooks[key] = register(fn, with_kwargs=kwargs)


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


def container_weights(adapted: list[tuple[str, nn.Module]], containers: tuple[str, ...],
                      name: str) -> list[tuple[str, str, nn.Parameter]]:
    """(qualified name, saved key, parameter) of adapter `name` in the `containers` of the `adapted` (path, module).

    A Parameter per name is `<path>.<attr>.<name>`, saved as `<path>.<attr>`; a Module per name holds
    `<path>.<attr>.<name>.<param>`, saved as `<path>.<attr>.<param>`: PEFT's layout, the adapter name dropped.
    """
    out = []
    for path, module in adapted:
        for attr in containers:
            box = getattr(module, attr, None)
            if box is None or name not in box:
                continue
            item = box[name]
            named = [("", item)] if isinstance(item, nn.Parameter) else list(item.named_parameters())
            for pname, param in named:
                tail = f".{pname}" if pname else ""
                out.append((f"{path}.{attr}.{name}{tail}", peft_key(path, f"{attr}{tail}"), param))
    return out


# --- saved weights ----------------------------------------------------------------------------------------

def peft_key(module_path: str, rest: str) -> str:
    """PEFT's saved key for a weight of an adapted module: `base_model.model.<module_path>.<rest>`."""
    return f"base_model.model.{module_path}.{rest}"


def check_loaded(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], source: str) -> None:
    """Raise `ArtifactError` for missing keys or shape mismatches between an adapter file and the model."""
    missing = sorted(set(expected) - set(given))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ArtifactError(f"{source}: missing keys {', '.join(missing[:5])}{more}")
    for key, tensor in expected.items():
        if tuple(given[key].shape) != tuple(tensor.shape):
            raise ArtifactError(
                f"{source}: parameter {key} has shape {tuple(given[key].shape)}, "
                f"the base model needs {tuple(tensor.shape)}"
            )


def peft_task_type(model: nn.Module) -> str:
    """PEFT's `task_type` for the model's class (it decides which PeftModel class loads the artifact)."""
    cls = type(model).__name__
    for suffix, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if cls.endswith(suffix):
            return task
    get_out = getattr(model, "get_output_embeddings", None)
    return "CAUSAL_LM" if callable(get_out) and get_out() is not None else "FEATURE_EXTRACTION"


@torch.no_grad()
def load_live(live: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], source: str) -> None:
    """Copy `sd` into the live tensors `live` (same keys), in place, in their dtype and device.

    Raises `ArtifactError` naming missing, unexpected or misshapen keys before any tensor changes.
    """
    check_loaded(live, sd, source)
    extra = sorted(set(sd) - set(live))
    if extra:
        raise ArtifactError(f"{source}: unexpected keys {', '.join(extra[:5])} "
                            "(weights this model or adapter does not have)")
    for key, tensor in live.items():
        tensor.copy_(sd[key])


# --- mixed-adapter batches ---------------------------------------------------------------------------------

@dataclass
class Routing:
    """One mixed batch's rows grouped by adapter: `groups[name]` lists the rows of adapter `name` (None: base).

    `names` lists every loaded adapter at the time of the batch; adapter `names[i]` has slot `i + 1`, and slot 0
    is the base (the stacked serving path, `stacked.py`, keeps one slot per adapter in that order). Index
    tensors, masks and the row-to-slot index are built on first request per device (and dtype) and reused by
    every module.
    """

    rows: tuple[str | None, ...]
    groups: dict[str | None, list[int]]
    names: tuple[str, ...] = ()
    _cache: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    # the one adapter every row uses (None: every row on the base), or False when the rows differ
    only: str | None | bool = field(init=False)
    _slot: dict[str, int] = field(init=False, repr=False)  # name -> slot

    def __post_init__(self):
        self.only = next(iter(self.groups)) if len(self.groups) == 1 else False
        self._slot = {n: i + 1 for i, n in enumerate(self.names)}

    def slot(self, name: str | None) -> int:
        """The slot of adapter `name` in `names` (plus one); 0 for None, the base."""
        return 0 if name is None else self._slot[name]

    def slots(self, device: torch.device) -> torch.Tensor:
        """Each row's slot (see `slot`): a LongTensor (batch,) on `device`, built once per batch and device."""
        key = ("slots", device)
        if key not in self._cache:
            self._cache[key] = torch.tensor([self._slot.get(r, 0) for r in self.rows], dtype=torch.long,
                                            device=device)
        return self._cache[key]

    def index(self, name: str, device: torch.device) -> torch.Tensor | None:
        """The rows of adapter `name` as a LongTensor (k,) on `device`; None when no row uses it."""
        return self._tensor(("index", name, device), lambda: self.groups.get(name, []), device)

    def others(self, name: str, device: torch.device) -> torch.Tensor | None:
        """The rows not of adapter `name` (the base's and other adapters'), (k,) on `device`; None when none."""
        return self._tensor(("others", name, device), lambda: [i for i, r in enumerate(self.rows) if r != name],
                            device)

    def mask(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        """(batch, 1, ..., 1) in `like`'s dtype, device and rank: 1.0 on adapter `name`'s rows, 0.0 elsewhere."""
        if name not in self.groups:
            return None
        key = ("mask", name, like.device, like.dtype)
        if key not in self._cache:
            hit = [r == name for r in self.rows]
            self._cache[key] = torch.tensor(hit, dtype=like.dtype, device=like.device)
        return self._cache[key].view(-1, *([1] * (like.dim() - 1)))

    def _tensor(self, key: tuple, rows: Callable[[], list[int]], device: torch.device) -> torch.Tensor | None:
        if key not in self._cache:
            found = rows()
            self._cache[key] = torch.tensor(found, device=device, dtype=torch.long) if found else None
        return self._cache[key]


def route(state: AdapterState, batch: int) -> Routing | None:
    """The grouping of `state.row_adapters` for a batch of `batch` rows; None when the batch is not mixed.

    Checked and built once per batch (cached on `state` until the rows or the adapters change); raises
    `ConfigError` on a wrong row count, an unknown or merged adapter, or a method that declares
    `supports_mixed_batch = False`.
    """
    rows = state.row_adapters
    if rows is None:
        return None
    if len(rows) != batch:
        raise ConfigError(f"row_adapters has {len(rows)} entries, the batch has {batch} rows")
    key = tuple(rows)
    if state.routing is None or state.routing.rows != key:
        state.routing = _build_routing(state, key)
    return state.routing


def _build_routing(state: AdapterState, rows: tuple[str | None, ...]) -> Routing:
    used = {r for r in rows if r is not None}
    unknown = sorted(used - set(state.methods))
    if unknown:
        raise ConfigError(f"row_adapters: unknown adapter {unknown[0]!r}; loaded: {sorted(state.methods)}")
    if state.merged:
        raise ConfigError(f"adapter {sorted(state.merged)[0]!r} is merged into the base weights; "
                          "unmerge it before serving mixed-adapter batches")
    for name in sorted(used):
        method = state.methods[name]
        if not REGISTRY[method].supports_mixed_batch:
            raise ConfigError(f"method '{method}' (adapter '{name}') cannot serve mixed-adapter batches; "
                              "serve its requests in batches of their own")
    groups: dict[str | None, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r, []).append(i)
    return Routing(rows, groups, tuple(state.methods))


def applying(state: AdapterState, names, like: torch.Tensor) -> list[tuple[str, torch.Tensor | None]]:
    """The adapters among `names` that apply to this forward, each with its row mask (see `Routing.mask`).

    Without `row_adapters`: every active, unmerged name, with mask None (the whole batch). With it: each name
    some row of `like` (batch, ...) uses, with its mask.
    """
    routing = route(state, like.shape[0])
    if routing is None:
        return [(n, None) for n in names if n in state.active and n not in state.merged]
    return [(n, routing.mask(n, like)) for n in names if n in routing.groups]


MIXED_GUARD = "tunelab_mixed_guard"


def guard_mixed_batches(model: nn.Module, on: bool) -> None:
    """Install (`on`) or remove a pre-hook on the top-level model that checks every mixed batch with `route`.

    Methods that do not support mixed batches install it, so such a batch fails in one line before the model runs.
    """
    if on:
        hook_once(model, MIXED_GUARD, _guard, pre=True, kwargs=True)
    else:
        unhook(model, MIXED_GUARD)


def _guard(model: nn.Module, args: tuple, kwargs: dict) -> None:
    state = adapter_state(model)
    if state.row_adapters is not None:
        x = args[0] if args else next((kwargs[k] for k in ("input_ids", "inputs_embeds")
                                       if kwargs.get(k) is not None), None)
        route(state, len(state.row_adapters) if x is None else x.shape[0])
