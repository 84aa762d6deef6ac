"""Classification heads trained and saved with any adapter method (PEFT's `modules_to_save`).

A sequence-classification model gets a new, randomly initialised head (`classifier` or `score`), so every
adapter method must train it and save it with the adapter. Each adapter gets its own fp32 copy of the head,
kept in a `modules_to_save` ModuleDict that is a child of the head (`classifier.modules_to_save.<name>`, as in
PEFT's memory layout). The head module itself stays where it is, with its parameter names unchanged; a forward
hook swaps in the copy of the active adapter. Saved keys are PEFT's: `base_model.model.<head path>.<param>`
(the copy's prefix and the adapter name dropped), which `PeftModel.from_pretrained` loads for `SEQ_CLS`.

The `Method` interface (`base.py`) calls these helpers around each adapter method's own operations: no method
file wires heads itself. For a causal LM there is no such head and every helper here does nothing.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods.kit import adapter_module_prefixes, adapter_state, route

HEAD_NAMES = ("classifier", "score")  # PEFT's modules_to_save for SEQ_CLS
COPIES = "modules_to_save"


def head_names(model: nn.Module) -> list[str]:
    """Qualified names of the classification heads of `model` (top-most modules called `classifier`/`score`)."""
    owned = adapter_module_prefixes(model)
    found = [n for n, _ in model.named_modules()
             if n and n.rsplit(".", 1)[-1] in HEAD_NAMES and not n.startswith(owned)]
    return [n for n in found if not any(n.startswith(f"{o}.") for o in found)]


def head_numel(model: nn.Module) -> int:
    """Number of parameters in one copy of the classification heads (0 for a model without one)."""
    total = 0
    for path in head_names(model):
        total += sum(p.numel() for k, p in model.get_submodule(path).named_parameters()
                     if not k.startswith(f"{COPIES}."))
    return total


def attach_heads(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Give adapter `name` its own trainable copy of each classification head; return its parameters."""
    state = adapter_state(model)
    for path in head_names(model):
        head = model.get_submodule(path)
        if any(isinstance(c, nn.ModuleDict) for k, c in head.named_children() if k != COPIES):
            raise ConfigError(f"module {path}: the classification head trains in full with every adapter; "
                              f"leave it out of target_modules")
        fresh = _fresh_copy(head)
        if not hasattr(head, COPIES):
            head.add_module(COPIES, nn.ModuleDict())
            head._tunelab_state = state
            head._tunelab_head_hook = head.register_forward_hook(_head_hook, with_kwargs=True)
        getattr(head, COPIES)[name] = fresh
    return head_parameters(model, name)


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
    """(path, head) for every head that holds a copy for adapter `name`."""
    out = []
    for path in head_names(model):
        head = model.get_submodule(path)
        if name in getattr(head, COPIES, {}):
            out.append((path, head))
    return out


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
    x = args[0].to(next(head.parameters()).dtype)  # the copy is fp32 even when the base is bf16
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


@torch.no_grad()
def merge_heads(model: nn.Module, name: str) -> None:
    """Write adapter `name`'s heads into the base heads, keeping the base weights for `unmerge_heads`."""
    for path, head in _heads_of(model, name):
        merged = getattr(head, "_tunelab_merged_head", None)
        if merged is not None and merged[0] != name:
            raise ConfigError(f"module {path}: adapter {merged[0]!r} is merged into this head; unmerge it first")
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
