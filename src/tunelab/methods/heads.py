"""Whole modules trained and saved with an adapter (PEFT's `modules_to_save`): classification heads, and the
modules an adapter's `modules_to_save` option names (`lm_head`, `embed_tokens`, ...).

A sequence-classification model gets a new, randomly initialised head (`classifier` or `score`), so every
adapter method must train it and save it with the adapter; methods whose PEFT config has `modules_to_save`
(the LoRA family, IA3) also copy the modules it names. Each adapter gets its own fp32 copy of the head,
kept in a `modules_to_save` ModuleDict that is a child of the head (`classifier.modules_to_save.<name>`, as in
PEFT's memory layout). The head module itself stays where it is, with its parameter names unchanged; a forward
hook swaps in the copy of the active adapter. Saved keys are PEFT's: `base_model.model.<head path>.<param>`
(the copy's prefix and the adapter name dropped), which `PeftModel.from_pretrained` loads for `SEQ_CLS`.

The `Method` interface (`base.py`) calls these helpers around each adapter method's own operations: no method
file wires heads itself. For a causal LM without `modules_to_save` every helper here does nothing.

Tied weights (an LM head sharing the input embedding's matrix, `tie_word_embeddings`): as PEFT without
`ensure_weight_tying`, the copy is the adapter's own and trains apart from the module it is tied to, so saving,
loading and serving work; merging it is refused, since writing it back would change the tied module too.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods.kit import adapter_module_prefixes, adapter_state, route
from tunelab.modules import name_matches

HEAD_NAMES = ("classifier", "score")  # PEFT's modules_to_save for SEQ_CLS
COPIES = "modules_to_save"


def head_names(model: nn.Module) -> list[str]:
    """Qualified names of the classification heads of `model` (top-most modules called `classifier`/`score`)."""
    owned = adapter_module_prefixes(model)
    found = [n for n, _ in model.named_modules()
             if n and n.rsplit(".", 1)[-1] in HEAD_NAMES and not n.startswith(owned)]
    return [n for n in found if not any(n.startswith(f"{o}.") for o in found)]


def saved_paths(model: nn.Module, modules_to_save: list[str] | None = None) -> list[str]:
    """Qualified names of the modules an adapter copies: the classification heads, then those `modules_to_save`
    names (a name or a path suffix, PEFT's rule), in model order, each once (never one inside another).

    Raises `ConfigError` naming an entry that matches no module.
    """
    owned = adapter_module_prefixes(model)
    names = [n for n, _ in model.named_modules() if n and not n.startswith(owned)]
    for entry in modules_to_save or ():  # PEFT lists both head names for every classification model
        if entry not in HEAD_NAMES and not any(name_matches(n, [entry]) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})[:8]
            raise ConfigError(f"modules_to_save: {entry!r} matches no module; some module names in this model: "
                              f"{', '.join(leaves)}")
    wanted = set(head_names(model)) | {n for n in names if name_matches(n, modules_to_save or ())}
    ordered = [n for n in names if n in wanted]
    return [n for n in ordered if not any(n.startswith(f"{o}.") for o in ordered)]


def head_numel(model: nn.Module, modules_to_save: list[str] | None = None) -> int:
    """Number of parameters in one copy of the saved modules (0 for a causal LM without `modules_to_save`)."""
    total = 0
    for path in saved_paths(model, modules_to_save):
        total += sum(p.numel() for k, p in model.get_submodule(path).named_parameters()
                     if not k.startswith(f"{COPIES}."))
    return total


def attach_heads(model: nn.Module, name: str, modules_to_save: list[str] | None = None) -> list[str]:
    """Give adapter `name` its own trainable copy of each saved module; return their qualified names."""
    state = adapter_state(model)
    paths = saved_paths(model, modules_to_save)
    for path in paths:
        head = model.get_submodule(path)
        if any(isinstance(c, (nn.ModuleDict, nn.ParameterDict)) for k, c in head.named_children() if k != COPIES):
            raise ConfigError(f"module {path}: an adapter trains it in full (a classification head, or "
                              f"modules_to_save); leave it out of target_modules")
    for path in paths:
        head = model.get_submodule(path)
        fresh = _fresh_copy(head)
        if not hasattr(head, COPIES):
            head.add_module(COPIES, nn.ModuleDict())
            head._tunelab_state = state
            head._tunelab_head_hook = head.register_forward_hook(_head_hook, with_kwargs=True)
        getattr(head, COPIES)[name] = fresh
    return paths


def _fresh_copy(head: nn.Module) -> nn.Module:
    """An fp32 copy of `head` holding the base head's weights (not another adapter's trained ones)."""
    copies = getattr(head, COPIES, None)
    # Copy an existing copy when there is one: the head itself now carries the hook and the ModuleDict.
    template = next(iter(copies.values())) if copies else head
    fresh = copy.deepcopy(template).float()
    base = {k: v for k, v in head.state_dict().items() if not k.startswith(f"{COPIES}.")}
    fresh.load_state_dict(base)
    for p in fresh.parameters():
        p.requires_grad_(True)
    return fresh


def _heads_of(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """(path, module) for every saved module that holds a copy for adapter `name`, in model order."""
    return [(path, m) for path, m in model.named_modules()
            if isinstance(getattr(m, COPIES, None), nn.ModuleDict) and name in getattr(m, COPIES)]


def tied_elsewhere(model: nn.Module, path: str) -> str | None:
    """The name of a parameter outside module `path` that shares a tensor with it (tied embeddings), or None."""
    mine = {id(p) for k, p in model.get_submodule(path).named_parameters() if not k.startswith(f"{COPIES}.")}
    for qname, p in model.named_parameters(remove_duplicate=False):
        if id(p) in mine and not qname.startswith(f"{path}."):
            return qname
    return None


def head_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Adapter `name`'s head parameters, keyed by qualified name in `model`."""
    return {f"{path}.{COPIES}.{name}.{k}": p
            for path, head in _heads_of(model, name)
            for k, p in getattr(head, COPIES)[name].named_parameters()}


def head_tensors(model: nn.Module, name: str, prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    """Adapter `name`'s head tensors (parameters and buffers, live) under PEFT's saved keys, `<prefix><head>.<param>`.

    PEFT's prompt-learning models wrap the base one level less deep: their prefix is `base_model.`.
    """
    return {f"{prefix}{path}.{k}": t
            for path, head in _heads_of(model, name)
            for k, t in getattr(head, COPIES)[name].state_dict(keep_vars=True).items()}


def _head_hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    """Replace the base head's output with the active adapter's copy (row by row in mixed batches)."""
    state, copies = module._tunelab_state, getattr(module, COPIES)
    routing = route(state, args[0].shape[0])
    if routing is not None:
        return _head_rows(copies, args, kwargs, output, routing)
    for n in state.active:
        if n in copies:
            return _run_copy(copies[n], args, kwargs, output.dtype)
    return output


def _run_copy(head: nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype) -> torch.Tensor:
    x = args[0]  # features (batch, ..., hidden), or token ids (batch, seq) for an embedding
    if x.is_floating_point():
        x = x.to(next(head.parameters()).dtype)  # the copy is fp32 even when the base is bf16
    return head(x, *args[1:], **kwargs).to(dtype)


def _head_rows(copies: nn.ModuleDict, args: tuple, kwargs: dict, output: torch.Tensor, routing) -> torch.Tensor:
    """Mixed batch: row i goes through its adapter's copy; rows of other adapters keep the base head."""
    x = args[0]  # (batch, ...) features
    for n, head in copies.items():
        index = routing.index(n, x.device)
        if index is not None:
            y = _run_copy(head, (x.index_select(0, index), *args[1:]), kwargs, output.dtype)
            output = output.index_copy(0, index, y)
    return output


def check_heads_mergeable(model: nn.Module, name: str) -> None:
    """Refuse (before anything changes) merging adapter `name`'s copies: another adapter's copy is merged into
    the module, or the module's weight is tied to another module's."""
    for path, head in _heads_of(model, name):
        merged = getattr(head, "_tunelab_merged_head", None)
        if merged is not None and merged[0] != name:
            raise ConfigError(f"module {path}: adapter {merged[0]!r} is merged into this head; unmerge it first")
        tied = tied_elsewhere(model, path)
        if tied is not None:
            raise ConfigError(f"module {path}: adapter {name!r} trains its own copy of it (modules_to_save), but "
                              f"its weight is tied to {tied} (tie_word_embeddings); merging would change both. "
                              f"Serve the adapter unmerged, or untie the base's embeddings first")


@torch.no_grad()
def merge_heads(model: nn.Module, name: str) -> None:
    """Write adapter `name`'s heads into the base heads, keeping the base weights for `unmerge_heads`."""
    check_heads_mergeable(model, name)
    for _, head in _heads_of(model, name):
        base = {k: t for k, t in head.state_dict(keep_vars=True).items() if not k.startswith(f"{COPIES}.")}
        backup = {k: t.detach().clone() for k, t in base.items()}
        trained = getattr(head, COPIES)[name].state_dict()
        for k, t in base.items():
            t.copy_(trained[k])
        head._tunelab_merged_head = (name, backup)


@torch.no_grad()
def unmerge_heads(model: nn.Module, name: str) -> None:
    """Restore the base heads saved by `merge_heads`."""
    for _, head in _heads_of(model, name):
        merged = getattr(head, "_tunelab_merged_head", None)
        if merged is None or merged[0] != name:
            continue
        base = {k: t for k, t in head.state_dict(keep_vars=True).items() if not k.startswith(f"{COPIES}.")}
        for k, t in base.items():
            t.copy_(merged[1][k])
        del head._tunelab_merged_head


def remove_heads(model: nn.Module, name: str) -> None:
    """Drop adapter `name`'s head copies; a merged head keeps its merged weights (merge-and-unload)."""
    for _, head in _heads_of(model, name):
        copies = getattr(head, COPIES)
        del copies[name]
        merged = getattr(head, "_tunelab_merged_head", None)
        if merged is not None and merged[0] == name:
            del head._tunelab_merged_head
        if not len(copies):
            head._tunelab_head_hook.remove()
            del head._tunelab_head_hook, head._tunelab_state
            delattr(head, COPIES)
