"""Statistics over seeds on synthetic results: mean and spread, indistinguishable strategies, the tie the
recommendation states, aggregation of seed runs, and the budget in steps."""

from __future__ import annotations

import math
import statistics

import pytest

from tunelab.errors import TunelabError
from tunelab.measure.compare_budget import auto_options, budget_steps
from tunelab.measure.forgetting import forgetting_record
from tunelab.measure.gather import aggregate
from tunelab.measure.recommend import recommend
from tunelab.measure.schema import Baseline, CompareOptions, StrategyResult
from tunelab.measure.stats import indistinguishable, spread


def test_spread_by_number_of_seeds():
    one = spread([2.0])
    assert (one.n, one.mean, one.low, one.high, one.kind) == (1, 2.0, 2.0, 2.0, "single run")
    two = spread([2.0, 2.4, None, math.nan])  # missing and non-finite values are left out
    assert (two.n, two.low, two.high, two.kind) == (2, 2.0, 2.4, "min-max") and two.mean == pytest.approx(2.2)
    xs = [2.0, 2.2, 2.6]
    three = spread(xs)
    half = 4.303 * statistics.stdev(xs) / math.sqrt(3)  # Student's t(0.975, 2)
    assert three.kind == "95% interval" and three.mean == pytest.approx(statistics.fmean(xs))
    assert (three.low, three.high) == pytest.approx((three.mean - half, three.mean + half))
    assert spread([None]) is None


def test_indistinguishable_needs_two_seeds_and_overlap():
    assert indistinguishable(spread([2.0, 2.1]), spread([2.05, 2.3]))
    assert not indistinguishable(spread([2.0, 2.1]), spread([2.2, 2.3]))
    assert not indistinguishable(spread([2.0]), spread([2.0]))  # one seed says nothing about noise


def _strategy(name: str, losses: list[float], artifact: str = "adapter", size: int = 10**6) -> StrategyResult:
    from tunelab.measure.portability import portability_record

    runs = [(seed, StrategyResult(name=name, method=name, val_loss=loss, val_perplexity=math.exp(loss),
                                  tokens_per_second=100.0 + seed, peak_memory_bytes=1000 + seed,
                                  forgetting=forgetting_record(20.0, 20.0 + loss),
                                  portability=portability_record(artifact, size, 10**8), run_dir=f"runs/{name}"))
            for seed, loss in enumerate(losses)]
    return aggregate(runs)


def test_aggregate_gives_means_spreads_and_forgetting_of_the_mean():
    s = _strategy("lora", [2.0, 2.2, 2.4])
    assert s.val_loss == pytest.approx(2.2) and s.spread["val_loss"].kind == "95% interval"
    assert [r.seed for r in s.seed_runs] == [0, 1, 2] and s.seed_runs[1].values["val_loss"] == 2.2
    assert s.peak_memory_bytes == 1001 and isinstance(s.peak_memory_bytes, int)
    assert s.forgetting.after_perplexity == pytest.approx(22.2) and s.forgetting.delta_percent == pytest.approx(11.0)
    assert s.spread["forgetting_percent"].n == 3


def test_a_failed_seed_is_noted_and_left_out():
    ok = StrategyResult(name="ia3", method="ia3", val_loss=2.0)
    bad = StrategyResult(name="ia3", method="ia3", status="failed", error="worker killed by signal 9")
    s = aggregate([(0, ok), (1, bad)])
    assert s.status == "ok" and s.spread["val_loss"].n == 1 and "seed 1 failed: worker killed" in s.notes[0]
    assert aggregate([(0, bad)]).status == "failed"


def test_overlapping_spreads_are_ties_and_the_recommendation_says_so():
    # adapter has the best mean, lora and dora overlap it; full is clearly worse; prefix clearly worse
    strategies = [_strategy("full", [2.60, 2.62, 2.64], artifact="model", size=5 * 10**8),
                  _strategy("lora", [2.30, 2.36, 2.42], size=2 * 10**6),
                  _strategy("dora", [2.31, 2.35, 2.40], size=3 * 10**6),
                  _strategy("adapter", [2.26, 2.33, 2.40], size=10 * 10**6),
                  _strategy("prefix", [3.70, 3.80, 3.90], size=10**6)]
    rec = recommend(strategies, "quality", None, 1)
    # tied on quality; lora (102 MB to serve) and dora (103 MB) are within 2% of the fewest bytes, adapter
    # (110 MB) is not; of the two, dora forgets less (prose ppl 20 + its mean loss: 22.353 against 22.36)
    assert rec.strategy == "dora"
    assert set(rec.tied) == {"lora", "adapter"} and "prefix" not in rec.tied and "full" not in rec.tied
    assert any("indistinguishable in val loss at 3 seeds" in r and "lora" in r and "adapter" in r
               for r in rec.reasons)


def test_without_seeds_the_old_two_percent_rule_holds():
    strategies = [_strategy("lora", [2.30]), _strategy("adapter", [2.20])]
    rec = recommend(strategies, "quality", None, 1)
    assert rec.strategy == "adapter" and rec.tied == []
    assert not any("ties" in r for r in rec.reasons)  # one seed: no spread to tell a tie by


def test_a_clear_winner_at_several_seeds_is_said_to_have_no_tie():
    strategies = [_strategy("lora", [2.30, 2.32]), _strategy("adapter", [2.10, 2.12]), _strategy("ia3", [2.5, 2.6])]
    rec = recommend(strategies, "quality", None, 1)
    assert rec.strategy == "adapter" and rec.tied == []
    assert rec.reasons[1].startswith("no strategy ties with adapter in val loss at 2 seeds: the next, lora")


def test_budget_in_steps_epochs_and_tokens():
    base = Baseline(train_examples=100, train_tokens=5000)  # 50 tokens per example
    assert budget_steps(CompareOptions(max_steps=7), base) == 7
    assert budget_steps(CompareOptions(budget="epochs", epochs=3, batch_size=8), base) == 3 * 13
    assert budget_steps(CompareOptions(budget="tokens", tokens=4000, batch_size=4), base) == 20
    with pytest.raises(TunelabError, match="--budget epochs"):
        budget_steps(CompareOptions(budget="epochs"), Baseline())
    with pytest.raises(ValueError, match="needs tokens"):
        CompareOptions(budget="tokens")


def test_bitfit_gets_norms_only_where_the_model_has_no_biases():
    opts = CompareOptions(methods=["bitfit"])
    options, notes = auto_options(opts, "bitfit", Baseline(bias_terms=False))
    assert options == {"include_norms": True} and "no bias terms" in notes[0]
    assert auto_options(opts, "bitfit", Baseline(bias_terms=True)) == ({}, [])
    user = CompareOptions(methods=["bitfit"], options_for={"bitfit": {"include_norms": False}})
    assert auto_options(user, "bitfit", Baseline(bias_terms=False)) == ({"include_norms": False}, [])
