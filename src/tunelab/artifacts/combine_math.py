"""The arithmetic of combining LoRA adapters: one module's factors in, one module's factors out.

The combinations are those of HF PEFT's `add_weighted_adapter`, from these papers:
- task arithmetic (`linear`, `svd`; Ilharco et al. 2023, "Editing Models with Task Arithmetic", arXiv:2212.04089);
- TIES-merging (`ties`; Yadav et al. 2023, arXiv:2306.01708): keep the `density` share of largest magnitudes,
  elect a sign per entry, average the entries that agree with it;
- DARE (`dare_linear`, `dare_ties`; Yu et al. 2024, "Language Models are Super Mario", arXiv:2311.03099): drop
  entries at random with probability 1 - density and rescale the rest by 1 / density;
- magnitude pruning (`magnitude_prune`): TIES's pruning, then a weighted sum.

Without the `_svd` suffix, `ties` / `dare_*` / `magnitude_prune` / `linear` combine the factors A (r, in) and B
(out, r) separately, each weighted by sqrt(|w * scaling|) (the sign on A only); that needs one rank. `cat`
stacks the factors (rank sum r_i) and is exact. The `svd` family combines the full updates
delta_i = scaling_i * B_i A_i (out, in) and truncates the result back to a rank by SVD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DELTA_WISE = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = (*FACTOR_WISE, "cat", *DELTA_WISE)
PRUNED = tuple(c for c in COMBINATIONS if c.split("_svd")[0] not in ("linear", "cat", "svd"))
SIGNED = tuple(c for c in COMBINATIONS if "ties" in c)


@dataclass(frozen=True)
class Part:
    """One adapter's factors at one module: A (r, in), B (out, r), its scaling and the user's weight."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    weight: float


@dataclass(frozen=True)
class Recipe:
    """How to combine: the combination, the target rank (svd family), density, sign election, clamp, RNG."""

    combination: str
    rank: int | None = None
    density: float | None = None
    majority_sign: str = "total"
    svd_clamp: float | None = None
    generator: torch.Generator | None = None


def prune(t: torch.Tensor, density: float, how: str, generator: torch.Generator | None) -> torch.Tensor:
    """Keep the `density` share of `t`: the largest magnitudes (`magnitude`) or a random draw rescaled by
    1 / density (`random`, DARE). A density of 1 or more keeps everything."""
    if density >= 1:
        return t
    if how == "magnitude":
        k = int(density * t.numel())
        mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
        mask[torch.topk(t.abs().reshape(-1), k=k).indices] = 1
        return t * mask.view(t.shape)
    keep = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * keep / density


def elect_sign(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Mask (n, ...) of the entries whose sign is the elected one: the sign of the summed values (`total`) or
    of the summed signs (`frequency`); ties go to +."""
    signs = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    return signs == torch.where(magnitude >= 0, 1, -1)


def merge_tasks(tensors: list[torch.Tensor], weights: list[float], recipe: Recipe) -> torch.Tensor:
    """Combine same-shape task tensors with `weights` by the recipe's rule (its name without `_svd`)."""
    rule = recipe.combination.removesuffix("_svd")
    if rule in ("ties", "magnitude_prune"):
        tensors = [prune(t, recipe.density, "magnitude", None) for t in tensors]
    elif rule.startswith("dare"):
        tensors = [prune(t, recipe.density, "random", recipe.generator) for t in tensors]
    stacked = torch.stack(tensors)  # (n, ...)
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * w
    if "ties" not in rule:
        return weighted.sum(dim=0)
    agree = elect_sign(stacked, recipe.majority_sign)  # disjoint merge: the mean over the agreeing entries
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def combine_module(parts: list[Part], recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined (A (r', in), B (out, r')) of one module, for an adapter of scaling 1 (lora_alpha = r')."""
    kind = recipe.combination
    if kind == "cat":
        a = torch.cat([p.a * (p.weight * p.scaling) for p in parts], dim=0)
        return a, torch.cat([p.b for p in parts], dim=1)
    if kind in FACTOR_WISE:
        scaled = [p.weight * p.scaling for p in parts]
        w_a = [math.sqrt(abs(s)) * (1 if s >= 0 else -1) for s in scaled]  # the sign on one side only
        w_b = [math.sqrt(abs(s)) for s in scaled]
        return merge_tasks([p.a for p in parts], w_a, recipe), merge_tasks([p.b for p in parts], w_b, recipe)
    deltas = [p.b @ p.a * p.scaling for p in parts]  # (out, in) each
    return truncate(merge_tasks(deltas, [p.weight for p in parts], recipe), recipe)


def truncate(delta: torch.Tensor, recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`recipe.rank` factors of `delta` (out, in): A = Vh[:r] (r, in), B = U[:, :r] S[:r] (out, r);
    with `svd_clamp`, both clamped to +-(that quantile of their values together), as PEFT does."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(recipe.rank, s.numel())
    b, a = u[:, :r] * s[:r], vh[:r, :]
    if recipe.svd_clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), recipe.svd_clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return a, b
