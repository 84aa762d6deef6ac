"""`tunelab train` flags for the keys that were YAML-only: each reaches the run config and changes the run."""

from __future__ import annotations

import json

from tunelab.cli import main


def test_yaml_only_keys_have_flags(tiny_dirs, instruction_jsonl, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_dirs["llama"]), "--data", str(instruction_jsonl), "--max-steps", "2",
            "--batch-size", "2", "--seq-len", "32", "--output", str(out), "--quiet", "--warmup-steps", "2",
            "--schedule", "linear", "--weight-decay", "0.01", "--val-fraction", "0.25", "--eval-every", "1",
            "--eval-batches", "1", "--packing"]
    assert main(argv) == 0
    config = json.loads((out / "run.json").read_text())["config"]
    assert {k: config[k] for k in ("warmup_steps", "schedule", "weight_decay", "val_fraction", "eval_every",
                                   "eval_batches", "packing")} == {
        "warmup_steps": 2, "schedule": "linear", "weight_decay": 0.01, "val_fraction": 0.25, "eval_every": 1,
        "eval_batches": 1, "packing": True}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [1, 2]  # eval_every 1
    assert [r["lr"] for r in records if "loss" in r][0] < [r["lr"] for r in records if "loss" in r][1]  # warmup


def test_bad_flag_values_name_the_key(tiny_dirs, capsys):
    assert main(["train", "--model", str(tiny_dirs["llama"]), "--schedule", "cosin"]) == 2
    assert "schedule" in capsys.readouterr().err
