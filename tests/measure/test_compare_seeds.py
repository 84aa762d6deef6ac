"""`tunelab compare --seeds 2 --tune-lr` end to end on a tiny Llama (through the CLI and a --config YAML; bitfit
alone, the method that also needs compare's automatic include_norms there, to keep the workers few): the
lr search, the seeds and their spread, the base row, bitfit's automatic include_norms, the CPU tensor peak
beside the plan, and the narrow terminal table; plus the lr search alone where one lr is clearly better."""

from __future__ import annotations

import json
import math

import pytest

from builders import write_jsonl
from tunelab.cli import main
from tunelab.measure.schema import CompareResults

STEPS = 4


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    data = write_jsonl(root / "pairs.jsonl", [{"question": f"what is {i} plus {i}?", "answer": f"{i} plus {i} is "
                                               f"{2 * i}."} for i in range(40)])
    prose = write_jsonl(root / "prose.jsonl", [{"text": f"the quick brown fox jumps over the lazy dog {i}. " * 3}
                                               for i in range(12)])
    return root, data, prose


@pytest.fixture(scope="module")
def compared(data_files, tiny_dirs):
    root, data, prose = data_files
    config = root / "compare.yaml"
    config.write_text(f"model: {tiny_dirs['llama']}\ndata: {data}\nreference_data: {prose}\n"
                      f"methods: [bitfit]\nbatch_size: 4\nseq_len: 32\nreference_sequences: 8\ndevices: [cpu]\n")
    out = root / "out"
    code = main(["compare", "--config", str(config), "--max-steps", str(STEPS), "--seeds", "2", "--tune-lr",
                 "--tune-fraction", "0.5", "--columns", "prompt=question,response=answer", "--output", str(out)])
    assert code == 0
    return CompareResults.model_validate_json((out / "results.json").read_text()), out


def test_seeds_give_means_and_spreads(compared):
    results, out = compared
    assert results.config.seeds == 2 and results.config.columns == {"prompt": "question", "response": "answer"}
    assert results.steps == STEPS and results.load_average
    assert results.config.devices == ["cpu"] and results.devices == ["cpu"] and results.hardware.device == "cpu"
    assert "**Devices**: cpu, one worker at a time" in (out / "report.md").read_text()
    for s in results.strategies:
        assert s.status == "ok", s.error
        assert [r.seed for r in s.seed_runs] == [0, 1] and all(r.status == "ok" for r in s.seed_runs)
        losses = [r.values["val_loss"] for r in s.seed_runs]
        sp = s.spread["val_loss"]
        assert sp.kind == "min-max" and (sp.low, sp.high) == (min(losses), max(losses))
        assert s.val_loss == pytest.approx(sum(losses) / 2)
        assert (out / "runs" / s.name / "run.json").exists()
        assert (out / "runs" / f"{s.name}.seed-1" / "run.json").exists()
        seed1 = json.loads((out / "runs" / f"{s.name}.seed-1" / "run.json").read_text())
        assert seed1["config"]["seed"] == 1 and seed1["config"]["columns"] == {"prompt": "question",
                                                                               "response": "answer"}


def test_lr_search_chooses_the_full_runs_lr(compared):
    results, out = compared
    from tunelab.measure.lr_search import MAX_EXTENSIONS
    from tunelab.methods import get_method

    for s in results.strategies:
        search, default = s.lr_search, get_method(s.name).default_lr
        assert search.default_lr == default and search.steps == STEPS // 2
        on_grid = [(lr, loss) for lr, loss in search.curve if lr not in search.extended]
        assert [lr for lr, _ in on_grid] == pytest.approx([0.3 * default, default, 3 * default])
        # beyond the grid only where the grid's best lay at its edge, one grid step (3x) further out each time
        grid_best = min((loss, lr) for lr, loss in on_grid)[1]
        assert bool(search.extended) == (grid_best != default) and len(search.extended) <= MAX_EXTENSIONS
        for lr in search.extended:
            assert any(lr == pytest.approx(other * 3) or lr == pytest.approx(other / (1 / 0.3))
                       for other, _ in search.curve)
        best = min((loss, lr) for lr, loss in search.curve)[1]
        assert search.chosen_lr == best and s.lr == pytest.approx(best)
        assert json.loads((out / "runs" / s.name / "run.json").read_text())["lr"] == pytest.approx(best)
    report = (out / "report.md").read_text()
    assert "lr search" in report and "searched per strategy (--tune-lr)" in report
    assert (out / "plots" / "lr_search.png").exists()


def test_baseline_row(compared):
    results, out = compared
    b = results.baseline
    assert math.isfinite(b.val_loss) and b.val_perplexity == pytest.approx(math.exp(b.val_loss), rel=1e-4)
    assert b.bias_terms is False and b.train_examples > 0 and b.train_tokens > b.train_examples
    report = (out / "report.md").read_text()
    assert "| base (no tuning) | ok | 0 |" in report and f"{b.val_loss:.4f}" in report
    assert "forgot more of general prose, so higher is worse" in report


def test_bitfit_trains_norms_on_a_model_without_biases(compared):
    results, out = compared
    bitfit = results.strategy("bitfit")
    assert bitfit.status == "ok" and bitfit.method_options == {"include_norms": True}
    assert any("no bias terms" in n for n in bitfit.notes)
    assert "no bias terms: compare set include_norms=true" in (out / "report.md").read_text()


def test_cpu_tensor_peak_beside_rss_and_plan(compared):
    results, out = compared
    for s in results.strategies:
        # weights + grads + AdamW state + activations of a tiny model: far below the process's RSS growth
        assert 0 < s.tensor_peak_bytes < s.peak_memory_bytes + 10**9 and s.predicted_memory_bytes > 0
        assert 0.5 < s.predicted_memory_bytes / s.tensor_peak_bytes < 2
    report = (out / "report.md").read_text()
    assert "tensor peak (allocator)" in report and "peak RSS (OS, minus idle)" in report


def test_terminal_table_fits_80_columns(compared):
    import io

    from rich.console import Console

    from tunelab.measure.report import print_table

    results, _ = compared
    buf = io.StringIO()
    print_table(results, Console(file=buf, width=80))
    text = buf.getvalue()
    assert "base" in text and "bitfit" in text and "±" in text and "Full table: report.md" in text
    assert "…" not in text


def test_lr_search_picks_the_clearly_better_lr(tmp_path, tiny_dirs, instruction_jsonl):
    """In the search worker itself: lr 1e-7 barely moves LoRA in 6 steps, 1e-2 learns."""
    from tunelab.config import RunConfig
    from tunelab.measure.compare_worker import _lr_search_worker
    from tunelab.measure.lr_search import choose

    runs = [RunConfig(model=str(tiny_dirs["llama"]), data=str(instruction_jsonl), method="lora", lr=lr,
                      max_steps=6, batch_size=4, seq_len=32, eval_batches=4, output=str(tmp_path / f"lr-{lr:g}"))
            for lr in (1e-7, 1e-2)]
    points = _lr_search_worker({"runs": [r.model_dump(mode="json") for r in runs]})["points"]
    search = choose(2e-4, 6, 0, points)
    assert search.chosen_lr == 1e-2
    (slow, fast) = [loss for _, loss in search.curve]
    assert fast < slow - 0.05


def test_a_typo_in_the_compare_config_names_the_file_and_key(tmp_path, capsys):
    config = tmp_path / "compare.yaml"
    config.write_text("seedz: 3\n")
    assert main(["compare", "--config", str(config), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "'seedz'" in err and "did you mean 'seed" in err
    assert not (tmp_path / "out").exists()
