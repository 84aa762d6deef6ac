"""`tunelab compare` end to end on a tiny Llama: every figure measured, present and plausible; a failing
strategy recorded without stopping the others; the reports written; plus the option parsing."""

from __future__ import annotations

import io
import json
import math
import signal
import subprocess
import sys
import time

import pytest
from rich.console import Console

from builders import write_jsonl
from tunelab.errors import ConfigError, TunelabError
from tunelab.measure.compare import (build_options, parse_lr_for, parse_options_for, run_compare,
                                     select_methods, speed_from_metrics)
from tunelab.measure.recommend import recommend
from tunelab.measure.schema import TASK_COUNTS, CompareOptions, CompareResults

STEPS = 6
LORA = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
# tiny llama: hidden 32, 4 heads of 8, 2 kv heads -> q_proj 32x32, v_proj 32x16; 2 layers
LORA_PARAMS = 2 * (4 * (32 + 32) + 4 * (32 + 16))


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_dirs):
    root = tmp_path_factory.mktemp("compare")
    data = write_jsonl(root / "pairs.jsonl", [{"prompt": f"what is {i} plus {i}?", "response": f"{i} plus {i} is "
                                               f"{2 * i}."} for i in range(40)])
    prose = write_jsonl(root / "prose.jsonl", [{"text": f"the quick brown fox jumps over the lazy dog {i}. " * 3}
                                               for i in range(12)])
    opts = CompareOptions(model=str(tiny_dirs["llama"]), data=str(data), reference_data=str(prose),
                          methods=["full", "lora", "ia3", "bitfit"],
                          # bitfit without norms on a model without biases: the strategy that fails
                          options_for={"lora": LORA, "bitfit": {"include_norms": False}},
                          lr_for={"full": 1e-3}, max_steps=STEPS, batch_size=4, seq_len=32, reference_sequences=8,
                          tasks=10, output=str(root / "out"))
    buf = io.StringIO()
    results = run_compare(opts, console=Console(file=buf, width=250))
    return results, root / "out", buf.getvalue()


def test_results_json_follows_the_schema(compared):
    results, out, _ = compared
    on_disk = CompareResults.model_validate_json((out / "results.json").read_text())
    assert on_disk == results
    assert [s.name for s in on_disk.strategies] == ["full", "lora", "ia3", "bitfit"]
    assert on_disk.hardware.cpu_cores >= 1 and on_disk.hardware.device == "cpu"
    assert on_disk.versions["torch"].startswith("2.") and on_disk.config.max_steps == STEPS


def test_every_figure_is_measured_and_plausible(compared):
    results, _, _ = compared
    base = results.baseline
    assert base.reference_sequences == 8 and base.reference_tokens > 0 and 1 < base.reference_perplexity < 1e4
    for s in results.strategies[:3]:
        assert s.status == "ok", s.error
        assert s.params_total > s.params_trainable > 0 or s.name == "full"
        assert 0 < s.peak_memory_bytes < 8 * 10**9 and "rss" in s.peak_memory_source.lower()
        assert s.tokens_per_second > 0 and s.wall_seconds > 0
        assert s.artifact_bytes > 0 and s.lr > 0
        assert math.isfinite(s.val_loss) and s.val_perplexity == pytest.approx(math.exp(s.val_loss), rel=1e-4)
        assert [step for step, _ in s.loss_curve] == list(range(1, STEPS + 1))
        f = s.forgetting
        assert f.before_perplexity == base.reference_perplexity and f.after_perplexity > 0
        assert f.delta == pytest.approx(f.after_perplexity - f.before_perplexity)
        p = s.portability
        assert p.attach_seconds > 0 and sorted(p.serve_bytes) == list(TASK_COUNTS)
        assert s.predicted_memory_bytes > 0  # tunelab plan's estimate for the same run


def test_full_against_lora(compared):
    results, _, _ = compared
    full, lora = results.strategy("full"), results.strategy("lora")
    assert full.params_trainable == full.params_total and full.trainable_percent == 100
    assert lora.params_trainable == LORA_PARAMS and lora.trainable_percent < 5
    assert lora.params_total == full.params_total + LORA_PARAMS
    assert full.artifact_bytes > 10 * lora.artifact_bytes
    assert full.lr == 1e-3 and lora.lr == lora_default_lr()
    # whole models: K copies; adapters: one base + K adapters
    assert full.portability.serve_bytes[10] == 10 * full.artifact_bytes
    assert lora.portability.serve_bytes[10] == results.baseline.served_bytes + 10 * lora.artifact_bytes
    assert abs(results.baseline.served_bytes - full.artifact_bytes) < 0.05 * full.artifact_bytes  # like for like
    assert full.portability.switch_seconds is None and lora.portability.switch_seconds >= 0
    # full fine-tuning at lr 1e-3 moves every weight: the prose perplexity changes
    assert full.forgetting.after_perplexity != pytest.approx(full.forgetting.before_perplexity, rel=1e-6)


def lora_default_lr() -> float:
    from tunelab.methods import get_method

    return get_method("lora").default_lr


def test_a_failing_strategy_is_recorded_and_the_others_run(compared):
    results, _, text = compared
    bitfit = results.strategy("bitfit")  # the tiny Llama has no biases
    assert bitfit.status == "failed" and "bias" in bitfit.error
    assert results.recommendation.excluded["bitfit"].startswith("failed:")
    assert all(s.status == "ok" for s in results.strategies[:3])
    assert "bitfit" in text and "failed" in text


def test_reports_and_recommendation(compared):
    results, out, text = compared
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "artifact_size.png", "loss_curves.png", "portability.png", "quality_vs_forgetting.png",
        "quality_vs_memory.png"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5
    assert (out / "report.md").read_text().count("\n| ") >= 5  # header, rule and one row per strategy
    expected = recommend(results.strategies, "quality", None, 10)
    assert results.recommendation == expected and expected.strategy in {"full", "lora", "ia3"}
    assert f"Recommended: {expected.strategy}" in text and f"report: {out / 'report.html'}" in text


def test_a_bad_model_path_stops_before_any_strategy(tmp_path, instruction_jsonl):
    opts = CompareOptions(model=str(tmp_path / "missing"), data=str(instruction_jsonl), methods=["lora"],
                          max_steps=1, output=str(tmp_path / "out"))
    with pytest.raises(TunelabError, match="missing"):
        run_compare(opts, console=Console(file=io.StringIO()))
    assert not (tmp_path / "out" / "runs" / "lora").exists()


def test_option_parsing():
    assert parse_lr_for(["lora=3e-4", "full=2e-5"]) == {"lora": 3e-4, "full": 2e-5}
    assert parse_options_for(["lora.r=16", "lora.target_modules=[q_proj,v_proj]"]) == {
        "lora": {"r": 16, "target_modules": ["q_proj", "v_proj"]}}
    with pytest.raises(ConfigError, match="expected METHOD=LR"):
        parse_lr_for(["lora:3e-4"])
    with pytest.raises(ConfigError, match="expected METHOD.KEY=VALUE"):
        parse_options_for(["r=16"])
    with pytest.raises(ConfigError, match="did you mean 'lora'"):
        select_methods(CompareOptions(methods=["lora", "full"], lr_for={"lroa": 1e-4}))
    with pytest.raises(ConfigError, match="unknown method 'lorra'"):
        select_methods(CompareOptions(methods=["lorra"]))


def test_options_from_cli_values(tmp_path):
    opts = build_options({"methods": "full, lora", "lr_for": ["lora=3e-4"], "options_for": ["lora.r=8"],
                          "gpu_memory": "24GB", "tasks": 10, "max_steps": None})
    assert opts.methods == ["full", "lora"] and opts.lr_for == {"lora": 3e-4}
    assert opts.options_for == {"lora": {"r": 8}} and opts.gpu_memory == 24 * 10**9 and opts.max_steps == 20
    with pytest.raises(ConfigError, match="key 'priority'"):
        build_options({"priority": "cheap"})
    with pytest.raises(ConfigError, match="unknown key 'max_step'.*did you mean 'max_steps'"):
        build_options({"max_step": 3})
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file, expected a directory"):
        run_compare(CompareOptions(output=str(tmp_path / "file"), methods=["lora"]))


def test_a_worker_past_its_time_limit_is_killed(tmp_path):
    from tunelab.measure.compare import _exit_reason, _wait

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    start = time.monotonic()
    assert _wait(proc, poll=None, timeout_s=0.5) is True
    assert proc.returncode == -signal.SIGKILL and time.monotonic() - start < 10
    log = tmp_path / "worker.log"
    log.write_text("Traceback ...\nRuntimeError: boom\n")
    assert _exit_reason(-9, log) == f"worker killed by signal 9 (out of memory?); see {log}"
    assert _exit_reason(1, log) == "worker exited with code 1: RuntimeError: boom"


def test_speed_leaves_out_warmup_steps():
    records = [{"step": i, "loss": 1.0, "tokens": 100, "elapsed": 0.5 * i + (2.0 if i > 1 else 0)}
               for i in range(1, 6)] + [{"step": 5, "val_loss": 1.0}]
    # step 1 takes 0.5 s, step 2 takes 2.5 s (warm-up); steps 3-5 take 0.5 s each: 300 tokens in 1.5 s
    tps, seconds = speed_from_metrics(records, warmup_steps=2)
    assert seconds == pytest.approx(1.5) and tps == pytest.approx(200.0)
    assert speed_from_metrics(records[:2], warmup_steps=2) == (None, None)


def test_options_reach_results_json_verbatim(compared):
    _, out, _ = compared
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["options_for"] == {"lora": LORA, "bitfit": {"include_norms": False}}
    assert config["lr_for"] == {"full": 1e-3}
