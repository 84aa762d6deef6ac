"""The recommendation rule of docs/compare.md, on synthetic measurements."""

from __future__ import annotations

import pytest

from tunelab.measure.portability import portability_record
from tunelab.measure.recommend import MIN_QUALITY, quality_scores, recommend, storage_for
from tunelab.measure.schema import Forgetting, StrategyResult

GB, MB = 10**9, 10**6
BASE = 540 * MB  # the base model on disk


def strategy(name, val_loss, memory, *, artifact="adapter", size=4 * MB, tps=1000.0, after_ppl=20.0,
             status="ok", error=None, val_accuracy=None) -> StrategyResult:
    return StrategyResult(
        name=name, method=name, status=status, error=error, val_loss=val_loss, val_accuracy=val_accuracy,
        peak_memory_bytes=memory, tokens_per_second=tps, artifact_bytes=size,
        forgetting=Forgetting(before_perplexity=20.0, after_perplexity=after_ppl, delta=after_ppl - 20.0,
                              delta_percent=5 * (after_ppl - 20.0)),
        portability=portability_record(artifact, size, BASE))


def full(val_loss=2.00, memory=int(2.2 * GB), **kw):
    return strategy("full", val_loss, memory, artifact="model", size=BASE, tps=600.0, after_ppl=26.0, **kw)


def lora(val_loss=2.03, memory=int(0.7 * GB), **kw):
    return strategy("lora", val_loss, memory, size=int(4.2 * MB), tps=900.0, after_ppl=21.0, **kw)


def ia3(val_loss=2.15, memory=int(0.65 * GB), **kw):
    return strategy("ia3", val_loss, memory, size=100_000, tps=950.0, after_ppl=20.2, **kw)


def prompt(val_loss=2.60, memory=int(0.5 * GB), **kw):
    return strategy("prompt", val_loss, memory, size=50_000, tps=1200.0, after_ppl=20.0, **kw)


def test_memory_budget_excludes_full_with_the_numbers():
    rec = recommend([full(), lora(), ia3()], priority="quality", gpu_memory=1 * GB)
    assert rec.strategy == "lora"
    assert "full" not in rec.ranking
    assert "2.2 GB exceeds the budget of 1.0 GB" in rec.excluded["full"]


def test_priority_quality_picks_the_best_val_loss():
    # no strategy within 2% of the best: the best val loss wins; the rest follow by quality.
    rec = recommend([lora(val_loss=2.30), full(), ia3()], priority="quality")
    assert rec.strategy == "full"
    assert rec.ranking == ["full", "ia3", "lora"]
    rec = recommend([full(val_loss=2.5), lora(val_loss=2.05), ia3()], priority="quality", tasks=1)
    assert rec.strategy == "lora"


def test_priority_memory_picks_least_memory_above_the_quality_floor():
    # prompt uses the least memory but reaches 2.00 / 2.60 = 77% of the best quality: below the floor.
    rec = recommend([full(), lora(), ia3(), prompt()], priority="memory")
    assert rec.strategy == "ia3"
    assert "prompt" in rec.excluded and "below the 90% floor" in rec.excluded["prompt"]
    assert rec.ranking[-1] == "full"


def test_k_tasks_storage_breaks_a_quality_tie():
    # lora is at 2.00 / 2.03 = 98.5% of full: tied within 2%. Ten tasks: 5.4 GB against 582 MB -> lora.
    strategies = [full(), lora()]
    rec = recommend(strategies, priority="quality", tasks=10)
    assert rec.strategy == "lora"
    assert storage_for(strategies[0], 10) == 10 * BASE
    assert storage_for(strategies[1], 10) == BASE + 10 * int(4.2 * MB)
    assert any("10 task(s) take 582.0 MB against 5.4 GB" in r for r in rec.reasons)
    # one task: full is one model (540 MB), lora the base + its adapter (544.2 MB, 0.8% more): bytes within 2%
    # do not decide; lora forgets less (prose ppl 21 against 26) -> lora
    rec = recommend(strategies, priority="quality", tasks=1)
    assert rec.strategy == "lora"
    assert "then forgets least" in rec.reasons[1]
    # an adapter 3.7% bigger than the one model (20 MB): the bytes decide -> full
    big = strategy("adapter", 2.03, int(0.8 * GB), size=20 * MB, after_ppl=21.0)
    rec = recommend([full(), big], priority="quality", tasks=1)
    assert rec.strategy == "full"
    assert rec.reasons[0] == "full: the best validation loss, 2; adapter reaches 2.03 (98.5% of it)"


def test_forgetting_breaks_a_tie_only_where_measured():
    # no forgetting figure for lora: it counts as the worst; equal forgetting: the better quality decides
    unmeasured = lora()
    unmeasured.forgetting = None
    rec = recommend([full(), unmeasured], priority="quality", tasks=1)
    assert rec.strategy == "full"  # full's forgetting is measured (26), lora's is not (counts as worst)
    both = [full(), lora()]
    both[1].forgetting = both[0].forgetting
    assert recommend(both, priority="quality", tasks=1).strategy == "full"  # equal forgetting: better quality


def test_probe_forgetting_breaks_a_classification_tie():
    def probed(s, after):
        s.forgetting = Forgetting(measure="probe_accuracy", before_accuracy=0.93, after_accuracy=after,
                                  delta=0.93 - after, delta_percent=100 * (0.93 - after) / 0.93)
        return s

    a = probed(full(val_loss=0.16, val_accuracy=0.950), 0.72)
    b = probed(lora(val_loss=0.13, val_accuracy=0.946), 0.905)
    rec = recommend([a, b], priority="quality", tasks=1)
    assert rec.strategy == "lora"  # tied in accuracy, bytes within 2%: the probe keeps more after lora


def test_reasons_are_numbers_against_full():
    rec = recommend([full(), lora()], priority="memory", tasks=10)
    assert rec.strategy == "lora"
    text = " | ".join(rec.reasons)
    assert "quality 98.5% of the best (full)" in text
    assert "peak memory 700.0 MB, 32% of full's 2.2 GB" in text
    assert "4.2 MB per task against 540.0 MB" in text
    assert "900 tokens/s against 600" in text
    assert "+5.0% after training against +30.0% for full" in text


def test_priority_speed_and_forgetting():
    strategies = [full(), lora(), ia3(), prompt()]
    assert recommend(strategies, priority="speed").strategy == "ia3"  # prompt is faster but below the floor
    assert recommend(strategies, priority="forgetting").strategy == "ia3"


def test_failed_strategies_are_left_out_with_their_error():
    bad = lora(status="failed", error="ConfigError: target_modules ['q_proj'] matched no module")
    rec = recommend([full(), bad], priority="memory")
    assert rec.strategy == "full"
    assert rec.excluded["lora"].startswith("failed: ConfigError")
    rec = recommend([bad], priority="quality")
    assert rec.strategy is None and "lora: failed" in rec.reasons[0]


def test_nothing_fits_the_budget():
    rec = recommend([full(), lora()], priority="quality", gpu_memory=100 * MB)
    assert rec.strategy is None
    assert set(rec.excluded) == {"full", "lora"}


def test_classification_quality_uses_accuracy():
    a = lora(val_loss=0.9, val_accuracy=0.80)
    b = ia3(val_loss=0.8, val_accuracy=0.72)  # lower loss, worse accuracy
    scores = quality_scores([a, b])
    assert scores == pytest.approx({"lora": 1.0, "ia3": 0.9})
    assert recommend([a, b], priority="quality").strategy == "lora"
    assert recommend([a, b], priority="quality").reasons[0] == (
        "lora: the best validation accuracy, 0.8; ia3 reaches 0.72 (90.0% of it)")
    zero = [lora(val_loss=0.9, val_accuracy=0.0), ia3(val_loss=0.8, val_accuracy=0.0)]
    assert quality_scores(zero) == pytest.approx({"lora": 0.8 / 0.9, "ia3": 1.0})  # no accuracy: by loss
    c = ia3(val_loss=0.8, val_accuracy=0.70)  # 87.5% of the best accuracy: below the floor for memory
    rec = recommend([a, c], priority="memory")
    assert rec.strategy == "lora" and f"below the {MIN_QUALITY:.0%} floor" in rec.excluded["ia3"]
