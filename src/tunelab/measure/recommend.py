"""The recommendation rule of `tunelab compare`: measurements + the user's constraints -> one strategy and why.

The rule, step by step (docs/compare.md states the same rule; tests/measure/test_recommend.py checks it):

1. Leave out every strategy that failed, or that has no validation figure. A strategy whose method cannot apply to
   the model ('not applicable') is no candidate at all: it is not listed among those left out.
2. Leave out every strategy whose peak memory exceeds the budget (`--gpu-memory`). The memory figure is the
   measured peak (GPU allocator peak on a GPU; peak RSS minus idle RSS on CPU), or `tunelab plan`'s
   prediction where nothing was measured.
3. Quality of each remaining strategy, relative to the best: best_val_loss / val_loss (1.0 = the best); for
   classification, where every strategy has an accuracy and the best is above zero,
   val_accuracy / best_val_accuracy.
4. Unless the priority is quality, leave out strategies below `MIN_QUALITY` (90%) of the best quality: a strategy
   that saves memory but has not learned the task is no answer.
5. Score each strategy by the priority: quality (higher is better), memory (peak bytes, lower), speed
   (tokens/s, higher), forgetting (prose perplexity after training, lower; for classification the forgetting
   probe's accuracy after training, higher).
6. Strategies within `TIE_TOLERANCE` (2%) of the best score are tied; so are strategies whose figure is
   indistinguishable from the best one's over the seeds (`--seeds N`, N >= 2: their spreads overlap, see
   `tunelab.measure.stats`). Among the tied, those that need the fewest bytes to serve K tasks (`--tasks K`:
   K whole models, or one base + K adapters; within `TIE_TOLERANCE` of the fewest) go first; among them the one
   that forgets least (prose perplexity after training, or the probe's accuracy after, where measured), then the
   better quality, then the order in which the strategies were compared. The reasons name the strategies tied
   with the pick. (With one task, full fine-tuning's one model and a base plus one small adapter need about the
   same bytes; forgetting then tells them apart, where a difference of a fraction of a percent in bytes would
   not.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

from tunelab.measure.portability import human_bytes, serve_bytes
from tunelab.measure.schema import Priority, Recommendation, StrategyResult
from tunelab.measure.stats import indistinguishable, spread_text

MIN_QUALITY = 0.90
TIE_TOLERANCE = 0.02


def memory_figure(s: StrategyResult) -> int | None:
    """The memory a strategy is judged by: its measured peak, else `tunelab plan`'s prediction."""
    return s.peak_memory_bytes if s.peak_memory_bytes is not None else s.predicted_memory_bytes


def storage_for(s: StrategyResult, k: int) -> int | None:
    """Bytes to serve `k` tasks with strategy `s` (None when its artifact was not measured)."""
    p = s.portability
    if p is None:
        return None
    return serve_bytes(p.artifact, p.bytes_per_task, p.base_bytes, k)


def _by_accuracy(strategies: list[StrategyResult]) -> bool:
    accuracies = [s.val_accuracy for s in strategies]
    return bool(accuracies) and None not in accuracies and max(accuracies) > 0


def quality_scores(strategies: list[StrategyResult]) -> dict[str, float]:
    """Quality relative to the best, in (0, 1]: by accuracy when every strategy has one (and the best is above
    zero), else by val loss."""
    if _by_accuracy(strategies):
        best = max(s.val_accuracy for s in strategies)
        return {s.name: s.val_accuracy / best for s in strategies}
    best = min(s.val_loss for s in strategies) if strategies else 0.0
    return {s.name: best / s.val_loss if s.val_loss > 0 else 1.0 for s in strategies}


def _eligible(strategies: list[StrategyResult], gpu_memory: int | None) -> tuple[list[StrategyResult], dict]:
    """Steps 1 and 2: drop failed strategies, unmeasured ones and those over the memory budget."""
    keep, excluded = [], {}
    for s in strategies:
        mem = memory_figure(s)
        if s.status == "not applicable":
            continue
        if s.status != "ok":
            excluded[s.name] = f"failed: {s.error or 'unknown error'}"
        elif s.val_loss is None and s.val_accuracy is None:
            excluded[s.name] = "no validation loss was measured"
        elif gpu_memory is not None and mem is not None and mem > gpu_memory:
            excluded[s.name] = f"peak memory {human_bytes(mem)} exceeds the budget of {human_bytes(gpu_memory)}"
        else:
            keep.append(s)
    return keep, excluded


def _by_probe(strategies: list[StrategyResult]) -> bool:
    """Whether forgetting was measured by the classification probe's accuracy (else by prose perplexity)."""
    return any(s.forgetting and s.forgetting.measure == "probe_accuracy" for s in strategies)


def _score(priority: Priority, quality: dict[str, float],
           probe: bool = False) -> tuple[Callable[[StrategyResult], float], bool]:
    """Step 5: the priority's score function and whether higher is better (missing figures score worst);
    `probe`: forgetting is the probe's accuracy after training (higher is better)."""
    if priority == "quality":
        return (lambda s: quality[s.name]), True
    if priority == "memory":
        return (lambda s: _or_inf(memory_figure(s))), False
    if priority == "speed":
        return (lambda s: s.tokens_per_second if s.tokens_per_second is not None else -math.inf), True
    if probe:
        return (lambda s: s.forgetting.after_accuracy if s.forgetting else -math.inf), True
    return (lambda s: s.forgetting.after_perplexity if s.forgetting else math.inf), False


def _or_inf(x: float | None) -> float:
    return math.inf if x is None else x


def _tied(value: float, best: float, higher_better: bool) -> bool:
    """Step 6: within TIE_TOLERANCE of the best (relative; quality is already relative to 1.0)."""
    if math.isinf(value):
        return False
    if higher_better:
        return value >= best - TIE_TOLERANCE * abs(best)
    return value <= best + TIE_TOLERANCE * abs(best)


def spread_key(priority: Priority, strategies: list[StrategyResult]) -> str:
    """The figure (a key of `StrategyResult.spread`) whose spread decides ties for `priority`."""
    if priority == "quality":
        return "val_accuracy" if _by_accuracy(strategies) else "val_loss"
    forgetting = "after_accuracy" if _by_probe(strategies) else "after_perplexity"
    return {"memory": "peak_memory_bytes", "speed": "tokens_per_second", "forgetting": forgetting}[priority]


def tied_with_best(strategies: list[StrategyResult], priority: Priority,
                   quality: dict[str, float]) -> dict[str, bool]:
    """Step 6's ties: {strategy: tied with the best score}, by `TIE_TOLERANCE` or by overlapping spreads."""
    score, higher_better = _score(priority, quality, _by_probe(strategies))
    sign = -1 if higher_better else 1
    best = min(strategies, key=lambda s: sign * score(s))
    key = spread_key(priority, strategies)
    return {s.name: _tied(score(s), score(best), higher_better)
            or indistinguishable(s.spread.get(key), best.spread.get(key)) for s in strategies}


def forgetting_score(s: StrategyResult, probe: bool) -> float:
    """How much `s` forgot, lower is better (inf when not measured): prose perplexity after training, or minus
    the forgetting probe's accuracy after training."""
    if s.forgetting is None:
        return math.inf
    value = -s.forgetting.after_accuracy if probe else s.forgetting.after_perplexity
    return math.inf if value is None else value


def rank(strategies: list[StrategyResult], priority: Priority, tasks: int,
         quality: dict[str, float]) -> list[StrategyResult]:
    """Steps 5 and 6: the eligible strategies, best first."""
    probe = _by_probe(strategies)
    score, higher_better = _score(priority, quality, probe)
    sign = -1 if higher_better else 1
    order = {s.name: i for i, s in enumerate(strategies)}
    ties = tied_with_best(strategies, priority, quality)
    fewest = min((_or_inf(storage_for(s, tasks)) for s in strategies if ties[s.name]), default=math.inf)

    def key(s: StrategyResult):
        if ties[s.name]:
            storage = _or_inf(storage_for(s, tasks))
            near_fewest = storage <= fewest * (1 + TIE_TOLERANCE)
            first = (0, 0.0 if near_fewest else storage, forgetting_score(s, probe))
        else:
            first = (1, sign * score(s), 0.0)
        return (*first, -quality[s.name], order[s.name])

    return sorted(strategies, key=key)


def recommend(strategies: list[StrategyResult], priority: Priority = "quality", gpu_memory: int | None = None,
              tasks: int = 1) -> Recommendation:
    """Apply the rule in this module's docstring and return the pick with its reasons as numbers.

    Args: the compared strategies; the priority (quality, memory, speed, forgetting); the memory budget in
    bytes (None: no budget); K, the number of tasks to serve. Returns a `Recommendation` whose `strategy` is
    None when nothing is eligible, with `excluded` saying why for each strategy left out.
    """
    eligible, excluded = _eligible(strategies, gpu_memory)
    quality = quality_scores(eligible)
    if priority != "quality":
        for s in list(eligible):
            if quality[s.name] < MIN_QUALITY:
                excluded[s.name] = (f"quality {quality[s.name]:.1%} of the best, below the "
                                    f"{MIN_QUALITY:.0%} floor for priority {priority}")
                eligible.remove(s)
    rec = Recommendation(strategy=None, priority=priority, gpu_memory=gpu_memory, tasks=tasks, excluded=excluded)
    if not eligible:
        rec.reasons = ["no strategy is eligible: " + ("; ".join(f"{k}: {v}" for k, v in excluded.items())
                                                      or "no compared method applies to this model")]
        return rec
    ranking = rank(eligible, priority, tasks, quality)
    rec.strategy, rec.ranking = ranking[0].name, [s.name for s in ranking]
    rec.reasons = explain(ranking[0], ranking, strategies, quality, tasks)
    ties = tied_with_best(eligible, priority, quality)
    rec.tied = [s.name for s in ranking[1:] if ties[s.name]]
    if rec.tied:
        rec.reasons.insert(1, tie_reason(ranking[0], [s for s in ranking if s.name in rec.tied], priority, eligible))
    elif len(ranking) > 1 and (apart := no_tie_reason(ranking[0], ranking[1], priority, eligible)):
        rec.reasons.insert(1, apart)
    return rec


def no_tie_reason(pick: StrategyResult, runner_up: StrategyResult, priority: Priority,
                  eligible: list[StrategyResult]) -> str | None:
    """'no strategy ties with adapter in val loss at 2 seeds: the next, full 3.653 [...], lies outside ...' when
    the seeds give spreads (None with one seed: there is no spread to tell a tie by)."""
    key = spread_key(priority, eligible)
    mine, theirs = pick.spread.get(key), runner_up.spread.get(key)
    if mine is None or theirs is None or min(mine.n, theirs.n) < 2:
        return None
    return (f"no strategy ties with {pick.name} in {key.replace('_', ' ')} at {min(mine.n, theirs.n)} seeds: the "
            f"next, {runner_up.name} {spread_text(theirs)}, is more than {TIE_TOLERANCE:.0%} away and its spread "
            f"does not overlap {pick.name}'s {spread_text(mine)}")


def tie_reason(pick: StrategyResult, tied: list[StrategyResult], priority: Priority,
               eligible: list[StrategyResult]) -> str:
    """'lora, dora and adapter are indistinguishable in val_loss at 3 seeds (...)'; the storage rule picked."""
    key = spread_key(priority, eligible)
    names = [pick.name] + [s.name for s in tied]
    listed = ", ".join(names[:-1]) + f" and {names[-1]}"
    seeds = min((s.spread[key].n for s in [pick, *tied] if key in s.spread), default=1)
    figures = "; ".join(f"{s.name} {spread_text(s.spread.get(key))}" for s in [pick, *tied] if key in s.spread)
    how = (f"at {seeds} seeds (spreads overlap, or within {TIE_TOLERANCE:.0%}): {figures}" if seeds >= 2
           else f"within {TIE_TOLERANCE:.0%} of each other")
    return (f"{listed} are indistinguishable in {key.replace('_', ' ')} {how}; among them {pick.name} needs "
            f"the fewest bytes to serve the tasks (within {TIE_TOLERANCE:.0%}), then forgets least, then has the "
            f"better quality")


def _reference(pick: StrategyResult, ranking: list[StrategyResult], everything: list[StrategyResult]):
    """What the pick is compared against: full fine-tuning when it ran, else the runner-up."""
    full = [s for s in everything if s.portability and s.portability.artifact == "model" and s.status == "ok"]
    if full and full[0].name != pick.name:
        return full[0]
    return ranking[1] if len(ranking) > 1 else None


def _quality_reason(pick: StrategyResult, ref: StrategyResult | None, ranking: list[StrategyResult],
                    quality: dict[str, float]) -> str:
    """'lora: quality 98.7% of the best (full), ...' or, for the best itself, how far the reference is behind."""
    accuracy = _by_accuracy(ranking)
    metric = "validation accuracy" if accuracy else "validation loss"

    def value(s: StrategyResult) -> str:
        return f"{(s.val_accuracy if accuracy else s.val_loss):.4g}"

    best = max(ranking, key=lambda s: quality[s.name])
    if best.name != pick.name:
        return (f"{pick.name}: quality {quality[pick.name]:.1%} of the best ({best.name}), "
                f"{metric} {value(pick)} against {value(best)}")
    if ref is None:
        return f"{pick.name}: the best {metric}, {value(pick)}"
    return (f"{pick.name}: the best {metric}, {value(pick)}; {ref.name} reaches {value(ref)} "
            f"({quality[ref.name]:.1%} of it)" if ref.name in quality else
            f"{pick.name}: the best {metric}, {value(pick)}; {ref.name} reaches {value(ref)}")


def explain(pick: StrategyResult, ranking: list[StrategyResult], everything: list[StrategyResult],
            quality: dict[str, float], tasks: int) -> list[str]:
    """The reasons for `pick` as numbers, each against the reference strategy (full FT, else the runner-up)."""
    ref = _reference(pick, ranking, everything)
    reasons = [_quality_reason(pick, ref, ranking, quality)]
    if ref is None:
        return reasons
    pm, rm = memory_figure(pick), memory_figure(ref)
    if pm is not None and rm:
        reasons.append(f"peak memory {human_bytes(pm)}, {pm / rm:.0%} of {ref.name}'s {human_bytes(rm)}")
    ps, rs = storage_for(pick, tasks), storage_for(ref, tasks)
    if pick.portability and ref.portability and ps is not None and rs is not None:
        reasons.append(f"{human_bytes(pick.portability.bytes_per_task)} per task against "
                       f"{human_bytes(ref.portability.bytes_per_task)}; {tasks} task(s) take "
                       f"{human_bytes(ps)} against {human_bytes(rs)}")
    if pick.tokens_per_second and ref.tokens_per_second:
        reasons.append(f"{pick.tokens_per_second:.0f} tokens/s against {ref.tokens_per_second:.0f}")
    if pick.forgetting and ref.forgetting and pick.forgetting.measure == "probe_accuracy":
        reasons.append(f"forgetting probe accuracy {pick.forgetting.after_accuracy:.3f} after training (drop "
                       f"{pick.forgetting.delta_percent:+.1f}%) against {ref.forgetting.after_accuracy:.3f} (drop "
                       f"{ref.forgetting.delta_percent:+.1f}%) for {ref.name}")
    elif pick.forgetting and ref.forgetting:
        reasons.append(f"prose perplexity {pick.forgetting.delta_percent:+.1f}% after training against "
                       f"{ref.forgetting.delta_percent:+.1f}% for {ref.name}")
    return reasons
