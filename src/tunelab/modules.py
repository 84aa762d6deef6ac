"""Facts about torch modules that methods, the planner and serving share (the ground floor: no tunelab imports).

- linear-like layers: nn.Linear, and GPT-2's Conv1D, which stores its weight transposed as (in, out);
- the target-name rule: a module matches a name when its qualified name equals it or ends with `.name`.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def linear_like(module: nn.Module) -> bool:
    """nn.Linear or GPT-2's Conv1D (a transposed linear)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def is_conv1d(module: nn.Module) -> bool:
    """Whether a linear-like module stores its weight as (in, out) (GPT-2's Conv1D)."""
    return not isinstance(module, nn.Linear) and type(module).__name__ == "Conv1D"


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear-like module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    d_in, d_out = module.weight.shape  # Conv1D: (in, out)
    return int(d_in), int(d_out)


def name_matches(qname: str, names: Iterable[str]) -> bool:
    """Whether qualified module name `qname` equals one of `names` or ends with `.name` (PEFT's list rule)."""
    return any(qname == n or qname.endswith("." + n) for n in names)
