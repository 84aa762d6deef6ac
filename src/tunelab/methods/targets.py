"""Which modules a method adapts: `target_modules` resolved to qualified names (a list, a regex or `all-linear`)."""

from __future__ import annotations

import re

from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods.kit import adapter_module_prefixes
from tunelab.modules import linear_like, name_matches


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


def target_matches(qname: str, patterns: str | list[str]) -> bool:
    """Whether `qname` matches `target_modules`-style `patterns`: a regex (full match, as PEFT) or a list of names."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, qname) is not None
    return name_matches(qname, patterns)


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
        outputs = output_head_names(model)
        found = [n for n, _ in candidates if n not in outputs and not any(n.startswith(h + ".") for h in outputs)]
    else:
        found = [n for n, _ in candidates if target_matches(n, target_modules)]
    if not found:
        leaves = {n.rsplit(".", 1)[-1]: linear_like(m) for n, m in candidates}  # linears first (LoRA: embeddings)
        examples = sorted(leaves, key=lambda leaf: (not leaves[leaf], leaf))[:8]
        raise ConfigError(
            f"target_modules {target_modules!r} matched no module; "
            f"some module names in this model: {', '.join(examples) or 'none of a supported type'}"
        )
    return found
