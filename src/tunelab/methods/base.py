"""The method interface shared by every fine-tuning strategy.

A method is one file in this package with one `@register` line. It never edits model source code: it finds
target modules by name, regex or `all-linear` (see `find_targets`) and attaches to them with forward hooks or
pre-hooks, keeping its weights in `nn.ModuleDict`s keyed by adapter name as children of the module it adapts.
The base module tree and its parameter names stay exactly as they were, so frozen weights, `model.state_dict()`
of the base, and HF saving keep working.

Which adapters are active is shared state on the model (`AdapterState`, `kit.py`), not per method, so adapters of
different methods coexist on one model and `set_active` / `disabled` work for all of them at once. Hooks read
`adapter_state(model).active` and, in mixed batches, `kit.route` (through the reference every hooked module keeps)
on each forward.

`Method` implements the interface the training loop, artifacts, compare and serve call (`inject`, `parameters`,
`state_dict`, `load_state_dict`, `merge`, `unmerge`, `remove`, `expected_trainable`) once, around a few operations
each method defines (`attach`, `detach`, `fold`, and its weights). The classification heads (`heads.py`) are
attached, collected, saved, loaded, merged and removed here, so no method file wires them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods import heads, tokens
from tunelab.methods.kit import (  # noqa: F401  (AdapterState, check_loaded, peft_key: re-exported for callers)
    REGISTRY, AdapterState, adapter_module_prefixes, adapter_state, check_loaded, container_weights,
    guard_mixed_batches, load_live, peft_key, peft_task_type,
)
from tunelab.methods.targets import find_targets, output_head_names, target_matches  # noqa: F401  (re-exported)
from tunelab.modules import linear_like  # noqa: F401  (re-exported)


class MethodOptions(BaseModel):
    """Base for each method's options (`--set key=value`). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add one instance of `cls` to the registry under `cls.name`."""
    REGISTRY[cls.name] = cls()
    return cls


class Method:
    """One fine-tuning strategy. Subclass once per method (no deeper), set the class attributes, register it.

    Class attributes describe the method for `tunelab methods`, compare, serve and the artifact writer:
    - `name`: the CLI name (`--method NAME`); `family`: reparameterisation, additive, input-side, selective, full;
    - `trains`: a few words on what trains; `paper`: the citation;
    - `Options`: the pydantic model of its `--set` options;
    - `mergeable`: whether `merge` folds it into the base weights;
    - `supports_mixed_batch`: whether one forward can give each batch row its own adapter (`row_adapters`);
      a method that declares False refuses such a batch in one line (the contract matrix checks both);
    - `peft_type`: PEFT's `peft_type` string written to `adapter_config.json`;
    - `peft_loadable`: whether HF PEFT loads the artifact as it is;
    - `artifact`: "adapter" (adapter_config.json + adapter_model.safetensors) or "model" (an HF model dir);
    - `changes_base`: `inject` stores the frozen base differently (qlora: NF4), so the base alone (disabled)
      gives outputs close to, not equal to, those before inject;
    - `containers`: the per-adapter dicts (`kit.container`) the method keeps on the modules it adapts; the default
      `weights` / `tensors` read them (PEFT's layout: `<path>.<attr>[.<param>]`, the adapter name dropped);
    - `saved_prefix`: the saved-key prefix of weights outside the method's own (the classification heads):
      PEFT's prompt-learning models wrap the base one level less deep (`base_model.`);
    - `document_packing`: whether the method keeps the model's positions and attention mask as the data gives
      them, so document-packed batches (`pack(..., documents=True)`) stay inside their documents; prompt and
      prefix tuning add virtual positions the packed mask does not know.

    An adapter method defines `attach`, `detach`, its weights (`containers`, or `weights` / `tensors`), and for a
    mergeable one `fold`; the operations below wrap them with the adapter record and the classification heads.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    trains: ClassVar[str]
    paper: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    mergeable: ClassVar[bool] = False
    supports_mixed_batch: ClassVar[bool] = False
    peft_type: ClassVar[str | None] = None
    peft_loadable: ClassVar[bool] = False
    artifact: ClassVar[str] = "adapter"
    changes_base: ClassVar[bool] = False
    default_lr: ClassVar[float] = 2e-4  # peak learning rate when the run sets none (the loop reads it)
    containers: ClassVar[tuple[str, ...]] = ()
    saved_prefix: ClassVar[str] = "base_model.model."
    document_packing: ClassVar[bool] = True

    # --- what each method defines ---------------------------------------------------------------------
    def attach(self, model: nn.Module, options: MethodOptions, name: str) -> list[str]:
        """Add adapter `name`'s weights and hooks (already recorded in the state); return the modules touched.

        Refuses (`ConfigError` listing the patterns and a few real module names) before changing anything.
        """
        raise NotImplementedError

    def detach(self, model: nn.Module, name: str) -> None:
        """Drop adapter `name`'s weights and the hooks no other adapter of the method needs."""
        raise NotImplementedError

    def not_applicable(self, model: nn.Module) -> str | None:
        """Why this method can never apply to `model` whatever its options (one line), or None when it can.

        `tunelab compare` asks before anything trains and reports such a strategy as 'not applicable', not
        'failed'; `attach` still refuses the same model with the same line.
        """
        return None

    def fold(self, model: nn.Module, name: str, merged: bool) -> None:
        """Fold adapter `name` into the base weights (`merged`) or take it out; all checks before any change."""
        raise ConfigError(f"method '{self.name}' cannot be merged into the base weights")

    def weights(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        """Adapter `name`'s own trainable parameters, keyed by qualified name in `model`."""
        return {qname: p for qname, _, p in container_weights(self.adapted(model, name), self.containers, name)}

    def tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s own live tensors under PEFT's saved keys (what `load_state_dict` copies into)."""
        return {key: p for _, key, p in container_weights(self.adapted(model, name), self.containers, name)}

    def saved(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s own weights as saved (detached copies of `tensors` unless the method converts)."""
        return {k: t.detach().clone() for k, t in self.tensors(model, name).items()}

    def own_trainable(self, model: nn.Module, options: MethodOptions) -> int | None:
        """The analytic count of the method's own parameters `inject` would add to the bare `model` (None: unknown)."""
        return None

    # --- the interface callers use ----------------------------------------------------------------------
    def inject(self, model: nn.Module, options: MethodOptions, name: str) -> list[str]:
        """Attach adapter `name` to `model`, make it the only active adapter and exactly its parameters trainable;
        return the qualified names of the modules it touched (the classification heads included).

        The adapter's new modules take the model's train/eval mode (a new `nn.Module` starts in training mode:
        its dropout would otherwise stay on in a model that is in eval mode)."""
        before = {id(m) for m in model.modules()}
        add_adapter(model, self, name, options)
        if not self.supports_mixed_batch:
            guard_mixed_batches(model, True)  # removed with the last adapter that needs it (`_forget`)
        try:
            touched = list(self.attach(model, options, name))
        except Exception:
            self._forget(model, name)
            raise
        adapter_state(model).targets[name] = touched
        if self.artifact == "adapter":
            try:
                touched += heads.attach_heads(model, name, saved_modules(options))
            except Exception:
                self.remove(model, name)
                raise
            adapter_state(model).targets[name] = touched
        follow_mode(model, before)
        mark_trainable(model, self.parameters(model, name))
        return touched

    def parameters(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        """The trainable parameters of adapter `name` (its head copy included), keyed by qualified name."""
        own = self.weights(model, name)
        if self.artifact != "adapter":
            return own
        return {**own, **heads.head_parameters(model, name), **tokens.token_parameters(model, name)}

    def state_dict(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s weights in PEFT's saved key layout (`base_model.model.<path>...`, no adapter name)."""
        head = {k: t.detach().clone() for k, t in self._head_tensors(model, name).items()}
        return {**self.saved(model, name), **head}

    def load_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor], name: str) -> None:
        """Load weights saved by `state_dict` (or by PEFT) into the already injected adapter `name`.

        Raises `ArtifactError` listing missing or unexpected keys, or the parameter and both shapes on a mismatch,
        before any weight changes.
        """
        live = {**self.tensors(model, name), **self._head_tensors(model, name)}
        load_live(live, sd, f"{self.name} adapter {name!r}")

    def merge(self, model: nn.Module, name: str) -> None:
        """Fold adapter `name` into the base weights in place; afterwards the adapter is inactive."""
        self._set_merged(model, name, True)

    def unmerge(self, model: nn.Module, name: str) -> None:
        """Undo `merge`; the adapter is active again."""
        self._set_merged(model, name, False)

    def remove(self, model: nn.Module, name: str) -> None:
        """Detach adapter `name` entirely: its weights and hooks go, the base module tree is as before inject
        (merged weights stay merged). Used after `merge` to write a plain HF model, and to unload in serving."""
        self.owned(model, name)
        self.detach(model, name)
        heads.remove_heads(model, name)
        tokens.remove_tokens(model, name)
        self._forget(model, name)

    def expected_trainable(self, model: nn.Module, options: MethodOptions) -> int | None:
        """The analytic number of trainable parameters `inject` would add to the base `model`, or None.

        Computed from the architecture and options alone (not by counting after inject); the test matrix checks
        it against the count after inject.
        """
        own = self.own_trainable(model, options)
        return own if own is None or self.artifact != "adapter" else own + heads.head_numel(model, saved_modules(options))

    # --- optional, with defaults ----------------------------------------------------------------------
    def adapter_config(self, model: nn.Module, options: MethodOptions, name: str) -> dict[str, Any]:
        """The `adapter_config.json` content for this adapter (PEFT's field names where PEFT has the type)."""
        return {"peft_type": self.peft_type or self.name.upper(), **peft_common(model, options), **options.model_dump()}

    def options_from_config(self, config: dict[str, Any]) -> MethodOptions:
        """Rebuild options from an `adapter_config.json` (ours or PEFT's); unknown PEFT fields are ignored."""
        known = {k: v for k, v in config.items() if k in self.Options.model_fields}
        if "modules_to_save" in known:
            known["modules_to_save"] = modules_from_config(config)
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

    def memory_report(self, model: nn.Module, name: str) -> dict[str, Any] | None:
        """Memory facts of adapter `name` that the training loop adds to run.json (`memory_report`), or None.

        For methods that change how the base is stored (qlora: the bytes its NF4 weights saved).
        """
        return None

    # --- shared steps ---------------------------------------------------------------------------------
    def owned(self, model: nn.Module, name: str) -> None:
        """Raise `ConfigError` unless `name` is an adapter of this method on `model`."""
        state = adapter_state(model)
        if state.methods.get(name) != self.name:
            mine = sorted(n for n, m in state.methods.items() if m == self.name)
            raise ConfigError(f"no {self.name} adapter named {name!r} on this model; "
                              f"{self.name} adapters: {', '.join(mine) or 'none'}")

    def adapted(self, model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
        """(path, module) of the modules holding adapter `name` in one of `containers`, in model order."""
        self.owned(model, name)
        out = []
        for path in adapter_state(model).targets.get(name, ()):
            module = model.get_submodule(path)
            if any(name in getattr(module, attr, {}) for attr in self.containers):
                out.append((path, module))
        return out

    def _head_tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """The heads' and the added tokens' rows of adapter `name`, live, under their saved keys."""
        if self.artifact != "adapter":
            return {}
        return {**heads.head_tensors(model, name, self.saved_prefix), **tokens.token_tensors(model, name)}

    def _set_merged(self, model: nn.Module, name: str, merged: bool) -> None:
        """Merge or unmerge: the method's `fold`, the head copies, then the record (`state.merged`, `active`)."""
        if not self.mergeable:
            self.fold(model, name, merged)  # the method's own one-line refusal
        self.owned(model, name)
        state = adapter_state(model)
        if (name in state.merged) == merged:
            raise ConfigError(f"adapter {name!r} is {'already' if merged else 'not'} merged into the base weights")
        if merged:
            heads.check_heads_mergeable(model, name)  # before the method's fold: a refused merge changes nothing
        self.fold(model, name, merged)
        (heads.merge_heads if merged else heads.unmerge_heads)(model, name)
        tokens.merge_tokens(model, name, merged)
        state.routing = None
        if merged:
            state.merged.add(name)
            state.active = tuple(n for n in state.active if n != name)
        else:
            state.merged.discard(name)
            state.active = state.active if name in state.active else (*state.active, name)

    def _forget(self, model: nn.Module, name: str) -> None:
        forget_adapter(model, name)
        state = adapter_state(model)
        guard_mixed_batches(model, any(not REGISTRY[m].supports_mixed_batch for m in state.methods.values()))


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


def follow_mode(model: nn.Module, known: set[int]) -> None:
    """Put every module of `model` not in `known` (ids of the modules before an inject) in the model's mode."""
    for module in model.modules():
        if id(module) not in known:
            module.training = model.training


def mark_trainable(model: nn.Module, params: dict[str, nn.Parameter]) -> None:
    """Freeze every parameter of `model`, then unfreeze exactly `params`."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)


_ADAPTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def add_adapter(model: nn.Module, method: Method, name: str, options: MethodOptions) -> None:
    """Record adapter `name` of `method` in the model's `AdapterState` and make it the only active adapter.

    Refuses a name that is taken or cannot key a ModuleDict, and refuses to combine a whole-model method
    (`artifact == "model"`, e.g. `full`) with any other adapter.
    """
    state = adapter_state(model)
    if not _ADAPTER_NAME.fullmatch(name) or hasattr(nn.ModuleDict, name):
        raise ConfigError(f"adapter name {name!r}: expected letters, digits, '_' or '-' and not a reserved word")
    if name in state.methods:
        raise ConfigError(f"adapter {name!r} already exists (method '{state.methods[name]}'); "
                          "remove it or pick another name")
    whole = [n for n, m in state.methods.items() if REGISTRY[m].artifact == "model"]
    if state.methods and (method.artifact == "model" or whole):
        loaded = ", ".join(f"{n} ({m})" for n, m in state.methods.items())
        raise ConfigError(f"adapter {name!r} (method '{method.name}'): a whole-model method cannot be combined "
                          f"with other adapters; already loaded: {loaded}")
    state.methods[name] = method.name
    state.options[name] = options
    state.targets[name] = []
    state.active = (name,)
    state.routing = None


def forget_adapter(model: nn.Module, name: str) -> None:
    """Drop adapter `name` from the model's `AdapterState` (the last step of `Method.remove`)."""
    state = adapter_state(model)
    for table in (state.methods, state.options, state.targets):
        table.pop(name, None)
    state.merged.discard(name)
    state.active = tuple(n for n in state.active if n != name)
    state.routing = None


# The `modules_to_save` option of the methods whose PEFT config has it (the LoRA family, IA3): declare
# `modules_to_save: ModulesToSave = None` last among the options. A single name is taken as a list of one.
ModulesToSave = Annotated[
    list[str] | None, BeforeValidator(lambda v: [v] if isinstance(v, str) else (v or None)),
    Field(description="modules trained in full and saved with the adapter (e.g. [lm_head, embed_tokens])")]


def saved_modules(options: MethodOptions) -> list[str] | None:
    """The `modules_to_save` of `options` (None for methods without the option)."""
    return getattr(options, "modules_to_save", None)


def modules_from_config(config: dict[str, Any]) -> list[str] | None:
    """An `adapter_config.json`'s `modules_to_save` less the classification heads (every adapter copies those)."""
    return [m for m in config.get("modules_to_save") or () if m not in heads.HEAD_NAMES] or None


def peft_common(model: nn.Module, options: MethodOptions | None = None) -> dict[str, Any]:
    """The `adapter_config.json` fields every tunelab adapter writes the way PEFT does (`modules_to_save`: the
    classification heads' names, then the adapter's own `modules_to_save` entries)."""
    saved = sorted({p.rsplit(".", 1)[-1] for p in heads.head_names(model)})
    saved += [m for m in saved_modules(options) or () if m not in saved] if options is not None else []
    return {"task_type": peft_task_type(model),
            "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
            "modules_to_save": saved or None, "inference_mode": True}


def check_saved_modules(config: dict[str, Any], method: str) -> None:
    """Refuse an `adapter_config.json` whose `modules_to_save` names more than the classification heads (for the
    methods without the option: PEFT's prompt learning)."""
    extra = set(config.get("modules_to_save") or ()) - set(heads.HEAD_NAMES)
    if extra:
        raise ConfigError(f"field 'modules_to_save': {sorted(extra)} not supported by tunelab's {method} "
                          f"(only the classification heads {list(heads.HEAD_NAMES)})")
