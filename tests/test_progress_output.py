"""Progress and output: a bar for validation and for `tunelab eval`, an eval table that names what it scored, and
no transformers progress bar in a piped stderr from merge or a full save."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import tunelab
from tunelab.cli import main
from tunelab.models import load_model
from tunelab.train import progress as progress_module
from tunelab.train.evaluate import batch_count

ROOT = Path(__file__).resolve().parents[1]
HF_BAR_MARKS = ("it/s]", "%|", "Writing model shards", "Loading weights")


@pytest.fixture(scope="module")
def adapter_dir(tiny_dirs, tmp_path_factory) -> Path:
    loaded = load_model(str(tiny_dirs["llama"]), dtype="float32", device="cpu")
    tunelab.attach(loaded.model, "lora", r=2)
    out = tmp_path_factory.mktemp("progress") / "adapter"
    tunelab.save(loaded.model, out, tokenizer=loaded.tokenizer)
    return out


def test_batch_count():
    assert [batch_count(n, 8) for n in (0, 1, 8, 9, 40)] == [0, 1, 1, 2, 5]
    assert batch_count(40, 8, max_batches=3) == 3 and batch_count(9, 8, max_batches=3) == 2


def test_eval_table_names_model_adapter_and_data(capsys, tiny_dirs, instruction_jsonl, adapter_dir):
    model, data = str(tiny_dirs["llama"]), str(instruction_jsonl)
    assert main(["eval", "--model", model, "--adapter", str(adapter_dir), "--data", data, "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines() if line.count("│") == 3}
    assert rows["model"] == model and rows["adapter"] == str(adapter_dir)
    assert rows["data"] == f"{data} (40 examples)" and "loss" in rows and "perplexity" in rows
    assert main(["eval", "--model", model, "--data", data, "--json", "--quiet", "--max-examples", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {k: result[k] for k in ("model", "adapter", "data", "split", "examples")} == {
        "model": model, "adapter": None, "data": data, "split": "all", "examples": 4}


def test_eval_shows_a_bar_of_its_batches(capsys, tiny_dirs, instruction_jsonl):
    argv = ["eval", "--model", str(tiny_dirs["llama"]), "--data", str(instruction_jsonl), "--json"]
    assert main([*argv, "--batch-size", "8"]) == 0
    err = capsys.readouterr().err
    assert "eval" in err and "5/5" in err  # 40 examples in batches of 8
    assert main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_validation_has_its_own_bar_during_training(tiny_dirs, instruction_jsonl, tmp_path, monkeypatch):
    seen = []  # (step, total batches, batches done) of each validation
    original = progress_module.ProgressBar.validating

    def spy(self, total, step):
        with original(self, total, step) as tick:
            (task,) = [t for t in self._progress.tasks if t.description == "validate"]
            yield tick
            seen.append((step, total, int(task.completed)))

    monkeypatch.setattr(progress_module.ProgressBar, "validating", progress_module.contextlib.contextmanager(spy))
    tunelab.train(model=str(tiny_dirs["llama"]), data=str(instruction_jsonl), output=str(tmp_path / "run"),
                  max_steps=4, eval_every=2, batch_size=2, lr=1e-3)
    assert seen == [(2, 2, 2), (4, 2, 2)]  # 4 validation rows (10%) in batches of 2, at steps 2 and 4


def test_validating_bar_is_removed_after(monkeypatch):
    bar = progress_module.ProgressBar(10, 0, enabled=True)
    bar.console = Console(file=open("/dev/null", "w"))
    with bar.validating(3, step=5) as tick:
        tick()
        (task,) = [t for t in bar._progress.tasks if t.description == "validate"]
        assert task.completed == 1 and task.total == 3 and task.fields["info"] == "at step 5"
    assert [t.description for t in bar._progress.tasks] == ["train"]


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tunelab.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=300)


def test_no_transformers_bar_in_piped_stderr_from_merge_or_full_save(tiny_dirs, instruction_jsonl, adapter_dir,
                                                                     tmp_path):
    merged = _cli("merge", "--model", str(tiny_dirs["llama"]), "--adapter", str(adapter_dir),
                  "--output", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    full = _cli("train", "--model", str(tiny_dirs["llama"]), "--data", str(instruction_jsonl), "--method", "full",
                "--max-steps", "1", "--output", str(tmp_path / "full"), "--quiet")
    assert full.returncode == 0, full.stderr[-2000:]
    assert (tmp_path / "full" / "artifact" / "model.safetensors").is_file()
    for done in (merged, full):
        assert not [m for m in HF_BAR_MARKS if m in done.stderr], done.stderr


def test_readme_first_commands_use_compare_s_cpu_budget_and_say_what_the_defaults_cost():
    """The README's first train/compare commands run at compare's CPU budget (minutes on 2 cores, as measured by
    `make demo`), and the README says what train's own defaults cost."""
    from tunelab.measure.schema import CompareOptions

    readme = (ROOT / "README.md").read_text()
    use = readme.split("## Use", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    budget = CompareOptions()
    for line in [ln for ln in use.splitlines() if ln.startswith(("tunelab train", "tunelab compare"))]:
        flags = line.split("#")[0].split()
        value = {f: flags[flags.index(f) + 1] for f in ("--max-steps", "--batch-size", "--seq-len") if f in flags}
        assert int(value["--max-steps"]) <= budget.max_steps, line
        if line.startswith("tunelab train"):
            assert (int(value["--batch-size"]), int(value["--seq-len"])) == (budget.batch_size, budget.seq_len), line
    assert "What these cost on a 2-core CPU" in readme and "`train`'s own defaults" in readme
