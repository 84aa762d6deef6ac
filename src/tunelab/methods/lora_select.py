"""Which modules a LoRA-family adapter takes, and each one's rank and alpha, by PEFT's rules.

PEFT LoraConfig fields, with PEFT's matching, so an artifact means the same in both tools:
- `rank_pattern` / `alpha_pattern`: {pattern: value}; a module takes the value of the first pattern that matches
  the end of its qualified name (`re.match(r"(.*\\.)?(pattern)$", name)`), else `r` / `alpha`;
- `layers_to_transform` (an index or a list) with `layers_pattern` (the name of the layer list, e.g. `layers`,
  `h`; default: the first numbered segment of the name): only targets inside those blocks. Applies to a list of
  names (and `all-linear`), not to a regex, and not to a target given by its full qualified name;
- `exclude_modules` (a list of names or a regex, matched as `target_modules` is): never adapted.
"""

from __future__ import annotations

import re
from typing import Any

from tunelab.errors import ConfigError
from tunelab.methods.base import target_matches

__all__ = ["pattern_value", "layer_index", "kept", "peft_selects", "portable_fields"]


def pattern_value(patterns: dict[str, Any] | None, path: str, default: Any) -> Any:
    """The value of the first pattern matching the end of `path` (PEFT's `get_pattern_key`), else `default`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def layer_index(path: str, layers_pattern: list[str] | str | None) -> int | None:
    """The block index in `path` (the first numbered segment, or the one after `layers_pattern`); None if none."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match is not None:
                break
    return int(match["idx"]) if match else None


def _in_layers(path: str, layers: list[int] | int | None, layers_pattern, targets) -> bool:
    if layers is None or (isinstance(targets, list) and path in targets):  # a full path is taken as given
        return True
    index = layer_index(path, layers_pattern)
    return index is not None and (index == layers if isinstance(layers, int) else index in layers)


def _excluded(path: str, exclude: list[str] | str | None) -> bool:
    return bool(exclude) and target_matches(path, exclude)


def kept(paths: list[str], options, targets) -> list[str]:
    """`paths` (what `targets` selected) less those outside `layers_to_transform` or in `exclude_modules`.

    Raises `ConfigError` naming both options when they leave nothing.
    """
    out = [p for p in paths if not _excluded(p, options.exclude_modules)
           and _in_layers(p, options.layers_to_transform, options.layers_pattern, targets)]
    if paths and not out:
        raise ConfigError(f"target_modules {targets!r} matched {len(paths)} modules, but layers_to_transform="
                          f"{options.layers_to_transform!r} (layers_pattern={options.layers_pattern!r}) and "
                          f"exclude_modules={options.exclude_modules!r} leave none; first matched: {paths[0]}")
    return out


def peft_selects(path: str, fields: dict[str, Any]) -> bool:
    """Whether PEFT's `check_target_module_exists` takes `path` under these adapter_config fields."""
    if _excluded(path, fields.get("exclude_modules")):
        return False
    targets = fields["target_modules"]
    if isinstance(targets, str):
        return target_matches(path, targets)
    return target_matches(path, targets) and _in_layers(path, fields.get("layers_to_transform"),
                                                      fields.get("layers_pattern"), targets)


def portable_fields(names: list[str], options, targets: list[str]) -> dict[str, Any]:
    """`target_modules`, `layers_to_transform`, `layers_pattern`, `exclude_modules` for adapter_config.json that
    select exactly `targets` among the module `names` under PEFT's rules.

    PEFT matches every module type, not only linears, so the user's values are kept only when they select the
    same set there; otherwise the leaf names with the user's filters, or failing that a regex of the exact paths.
    """
    want = set(targets)
    filters = {"layers_to_transform": options.layers_to_transform, "layers_pattern": options.layers_pattern,
               "exclude_modules": options.exclude_modules}
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    user = options.target_modules
    tries = ([user] if user is not None and user != "all-linear" else []) + [leaves]
    for spec in tries:
        fields = {"target_modules": spec, **filters}
        if {n for n in names if peft_selects(n, fields)} == want:
            return fields
    exact = "(" + "|".join(re.escape(t) for t in targets) + ")"
    return {"target_modules": exact, "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None}
