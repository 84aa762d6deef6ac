"""`tunelab combine`: build one LoRA adapter from several LoRA adapters of the same base, from their files alone.

Each adapter dir is read (adapter_config.json + adapter_model.safetensors, tunelab's or HF PEFT's) and checked
against the first: the same base, task and target modules, and for the factor-wise combinations the same rank
at every module. A mismatch is refused in one line naming the adapter dir and the field. The result is written
atomically as a plain LoRA adapter of scaling 1 (`lora_alpha = r`, as PEFT's `add_weighted_adapter` writes it),
which `PeftModel.from_pretrained` and tunelab load. The arithmetic is in `combine_math`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from tunelab.artifacts.atomic import artifact_bytes, atomic_dir
from tunelab.artifacts.combine_math import COMBINATIONS, FACTOR_WISE, PRUNED, SIGNED, Part, Recipe, combine_module
from tunelab.artifacts.files import SIDECAR, check_finite, read_safetensors, read_sidecar, write_json
from tunelab.artifacts.info import inspect
from tunelab.artifacts.peft_format import CONFIG, WEIGHTS
from tunelab.errors import ArtifactError, ConfigError, closest
from tunelab.methods import get_method

ALIASES = {"dare": "dare_linear"}  # the DARE paper's own merge: drop, rescale, then task arithmetic
KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<factor>[AB])\.weight$")


@dataclass
class LoraFiles:
    """One LoRA adapter read from its dir: config, sidecar, and per module (A (r, in), B (out, r), scaling)."""

    path: Path
    config: dict
    sidecar: dict
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def read_lora(adapter_dir: str | Path, purpose: str = "combine") -> LoraFiles:
    """Read a plain LoRA adapter dir (tunelab's or PEFT's); anything else is refused naming the dir, the field
    and what it was read for (`purpose`)."""
    info = inspect(adapter_dir)
    where = f"adapter {info.path}"
    if info.kind != "adapter" or info.files_method != "lora":
        raise ConfigError(f"{where}: method '{info.method}' ({info.peft_type or 'a whole model'}); expected a "
                          f"plain LoRA adapter (peft_type LORA without use_dora) to {purpose}")
    if info.config.get("trainable_token_indices") is not None:
        raise ConfigError(f"{where}: field trainable_token_indices: the adapter trains rows of added tokens; "
                          f"an adapter with trained heads or token rows cannot {purpose}")
    options = get_method("lora").options_from_config(info.config)
    weights = read_safetensors(info.path / WEIGHTS)
    check_finite(weights, info.path / WEIGHTS)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = KEY.match(key)
        if match is None:
            raise ConfigError(f"{where}: field modules_to_save: weight {key} is not a LoRA factor; an adapter "
                              f"with trained heads or token rows cannot {purpose}")
        factors.setdefault(match["path"], {})[match["factor"]] = tensor.to(torch.float32)
    modules = {}
    for path, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise ArtifactError(f"{info.path / WEIGHTS}: module {path} has lora_{''.join(ab)} only; expected both "
                                f"lora_A and lora_B")
        r = ab["A"].shape[0]
        alpha = options.rank_alpha(path)[1]
        modules[path] = (ab["A"], ab["B"], alpha / (math.sqrt(r) if options.rslora else r))
    return LoraFiles(info.path, info.config, read_sidecar(info.path), modules)


def check_compatible(adapters: list[LoraFiles], combination: str) -> None:
    """Refuse adapters that do not share the first one's base, task, targets, shapes (and rank, factor-wise)."""
    first = adapters[0]
    for other in adapters[1:]:
        where = f"adapter {other.path}"
        for field in ("base_model_name_or_path", "task_type", "fan_in_fan_out"):
            if other.config.get(field) != first.config.get(field):
                raise ConfigError(f"{where}: field {field} is {other.config.get(field)!r}, adapter {first.path} "
                                  f"has {first.config.get(field)!r}; expected the same for every adapter")
        extra = sorted(set(other.modules) ^ set(first.modules))
        if extra:
            owner = other.path if extra[0] in other.modules else first.path
            raise ConfigError(f"{where}: field target_modules: module {extra[0]} is adapted only by {owner} "
                              f"({len(extra)} such); expected the same target modules as {first.path}")
        for path, (a, b, _) in other.modules.items():
            a0, b0, _ = first.modules[path]
            if (b.shape[0], a.shape[1]) != (b0.shape[0], a0.shape[1]):
                raise ConfigError(f"{where}: field base_model_name_or_path: module {path} is {b.shape[0]}x"
                                  f"{a.shape[1]}, in {first.path} {b0.shape[0]}x{a0.shape[1]}; expected one base")
            if combination in FACTOR_WISE and a.shape[0] != a0.shape[0]:
                raise ConfigError(f"{where}: field r: rank {a.shape[0]} at {path}, {first.path} has "
                                  f"{a0.shape[0]}; '{combination}' needs one rank (use cat or svd)")


def make_recipe(combination: str, n: int, weights: list[float] | None, rank: int | None, density: float | None,
                majority_sign: str, svd_clamp: float | None, seed: int) -> tuple[Recipe, list[float]]:
    """Validate the options (before any file is read) into a `Recipe` and one weight per adapter."""
    combination = ALIASES.get(combination, combination)
    if combination not in COMBINATIONS:
        raise ConfigError(f"--method {combination!r}: unknown{closest(combination, COMBINATIONS)}; expected one "
                          f"of {', '.join(COMBINATIONS)} (or dare = dare_linear)")
    if n < 1:
        raise ConfigError("--adapter: expected at least one adapter dir")
    weights = [1.0] * n if weights is None else list(weights)
    if len(weights) != n or not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"--weights {weights}: expected {n} finite numbers, one per --adapter")
    if combination in PRUNED and (density is None or not 0 < density <= 1):
        raise ConfigError(f"--density {density}: '{combination}' needs a density in (0, 1], the share of entries "
                          f"kept")
    if majority_sign not in ("total", "frequency"):
        raise ConfigError(f"--majority-sign {majority_sign!r}: expected total or frequency")
    if rank is not None and rank <= 0 or svd_clamp is not None and not 0 < svd_clamp < 1:
        raise ConfigError(f"--rank {rank} / --svd-clamp {svd_clamp}: expected a rank > 0 and a clamp in (0, 1)")
    generator = torch.Generator().manual_seed(seed) if combination.startswith("dare") else None
    return Recipe(combination, rank, density, majority_sign if combination in SIGNED else "total", svd_clamp,
                  generator), weights


def natural_key(path: str) -> list:
    """Sort key putting `layers.2` before `layers.10` (the model's own order for the blocks)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def combine_adapters(adapters: list[LoraFiles], weights: list[float], recipe: Recipe) -> dict[str, tuple]:
    """Per module (natural order): the combined (A, B). Ranks default as PEFT's: factor-wise the common rank,
    `cat` the sum, the svd family `recipe.rank` or the largest rank."""
    paths = sorted(adapters[0].modules, key=natural_key)
    if recipe.combination.endswith("svd") and recipe.rank is None:
        largest = max(a.shape[0] for f in adapters for a, _, _ in f.modules.values())
        recipe = Recipe(recipe.combination, largest, recipe.density, recipe.majority_sign, recipe.svd_clamp,
                        recipe.generator)
    out = {}
    for path in paths:
        parts = [Part(*f.modules[path], weight=w) for f, w in zip(adapters, weights)]
        out[path] = combine_module(parts, recipe)
    return out


def combined_config(first: LoraFiles, ranks: dict[str, int]) -> dict:
    """The first adapter's config, as a plain LoRA of scaling 1 at each module's new rank (`rank_pattern` /
    `alpha_pattern` name the modules whose rank is not the largest, by their exact path)."""
    r = max(ranks.values())
    pattern = {re.escape(p): k for p, k in ranks.items() if k != r}
    return {**first.config, "r": r, "lora_alpha": r, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "rank_pattern": pattern, "alpha_pattern": dict(pattern)}


def combine(adapter_dirs: list[str | Path], out_dir: str | Path, method: str = "linear", *,
            weights: list[float] | None = None, rank: int | None = None, density: float | None = None,
            majority_sign: str = "total", svd_clamp: float | None = None, seed: int = 0) -> int:
    """Combine LoRA adapters of one base into one adapter at `out_dir`; return the bytes written.

    Args:
        adapter_dirs: LoRA adapter dirs (tunelab's or HF PEFT's) of the same base, targets and task.
        method: linear, cat, svd, ties, dare (= dare_linear), dare_ties, magnitude_prune, or an `_svd` variant
            of ties / dare_linear / dare_ties / magnitude_prune (PEFT's `combination_type`s).
        weights: one weight per adapter (default 1 each); negative weights subtract.
        rank: the svd family's target rank (default: the largest input rank).
        density: the share of entries kept by ties, dare and magnitude_prune.
        majority_sign: TIES sign election, `total` (sum of values) or `frequency` (count of signs).
        svd_clamp: clamp the svd factors to this quantile; seed: DARE's random drop.
    """
    recipe, weights = make_recipe(method, len(adapter_dirs), weights, rank, density, majority_sign, svd_clamp, seed)
    adapters = [read_lora(d) for d in adapter_dirs]
    check_compatible(adapters, recipe.combination)
    combined = combine_adapters(adapters, weights, recipe)
    tensors = {}
    for path, (a, b) in combined.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = b.contiguous()
    config = combined_config(adapters[0], {p: a.shape[0] for p, (a, _) in combined.items()})
    options = get_method("lora").options_from_config(config).model_dump()
    side = {**adapters[0].sidecar, "method": "lora", "options": options, "task_type": config.get("task_type"),
            "combined": {"method": recipe.combination, "adapters": [str(f.path) for f in adapters],
                         "weights": weights, "rank": rank, "density": density, "majority_sign": majority_sign,
                         "svd_clamp": svd_clamp, "seed": seed}}
    with atomic_dir(out_dir) as tmp:
        safetensors.torch.save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        write_json(tmp / CONFIG, config)
        write_json(tmp / SIDECAR, side)
    return artifact_bytes(out_dir)
