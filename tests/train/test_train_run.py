"""Whole runs on tiny models: loss goes down, run.json and metrics.jsonl hold what they promise."""

from __future__ import annotations

import json
import math

import pytest
import torch
from builders import arithmetic_pairs, write_jsonl

from tunelab.config import RunConfig
from tunelab.methods import get_method
from tunelab.train import train
from tunelab.train.optim import lr_factor


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("train-data") / "pairs.jsonl"
    return write_jsonl(path, arithmetic_pairs(40))


def _cfg(tiny_dirs, pairs, tmp_path, **values) -> RunConfig:
    base = {"model": str(tiny_dirs["llama"]), "data": str(pairs), "output": str(tmp_path / "run"), "max_steps": 6,
            "batch_size": 4, "lr": 1e-2, "seed": 0}
    return RunConfig(**{**base, **values})


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train_losses(out):
    return [r["loss"] for r in _records(out) if "loss" in r]


@pytest.fixture(scope="module")
def lora_run(tiny_dirs, pairs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-run")
    cfg = _cfg(tiny_dirs, pairs, tmp, max_steps=12, eval_every=5, warmup_steps=2, schedule="linear")
    summary = train(cfg, progress=False)
    return cfg, summary, tmp / "run"


def test_lora_loss_goes_down(lora_run):
    _, summary, out = lora_run
    losses = _train_losses(out)
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    evals = [r for r in _records(out) if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]


def test_full_loss_goes_down_and_trains_everything(tiny_dirs, pairs, tmp_path):
    summary = train(_cfg(tiny_dirs, pairs, tmp_path, method="full", lr=3e-3, max_steps=8), progress=False)
    losses = _train_losses(tmp_path / "run")
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1
    assert summary["params_trainable"] == summary["params_total"] and summary["trainable_percent"] == 100.0
    assert (tmp_path / "run" / "artifact" / "config.json").is_file()


def test_run_json_fields_are_present_and_plausible(lora_run):
    cfg, summary, out = lora_run
    written = json.loads((out / "run.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert summary["status"] == "completed" and summary["steps"] == 12 and summary["method"] == "lora"
    assert summary["config"] == cfg.model_dump(mode="json")
    assert 0 < summary["params_trainable"] < summary["params_total"]
    assert summary["trainable_percent"] == pytest.approx(100 * summary["params_trainable"] / summary["params_total"])
    assert summary["peak_memory_source"] == "os_peak_rss"
    assert summary["peak_memory_bytes"] >= summary["idle_rss_bytes"] > 10 * 2**20
    assert summary["tokens_per_second"] > 0 and "non-pad" in summary["tokens_per_second_counts"]
    assert summary["wall_seconds"] >= summary["train_seconds"] > 0
    artifact_files = [p for p in (out / "artifact").rglob("*") if p.is_file()]
    assert summary["artifact_bytes"] == sum(p.stat().st_size for p in artifact_files) > 0
    assert summary["final_train_loss"] == _train_losses(out)[-1]
    last_eval = [r for r in _records(out) if "val_loss" in r][-1]
    assert last_eval["step"] == 12
    assert summary["final_val_loss"] == last_eval["val_loss"]
    assert summary["val_perplexity"] == pytest.approx(math.exp(summary["final_val_loss"]))
    assert summary["nan_skipped"] == 0
    assert summary["data"] == {"rows": 40, "skipped_empty": 0, "truncated": 0, "dropped": 0,
                               "train_examples": 36, "val_examples": 4}
    assert set(summary["versions"]) == {"tunelab", "torch", "transformers", "python"}
    assert summary["versions"]["torch"] == torch.__version__
    assert summary["device"] == "cpu" and summary["dtype"] == "float32"


def test_metrics_jsonl_records_every_step_and_eval(lora_run):
    cfg, _, out = lora_run
    records = _records(out)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 13))
    for r in train_records:
        assert set(r) == {"step", "loss", "lr", "tokens", "target_tokens", "grad_norm", "elapsed"}
        assert r["lr"] == pytest.approx(1e-2 * lr_factor(r["step"] - 1, warmup=2, total=12, schedule="linear"))
        assert r["tokens"] > r["target_tokens"] > 0 and r["grad_norm"] > 0
    assert [r["step"] for r in records if "val_loss" in r] == [5, 10, 12]
    assert all(set(r) == {"step", "val_loss", "val_perplexity"} for r in records if "val_loss" in r)
    elapsed = [r["elapsed"] for r in train_records]
    assert elapsed == sorted(elapsed)


def test_metrics_tokens_count_non_pad_inputs(tiny_dirs, pairs, tmp_path):
    from tunelab.data import collate, epoch_order, load_data
    from tunelab.models import load_tokenizer

    cfg = _cfg(tiny_dirs, pairs, tmp_path, max_steps=2)
    train(cfg, progress=False)
    data = load_data(str(pairs), load_tokenizer(tiny_dirs["llama"]), "causal-lm", cfg.seq_len)
    order = epoch_order(len(data.train), cfg.seed, 0)
    for record in [r for r in _records(tmp_path / "run") if "loss" in r]:
        idx = order[(record["step"] - 1) * 4:record["step"] * 4]
        batch = collate([data.train[i] for i in idx], 0)
        assert record["tokens"] == sum(len(data.train[i]["input_ids"]) for i in idx)
        assert record["target_tokens"] == int((batch["labels"][:, 1:] != -100).sum())


def test_gradient_accumulation_run_matches_one_big_batch(tiny_dirs, pairs, tmp_path):
    from safetensors.torch import load_file

    big = train(_cfg(tiny_dirs, pairs, tmp_path / "a", batch_size=8, max_steps=3, lr=1e-3), progress=False)
    acc = train(_cfg(tiny_dirs, pairs, tmp_path / "b", batch_size=2, grad_accum=4, max_steps=3, lr=1e-3),
                progress=False)
    assert _train_losses(tmp_path / "a" / "run") == pytest.approx(_train_losses(tmp_path / "b" / "run"), rel=1e-6)
    assert big["final_val_loss"] == pytest.approx(acc["final_val_loss"], rel=1e-6)
    wa = load_file(tmp_path / "a" / "run" / "artifact" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "b" / "run" / "artifact" / "adapter_model.safetensors")
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-6), key


def test_gradient_checkpointing_gives_the_same_losses(tiny_dirs, pairs, tmp_path):
    train(_cfg(tiny_dirs, pairs, tmp_path / "a", max_steps=3), progress=False)
    train(_cfg(tiny_dirs, pairs, tmp_path / "b", max_steps=3, gradient_checkpointing=True), progress=False)
    assert _train_losses(tmp_path / "b" / "run") == pytest.approx(_train_losses(tmp_path / "a" / "run"), rel=1e-6)


def test_default_lr_is_the_methods(tiny_dirs, pairs, tmp_path):
    summary = train(_cfg(tiny_dirs, pairs, tmp_path, lr=None, max_steps=1), progress=False)
    assert summary["lr"] == getattr(get_method("lora"), "default_lr", 2e-4)
    assert _records(tmp_path / "run")[0]["lr"] == summary["lr"]


def test_epochs_decide_the_step_count_and_keep_last_prunes(tiny_dirs, pairs, tmp_path):
    summary = train(_cfg(tiny_dirs, pairs, tmp_path, max_steps=None, epochs=1, save_every=2, keep_last=2),
                    progress=False)
    assert summary["steps"] == 9  # ceil(36 / 4)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-6", "step-8"]


def test_progress_goes_to_stderr_only_when_enabled(tiny_dirs, pairs, tmp_path, capfd):
    train(_cfg(tiny_dirs, pairs, tmp_path / "a", max_steps=2), progress=False)
    quiet = capfd.readouterr()
    train(_cfg(tiny_dirs, pairs, tmp_path / "b", max_steps=2), progress=True)
    loud = capfd.readouterr()
    assert "loss" not in quiet.err and "loss" not in quiet.out
    assert "loss" in loud.err and "loss" not in loud.out


def test_classification_run_trains_the_head(tiny_dirs, tmp_path):
    rows = [{"text": f"{w} {w} number {i}", "label": w} for i in range(30) for w in ("cat", "dog", "bird")][:60]
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig(model=str(tiny_dirs["bert"]), data=str(data), task="classification", method="lora",
                    output=str(tmp_path / "run"), max_steps=6, batch_size=8, lr=1e-2, eval_every=3)
    summary = train(cfg, progress=False)
    assert 0.0 <= summary["val_accuracy"] <= 1.0 and summary["final_val_loss"] > 0
    evals = [r for r in _records(tmp_path / "run") if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and set(evals[0]) == {"step", "val_loss", "val_accuracy"}
    assert all(r["target_tokens"] == 8 for r in _records(tmp_path / "run") if "loss" in r)
