"""Forgetting for classification (`tunelab.measure.probe`): the probe set, the linear probe on a model's pooled
features, its sign, the recommendation and warnings that read it; and a classification compare end to end on a
tiny BERT, with prefix-tuning reported as not applicable."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch
from rich.console import Console

from builders import write_jsonl
from tunelab.errors import DataError
from tunelab.measure.compare_budget import warnings_for
from tunelab.measure.forgetting import forgetting_record
from tunelab.measure.probe import probe_accuracy, probe_examples
from tunelab.measure.recommend import recommend
from tunelab.measure.schema import CompareOptions, CompareResults, StrategyResult
from tunelab.methods import get_method
from tunelab.models import load_model

# two classes with disjoint words and the same token count per text: separable on a model's features, and
# indistinguishable once the word embeddings are gone
FRUIT = ["apple", "banana", "cherry", "grape", "lemon", "mango"]
NUMBER = ["one", "two", "three", "four", "five", "six"]


def separable_rows(n_per_class: int = 24) -> list[dict]:
    rows = []
    for i in range(n_per_class):
        for label, words in (("fruit", FRUIT), ("number", NUMBER)):
            rows.append({"text": " ".join(words[(i + k) % 6] for k in range(4)), "label": label})
    return rows


def test_the_default_probe_set_is_balanced_fixed_and_held_out(tokenizer):
    probe = probe_examples("default:topics", tokenizer, 32)
    assert probe["labels"] == sorted(probe["labels"]) and len(probe["labels"]) == 6
    assert len(probe["train"]) == 180 and len(probe["test"]) == 60  # 40 per class, every 4th held out
    assert set(Counter(e["label"] for e in probe["test"]).values()) == {10}
    assert all(len(e["input_ids"]) <= 32 for e in probe["train"] + probe["test"])
    assert probe_examples("default:topics", tokenizer, 32) == probe  # nothing random


def test_a_user_file_is_capped_per_class_and_prose_is_refused(tmp_path, tokenizer):
    labelled = write_jsonl(tmp_path / "topics.jsonl", separable_rows(200))  # 400 rows, 2 classes
    probe = probe_examples(str(labelled), tokenizer, 16)
    assert len(probe["train"]) + len(probe["test"]) == 240 and len(probe["test"]) == 60
    prose = write_jsonl(tmp_path / "prose.jsonl", [{"text": "general prose without labels"}] * 8)
    with pytest.raises(DataError, match=r"forgetting probe \(--reference-data .*prose.jsonl\).*labelled task"):
        probe_examples(str(prose), tokenizer, 16)
    one_class = write_jsonl(tmp_path / "one.jsonl", [{"text": f"row {i}", "label": "a"} for i in range(8)])
    with pytest.raises(DataError, match="1 classes.*expected at least 2 classes"):
        probe_examples(str(one_class), tokenizer, 16)


def test_the_probe_scores_in_the_unit_interval_deterministically(tiny_dirs):
    lm = load_model(tiny_dirs["bert"], "classification", num_labels=2)
    probe = probe_examples("default:topics", lm.tokenizer, 32)
    first = probe_accuracy(lm.model, probe, lm.pad_id, 16)
    assert 0.0 <= first <= 1.0
    assert probe_accuracy(lm.model, probe, lm.pad_id, 5) == first  # batch size changes nothing
    assert first > 1 / 6  # a random tiny encoder still separates topics better than chance (word overlap)


def token_probe(n_per_class: int = 16, length: int = 6) -> dict:
    """A separable probe set built from token ids: class 0 draws from ids 10-29, class 1 from ids 40-59, every
    example `length` tokens long (so a model that cannot tell tokens apart gives every example the same features)."""
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (torch.randint(0, 20, (length,), generator=gen) + 10 + 30 * c).tolist(), "label": c}
            for _ in range(n_per_class) for c in (0, 1)]
    return {"measure": "probe_accuracy", "labels": ["a", "b"], "train": rows[8:], "test": rows[:8]}


def test_destroyed_features_score_lower_than_the_base(tiny_dirs):
    lm = load_model(tiny_dirs["bert"], "classification", num_labels=2)
    probe = token_probe()
    before = probe_accuracy(lm.model, probe, lm.pad_id, 8)
    with torch.no_grad():
        lm.model.get_input_embeddings().weight.zero_()  # every token looks the same: features carry no class
    after = probe_accuracy(lm.model, probe, lm.pad_id, 8)
    assert before >= 0.9 and after == 0.5, (before, after)  # identical features: one class predicted for all
    record = forgetting_record(before, after, "probe_accuracy")
    assert record.delta == pytest.approx(before - after) and record.delta > 0  # positive is worse
    assert record.delta_percent == pytest.approx(100 * (before - after) / before)
    assert (record.before, record.after) == (before, after) and record.before_perplexity is None


def probed(name: str, after: float, val_accuracy: float = 0.9, **kw) -> StrategyResult:
    return StrategyResult(name=name, method=name, val_loss=0.5, val_accuracy=val_accuracy,
                          forgetting=forgetting_record(0.8, after, "probe_accuracy"), **kw)


def test_the_forgetting_priority_prefers_the_higher_probe_accuracy():
    strategies = [probed("full", 0.60), probed("lora", 0.78), probed("ia3", 0.70),
                  StrategyResult(name="prefix", method="prefix", status="not applicable", error="no cache")]
    rec = recommend(strategies, "forgetting")
    assert rec.strategy == "lora" and rec.ranking == ["lora", "ia3", "full"]
    assert "prefix" not in rec.excluded  # not applicable is no candidate, not a left-out one
    assert any("forgetting probe accuracy 0.780" in r for r in rec.reasons)


def test_the_budget_warning_reads_the_probe(tiny_dirs):
    results = CompareResults(created="x", tunelab_version="x", hardware={"cpu_model": "x", "cpu_cores": 2,
                             "device": "cpu"}, versions={}, config=CompareOptions(task="classification", seeds=2),
                             baseline={"probe_accuracy": 0.8}, strategies=[probed("lora", 0.7995)], steps=3)
    assert results.config.reference_data == "default:topics"
    assert any("forgetting probe's accuracy by less than 1%" in w for w in warnings_for(results))
    results.strategies = [probed("lora", 0.7)]
    assert not any("too small for forgetting" in w for w in warnings_for(results))


@pytest.fixture(scope="module")
def classified(tmp_path_factory, tiny_dirs):
    root = tmp_path_factory.mktemp("compare-cls")
    data = write_jsonl(root / "news.jsonl", [{"text": f"{'good' if i % 2 else 'bad'} news number {i}",
                                              "label": "pos" if i % 2 else "neg"} for i in range(48)])
    probe = write_jsonl(root / "probe.jsonl", separable_rows(16))
    opts = CompareOptions(model=str(tiny_dirs["bert"]), data=str(data), task="classification",
                          reference_data=str(probe), methods=["full", "lora", "prefix"], seeds=2,
                          lr_for={"full": 1e-3}, max_steps=4, batch_size=4, seq_len=16, eval_batches=2,
                          output=str(root / "out"))
    buf = io.StringIO()
    return run_compare_quietly(opts, buf), root / "out", buf.getvalue()


def run_compare_quietly(opts, buf):
    from tunelab.measure.compare import run_compare

    return run_compare(opts, console=Console(file=buf, width=250))


def test_a_classification_compare_measures_forgetting_for_every_row(classified):
    results, out, _ = classified
    base = results.baseline
    assert 0 <= base.probe_accuracy <= 1 and base.reference_perplexity is None
    assert (base.probe_train_examples, base.probe_test_examples, base.probe_classes) == (24, 8, 2)
    for name in ("full", "lora"):
        s = results.strategy(name)
        assert s.status == "ok", s.error
        f = s.forgetting
        assert f.measure == "probe_accuracy" and f.before_accuracy == base.probe_accuracy
        assert 0 <= f.after_accuracy <= 1 and f.delta == pytest.approx(f.before_accuracy - f.after_accuracy)
        assert s.spread["after_accuracy"].n == 2 and [r.values["after_accuracy"] is not None
                                                      for r in s.seed_runs] == [True, True]
    assert CompareResults.model_validate_json((out / "results.json").read_text()) == results
    report = (out / "report.md").read_text()
    assert "forgetting: probe accuracy drop (+ = worse)" in report and f"acc {base.probe_accuracy:.3f} (before)" in report
    assert "linear probe on" in report


def test_prefix_on_an_encoder_classifier_is_not_applicable(classified):
    results, out, text = classified
    prefix = results.strategy("prefix")
    assert prefix.status == "not applicable" and "key/value cache" in prefix.error
    assert prefix.seed_runs == [] and not (out / "runs" / "prefix").exists()  # it never trained
    assert "prefix" not in results.recommendation.excluded and results.recommendation.strategy in {"full", "lora"}
    report = (out / "report.md").read_text()
    assert "| prefix | not applicable |" in report and "**prefix not applicable**" in report
    assert "failed" not in report.split("## Run")[0]


def test_not_applicable_is_decided_from_the_model(tiny_bert, tiny_llama):
    why = get_method("prefix").not_applicable(tiny_bert)
    assert "BertForSequenceClassification takes no key/value cache" in why
    assert get_method("prefix").not_applicable(tiny_llama) is None
    assert all(get_method(m).not_applicable(tiny_bert) is None for m in ("lora", "prompt", "full", "ia3"))
    only = recommend([StrategyResult(name="prefix", method="prefix", status="not applicable", error=why)])
    assert only.strategy is None and only.excluded == {} and "no compared method applies" in only.reasons[0]
