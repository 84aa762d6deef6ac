"""The method interface shared by every fine-tuning strategy.

A method is one file in this package with one `@register` line. It never edits model source code: it finds
target modules by name, regex or `all-linear` (see `find_targets`) and attaches to them with forward hooks or
pre-hooks, keeping its weights in `nn.ModuleDict`s keyed by adapter name as children of the module it adapts.
The base module tree and its parameter names stay exactly as they were, so frozen weights, `model.state_dict()`
of the base, and HF saving keep working.

Which adapters are active is shared state on the model (`AdapterState`), not per method, so adapters of
different methods coexist on one model and `set_active` / `disabled` work for all of them at once. Hooks read
`adapter_state(model).active` (through the reference every wrapped module keeps) on each forward.

The training loop, artifacts, compare and serve use only this interface and the helpers below.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from tunelab.errors import ArtifactError, ConfigError

STATE_ATTR = "tunelab_adapters"


class MethodOptions(BaseModel):
    """Base for each method's options (`--set key=value`). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass
class AdapterState:
    """Adapters attached to one model: which method owns each name, its options, and which are active.

    `active` is a tuple of adapter names; an empty tuple means the base model alone. `row_adapters`, when set,
    gives one adapter name (or None for the base) per batch row, for mixed-adapter batches in serving;
    methods that support it apply each row's own adapter, others raise.
    """

    methods: dict[str, str] = field(default_factory=dict)
    options: dict[str, MethodOptions] = field(default_factory=dict)
    targets: dict[str, list[str]] = field(default_factory=dict)
    active: tuple[str, ...] = ()
    row_adapters: list[str | None] | None = None


def adapter_state(model: nn.Module) -> AdapterState:
    """Return the model's `AdapterState`, creating an empty one on first use."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        state = AdapterState()
        object.__setattr__(model, STATE_ATTR, state)  # plain attribute, not a submodule or buffer
    return state


class Method:
    """One fine-tuning strategy. Subclass once per method (no deeper), set the class attributes, register it.

    Class attributes describe the method for `tunelab methods`, compare and the artifact writer:
    - `name`: the CLI name (`--method NAME`); `family`: reparameterisation, additive, input-side, selective, full;
    - `trains`: a few words on what trains; `paper`: the citation;
    - `Options`: the pydantic model of its `--set` options;
    - `mergeable`: whether `merge` folds it into the base weights;
    - `peft_type`: PEFT's `peft_type` string written to `adapter_config.json`;
    - `peft_loadable`: whether HF PEFT loads the artifact as it is;
    - `artifact`: "adapter" (adapter_config.json + adapter_model.safetensors) or "model" (an HF model dir);
    - `changes_base`: `inject` stores the frozen base differently (qlora: NF4), so the base alone (disabled)
      gives outputs close to, not equal to, those before inject.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    trains: ClassVar[str]
    paper: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    mergeable: ClassVar[bool] = False
    peft_type: ClassVar[str | None] = None
    peft_loadable: ClassVar[bool] = False
    artifact: ClassVar[str] = "adapter"
    changes_base: ClassVar[bool] = False
    default_lr: ClassVar[float] = 2e-4  # peak learning rate when the run sets none (the loop reads it)

    # --- required -------------------------------------------------------------------------------------
    def inject(self, model: nn.Module, options: MethodOptions, name: str) -> list[str]:
        """Attach adapter `name` to `model` and return the qualified names of the modules it touched.

        Raises `ConfigError` listing the patterns and a few real module names if nothing matches.
        """
        raise NotImplementedError

    def parameters(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        """The trainable parameters of adapter `name`, keyed by qualified name in `model`."""
        raise NotImplementedError

    def state_dict(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s weights in PEFT's saved key layout (`base_model.model.<path>...`, no adapter name)."""
        raise NotImplementedError

    def load_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor], name: str) -> None:
        """Load weights saved by `state_dict` (or by PEFT) into the already injected adapter `name`.

        Raises `ArtifactError` listing missing keys, or the parameter and both shapes on a mismatch.
        """
        raise NotImplementedError

    # --- optional, with defaults ----------------------------------------------------------------------
    def adapter_config(self, model: nn.Module, options: MethodOptions, name: str) -> dict[str, Any]:
        """The `adapter_config.json` content for this adapter (PEFT's field names where PEFT has the type)."""
        return {"peft_type": self.peft_type or self.name.upper(), **options.model_dump()}

    def options_from_config(self, config: dict[str, Any]) -> MethodOptions:
        """Rebuild options from an `adapter_config.json` (ours or PEFT's); unknown PEFT fields are ignored."""
        known = {k: v for k, v in config.items() if k in self.Options.model_fields}
        return self.Options(**known)

    def matches_config(self, config: dict[str, Any]) -> bool:
        """Whether an `adapter_config.json` of this method's `peft_type` is this method's.

        Several methods may share one `peft_type` (PEFT's LORA: lora, dora through `use_dora`, qlora). The
        artifact loader takes, among the methods of the config's `peft_type`, the one tunelab's sidecar names,
        else the first (in registration order) whose `matches_config` is true.
        """
        return True

    def param_groups(self, model: nn.Module, name: str, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups for adapter `name` (one group by default; LoRA+ overrides)."""
        params = [p for p in self.parameters(model, name).values() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    def merge(self, model: nn.Module, name: str) -> None:
        """Fold adapter `name` into the base weights in place; afterwards the adapter is inactive."""
        raise ConfigError(f"method '{self.name}' cannot be merged into the base weights")

    def unmerge(self, model: nn.Module, name: str) -> None:
        """Undo `merge`."""
        raise ConfigError(f"method '{self.name}' cannot be merged into the base weights")

    def remove(self, model: nn.Module, name: str) -> None:
        """Detach adapter `name` entirely: its weights and hooks go, the base module tree is as before inject.

        Used after `merge` to write a plain HF model, and to unload adapters in serving.
        """
        raise NotImplementedError

    def memory_report(self, model: nn.Module, name: str) -> dict[str, Any] | None:
        """Memory facts of adapter `name` that the training loop adds to run.json (`memory_report`), or None.

        For methods that change how the base is stored (qlora: the bytes its NF4 weights saved).
        """
        return None

    def expected_trainable(self, model: nn.Module, options: MethodOptions) -> int | None:
        """The analytic number of trainable parameters `inject` would add to the base `model`, or None.

        Computed from the architecture and options alone (not by counting after inject); the test matrix checks
        it against the count after inject. Methods that do not implement it return None.
        """
        return None


# --- generic helpers built on the interface -----------------------------------------------------------

def set_active(model: nn.Module, names: list[str] | tuple[str, ...]) -> None:
    """Make exactly `names` active; an empty list means the base model alone."""
    state = adapter_state(model)
    unknown = [n for n in names if n not in state.methods]
    if unknown:
        raise ConfigError(f"unknown adapter {unknown[0]!r}; loaded adapters: {sorted(state.methods) or 'none'}")
    state.active = tuple(names)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the block, then restore the active adapters."""
    state = adapter_state(model)
    saved, state.active = state.active, ()
    try:
        yield
    finally:
        state.active = saved


def is_active(model_or_state: nn.Module | AdapterState, name: str) -> bool:
    """Whether adapter `name` is active (hooks call this on every forward)."""
    state = model_or_state if isinstance(model_or_state, AdapterState) else adapter_state(model_or_state)
    return name in state.active


def mark_trainable(model: nn.Module, params: dict[str, nn.Parameter]) -> None:
    """Freeze every parameter of `model`, then unfreeze exactly `params`."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)


def output_head_names(model: nn.Module) -> set[str]:
    """Qualified names of the output head(s): the LM head and classification heads, never adapted by all-linear."""
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for qname, module in model.named_modules():
        leaf = qname.rsplit(".", 1)[-1]
        if module is out or leaf in {"lm_head", "score", "classifier", "qa_outputs"}:
            names.add(qname)
    return names


def linear_like(module: nn.Module) -> bool:
    """nn.Linear or GPT-2's Conv1D (a transposed linear)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def find_targets(model: nn.Module, target_modules: str | list[str], predicate=linear_like) -> list[str]:
    """Resolve `target_modules` to qualified module names.

    `target_modules` is a list of names (a module matches when its qualified name equals the entry or ends
    with `.entry`), a regex string (full match on the qualified name, as PEFT does), or `"all-linear"` (every
    linear layer except the output head). Only modules passing `predicate` count. Raises `ConfigError` that
    lists the patterns and a few real module names when nothing matches.
    """
    owned = adapter_module_prefixes(model)
    candidates = [(n, m) for n, m in model.named_modules()
                  if n and predicate(m) and not n.startswith(owned)]  # never adapt another adapter's layers
    if target_modules == "all-linear":
        heads = output_head_names(model)
        found = [n for n, _ in candidates if n not in heads and not any(n.startswith(h + ".") for h in heads)]
    elif isinstance(target_modules, str):
        found = [n for n, _ in candidates if re.fullmatch(target_modules, n)]
    else:
        found = [n for n, _ in candidates if any(n == t or n.endswith("." + t) for t in target_modules)]
    if not found:
        examples = sorted({n.rsplit(".", 1)[-1] for n, _ in candidates})[:8]
        raise ConfigError(
            f"target_modules {target_modules!r} matched no module; "
            f"some module names in this model: {', '.join(examples) or 'none of a supported type'}"
        )
    return found


def adapter_module_prefixes(model: nn.Module) -> tuple[str, ...]:
    """`"<path>."` for every ModuleDict keyed by a loaded adapter name: the modules below them belong to adapters."""
    names = set(adapter_state(model).methods)
    if not names:
        return ()
    return tuple(f"{n}." for n, m in model.named_modules()
                 if n and isinstance(m, nn.ModuleDict) and names.intersection(m.keys()))


_ADAPTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def add_adapter(model: nn.Module, method: Method, name: str, options: MethodOptions, targets: list[str]) -> None:
    """Record adapter `name` of `method` in the model's `AdapterState` and make it the only active adapter.

    Refuses a name that is taken or cannot key a ModuleDict, and refuses to combine a whole-model method
    (`artifact == "model"`, e.g. `full`) with any other adapter.
    """
    state = adapter_state(model)
    if not _ADAPTER_NAME.fullmatch(name) or hasattr(nn.ModuleDict, name):
        raise ConfigError(f"adapter name {name!r}: expected letters, digits, '_' or '-' and not a reserved word")
    if name in state.methods:
        raise ConfigError(f"adapter {name!r} already exists (method '{state.methods[name]}'); remove it or pick another name")
    from tunelab.methods import get_method  # late import: the registry imports this module

    whole = [n for n, m in state.methods.items() if get_method(m).artifact == "model"]
    if state.methods and (method.artifact == "model" or whole):
        loaded = ", ".join(f"{n} ({m})" for n, m in state.methods.items())
        raise ConfigError(f"adapter {name!r} (method '{method.name}'): a whole-model method cannot be combined "
                          f"with other adapters; already loaded: {loaded}")
    state.methods[name] = method.name
    state.options[name] = options
    state.targets[name] = list(targets)
    state.active = (name,)


def forget_adapter(model: nn.Module, name: str) -> None:
    """Drop adapter `name` from the model's `AdapterState` (its method's `remove` calls this last)."""
    state = adapter_state(model)
    for table in (state.methods, state.options, state.targets):
        table.pop(name, None)
    state.active = tuple(n for n in state.active if n != name)


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
