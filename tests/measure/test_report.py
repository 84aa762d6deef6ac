"""Reports of a compare run on synthetic results: results.json schema, report.md, self-contained report.html,
plots, the terminal table and the progress display."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from pydantic import ValidationError
from rich.console import Console

from tunelab.measure.forgetting import forgetting_record
from tunelab.measure.portability import portability_record
from tunelab.measure.recommend import recommend
from tunelab.measure.report import CompareProgress, print_table, write_reports
from tunelab.errors import ConfigError
from tunelab.measure.schema import Baseline, CompareOptions, CompareResults, Hardware, StrategyResult

MB = 10**6
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(name, artifact, size, val_loss, memory, after_ppl, params):
    curve = [(step, 3.0 - 0.05 * step * (1.5 if artifact == "model" else 1.0)) for step in range(1, 11)]
    return StrategyResult(
        name=name, method=name, family="full" if artifact == "model" else "reparameterisation", lr=1e-4,
        params_total=1_000_000, params_trainable=params, trainable_percent=100 * params / 1_000_000,
        peak_memory_bytes=memory, peak_memory_source="os_peak_rss minus idle RSS", tokens_per_second=800.0,
        wall_seconds=12.5, artifact_bytes=size, final_train_loss=curve[-1][1], val_loss=val_loss,
        val_perplexity=2.718 ** val_loss, forgetting=forgetting_record(20.0, after_ppl),
        portability=portability_record(artifact, size, 4 * MB, attach_seconds=0.02), loss_curve=curve,
        val_curve=[(10, val_loss)])


def synthetic_results(tmp_path, forgetting=True) -> CompareResults:
    strategies = [_run("full", "model", 4 * MB, 2.0, 900 * MB, 25.0, 1_000_000),
                  _run("lora", "adapter", 40_000, 2.02, 300 * MB, 20.5, 10_000),
                  StrategyResult(name="qlora", method="qlora", status="failed",
                                 error="ConfigError: 4-bit base needs torchao on this device")]
    if not forgetting:
        for s in strategies:
            s.forgetting = None
    opts = CompareOptions(model="tiny", output=str(tmp_path), methods=["full", "lora", "qlora"], tasks=10)
    results = CompareResults(
        created="2026-01-01T00:00:00Z", tunelab_version="0.1.0",
        hardware=Hardware(cpu_model="Test CPU", cpu_cores=2, device="cpu"), versions={"torch": "2.13.0"},
        config=opts, baseline=Baseline(base_bytes=4 * MB, reference_perplexity=20.0, reference_sequences=8,
                                       reference_tokens=500),
        strategies=strategies)
    results.recommendation = recommend(strategies, opts.priority, opts.gpu_memory, opts.tasks)
    return results


def test_results_json_round_trips_through_the_schema(tmp_path):
    results = synthetic_results(tmp_path)
    data = json.loads(results.model_dump_json())
    assert data["strategies"][1]["portability"]["serve_bytes"] == {"1": 4_040_000, "10": 4_400_000,
                                                                   "100": 8_000_000}
    again = CompareResults.model_validate(data)
    assert again == results
    assert again.strategy("lora").portability.serve_bytes[100] == 8 * MB
    data["strategies"][0]["surprise"] = 1
    with pytest.raises(ValidationError):
        CompareResults.model_validate(data)


def test_reports_are_written_and_html_embeds_every_plot(tmp_path):
    results = synthetic_results(tmp_path)
    md, html = write_reports(results, tmp_path)
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == ["artifact_size.png", "loss_curves.png", "portability.png", "quality_vs_forgetting.png",
                     "quality_vs_memory.png"]
    page = html.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 5
    assert all(base64.b64decode(img).startswith(PNG_MAGIC) for img in images)
    assert not re.search(r'src="(?!data:)', page) and "<link" not in page  # nothing outside the file
    assert "Recommended: lora" in page and "4-bit base needs torchao" in page
    text = md.read_text()
    assert "Recommended: lora (priority quality, 10 task(s))" in text
    assert "| lora | ok | 10,000 (1%) | 300.0 MB | 40.0 KB |" in text
    assert "| qlora | failed |" in text
    assert "![portability](plots/portability.png)" in text
    assert "+0.5 (+2.5%)" in text  # lora's forgetting: 20.0 -> 20.5 perplexity


def test_plots_without_data_are_left_out(tmp_path):
    results = synthetic_results(tmp_path, forgetting=False)
    md, html = write_reports(results, tmp_path)
    assert not (tmp_path / "plots" / "quality_vs_forgetting.png").exists()
    assert html.read_text().count("data:image/png;base64,") == 4


def test_terminal_table_and_recommendation(tmp_path):
    results = synthetic_results(tmp_path)
    buf = io.StringIO()
    print_table(results, Console(file=buf, width=250))
    out = buf.getvalue()
    assert "Recommended: lora" in out and "left out qlora: failed: ConfigError" in out
    assert "os_peak_rss minus idle RSS" in out
    assert re.search(r"full\s*│\s*ok\s*│\s*1,000,000 \(100%\)", out)


def test_progress_follows_metrics_records():
    buf = io.StringIO()
    with CompareProgress(Console(file=buf, width=200), 2) as progress:
        with progress.strategy("lora", 20) as bar:
            bar.update([{"step": 1, "loss": 3.2}, {"step": 2, "loss": 3.1}, {"step": 2, "val_loss": 3.05}])
            task = progress.progress.tasks[0]
            assert task.completed == 2 and task.fields["loss"] == "loss 3.1000 val 3.0500"
            bar.finish(False, "worker killed by signal 9")
            assert task.fields["loss"].startswith("failed: worker killed") and task.stop_time is not None


def test_progress_counts_an_unplanned_run_in_its_total():
    with CompareProgress(Console(file=io.StringIO(), width=200), 2) as progress:
        for name, unplanned in (("lora lr", False), ("lora lr+1", True), ("lora", False)):
            with progress.strategy(name, 4, unplanned=unplanned):
                pass
        labels = [t.description.split()[0] for t in progress.progress.tasks]
    assert labels == ["[1/2]", "[2/3]", "[3/3]"]


def test_gpu_memory_accepts_sizes():
    assert CompareOptions(gpu_memory="24GB").gpu_memory == 24 * 10**9
    assert CompareOptions(gpu_memory="16GiB").gpu_memory == 16 * 2**30
    assert CompareOptions(gpu_memory=512 * MB).gpu_memory == 512 * MB
    with pytest.raises(ConfigError, match="--gpu-memory 'lots': expected a positive size like 80GB"):
        CompareOptions(gpu_memory="lots")
