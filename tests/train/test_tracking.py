"""`report_to`: TensorBoard event files and wandb runs carry what metrics.jsonl carries, at the same steps."""

from __future__ import annotations

import importlib.machinery
import json
import shutil
import sys
import types

import pytest

from tunelab import tracking
from tunelab.cli import main
from tunelab.config import RunConfig
from tunelab.errors import ConfigError
from tunelab.train import train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


@pytest.fixture
def pairs(instruction_jsonl):
    return instruction_jsonl


def _cfg(tiny_dirs, pairs, out, **values) -> RunConfig:
    base = {"model": str(tiny_dirs["llama"]), "data": str(pairs), "output": str(out), "max_steps": 4,
            "batch_size": 4, "lr": 1e-2, "seed": 0, "eval_every": 2}
    return RunConfig(**{**base, **values})


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _scalars(out) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(out / tracking.TENSORBOARD_DIR))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_events_equal_metrics_jsonl(tiny_dirs, pairs, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny_dirs, pairs, out, report_to="tensorboard"), progress=False)
    records, scalars = _records(out), _scalars(out)
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in losses] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([v for _, v in losses], rel=1e-6)  # float32
    assert [s for s, _ in scalars["train/learning_rate"]] == [1, 2, 3, 4]
    evals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert [s for s, _ in scalars["eval/loss"]] == [s for s, _ in evals] == [2, 4]
    assert [v for _, v in scalars["eval/loss"]] == pytest.approx([v for _, v in evals], rel=1e-6)
    assert "eval/perplexity" in scalars and "train/grad_norm" in scalars


def test_tensorboard_after_resume_holds_each_step_once(tiny_dirs, pairs, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny_dirs, pairs, out, report_to=["tensorboard"], save_every=2), progress=False)
    first = dict(_scalars(out)["train/loss"])
    # make it a run stopped after step 2's checkpoint, then resume: steps 3 and 4 are logged again
    shutil.rmtree(out / "checkpoints" / "step-4")
    shutil.rmtree(out / "artifact")
    (out / "run.json").unlink()
    train(_cfg(tiny_dirs, pairs, out, report_to=["tensorboard"], save_every=2, resume=True), progress=False)
    steps = [s for s, _ in _scalars(out)["train/loss"]]
    assert steps == [1, 2, 3, 4]  # purged and rewritten, not duplicated
    assert dict(_scalars(out)["train/loss"]) == pytest.approx(first)


class _FakeRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.finished = kwargs, [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in `wandb` module recording what tunelab sends (the real one is tested below when installed)."""
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.runs = []

    def init(**kwargs):
        module.runs.append(_FakeRun(**kwargs))
        return module.runs[-1]

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_wandb_gets_each_record_at_its_step(tiny_dirs, pairs, tmp_path, fake_wandb, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    out = tmp_path / "run"
    train(_cfg(tiny_dirs, pairs, out, report_to="wandb"), progress=False)
    (run,) = fake_wandb.runs
    assert run.finished and run.init["project"] == "tunelab" and run.init["dir"] == str(out)
    assert run.init["config"]["method"] == "lora" and run.init["config"]["max_steps"] == 4
    losses = [(r["step"], r["loss"]) for r in _records(out) if "loss" in r]
    assert [(s, v["train/loss"]) for s, v in run.logged if "train/loss" in v] == losses
    assert [s for s, v in run.logged if "eval/loss" in v] == [2, 4]


def test_real_wandb_offline(tiny_dirs, pairs, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(_cfg(tiny_dirs, pairs, out, report_to="wandb", max_steps=2), progress=False)
    assert list((out / "wandb").glob("offline-run-*"))


def test_tags_are_hf_trainers():
    assert tracking.scalars({"step": 3, "loss": 1.5, "lr": 0.1, "val_loss": 2.0, "val_accuracy": 0.5,
                             "elapsed": 1}) == {
        "train/loss": 1.5, "train/learning_rate": 0.1, "eval/loss": 2.0, "eval/accuracy": 0.5, "train/elapsed": 1.0}
    assert tracking.scalars({"step": 1, "loss": None, "grad_norm": float("nan")}) == {}


def test_report_to_values():
    assert RunConfig(report_to="tensorboard").report_to == ["tensorboard"]
    assert RunConfig(report_to="none").report_to == [] and RunConfig().report_to == []
    assert "tensorboard" in RunConfig(report_to="all").report_to


def test_report_to_errors_are_one_line_before_any_model_loads(capsys, monkeypatch):
    code = main(["train", "--model", "/nonexistent/model", "--report-to", "tensorbord"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "unknown tracker 'tensorbord' (did you mean 'tensorboard'?)" in err and "/nonexistent" not in err
    monkeypatch.setattr(tracking, "installed", lambda name: False)
    with pytest.raises(ConfigError, match="report_to.*tensorboard is not installed.*tunelab\\[tracking\\]"):
        tracking.parse_report_to("tensorboard")
