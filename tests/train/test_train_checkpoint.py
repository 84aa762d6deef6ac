"""Checkpoint files: atomic save, the COMPLETE marker, discovery, retention, stale temp dirs; RNG and metrics."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

from tunelab.train import checkpoint as ckpt
from tunelab.train import rng
from tunelab.train.metrics import MetricsLog, read_metrics


def _writers(payload: bytes):
    return {"a.bin": lambda p: ckpt.write_bytes(p, payload), "b.json": lambda p: ckpt.write_bytes(p, b"{}")}


def test_save_writes_files_and_marker_then_renames(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 3, _writers(b"abc"))
    assert path == tmp_path / "step-3"
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "a.bin", "b.json"]
    marker = json.loads((path / "COMPLETE").read_text())
    assert marker["step"] == 3 and marker["files"]["a.bin"]["bytes"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["step-3"]  # no temp dir left
    assert ckpt.verify(path) is None


def test_find_latest_skips_torn_and_corrupt(tmp_path):
    ckpt.save_checkpoint(tmp_path, 2, _writers(b"good"))
    ckpt.save_checkpoint(tmp_path, 4, _writers(b"later"))
    ckpt.save_checkpoint(tmp_path, 6, _writers(b"newest"))
    (tmp_path / "step-6" / "a.bin").write_bytes(b"NEWEST")  # same size, other bytes
    torn = tmp_path / "step-8"
    torn.mkdir()
    (torn / "a.bin").write_bytes(b"half")  # no marker: killed mid-save
    (tmp_path / "step-4" / "b.json").unlink()
    latest, skipped = ckpt.find_latest(tmp_path)
    assert latest == tmp_path / "step-2"
    reasons = {p.name: why for p, why in skipped}
    assert list(reasons) == ["step-8", "step-6", "step-4"]
    assert "COMPLETE" in reasons["step-8"]
    assert "checksum" in reasons["step-6"]
    assert "missing" in reasons["step-4"]


def test_find_latest_none_when_empty_or_absent(tmp_path):
    assert ckpt.find_latest(tmp_path / "nope") == (None, [])
    assert ckpt.find_latest(tmp_path) == (None, [])


def test_marker_that_is_not_json_is_not_complete(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, _writers(b"x"))
    (path / "COMPLETE").write_text("{not json")
    assert "not valid JSON" in ckpt.verify(path)
    assert ckpt.find_latest(tmp_path)[0] is None


def test_retention_keeps_newest_and_never_deletes_it(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, _writers(b"x"))
    deleted = ckpt.apply_retention(tmp_path, keep_last=2)
    assert sorted(p.name for p in deleted) == ["step-1", "step-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3", "step-4"]
    ckpt.apply_retention(tmp_path, keep_last=None)
    assert len(list(tmp_path.iterdir())) == 2


def test_retention_failure_only_warns(tmp_path, monkeypatch, caplog):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, _writers(b"x"))

    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ckpt.shutil, "rmtree", refuse)
    assert ckpt.apply_retention(tmp_path, keep_last=1) == []
    assert "could not delete old checkpoint" in caplog.text
    assert (tmp_path / "step-2").is_dir()


def test_torn_dir_does_not_count_for_retention(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, _writers(b"x"))
    (tmp_path / "step-5").mkdir()  # torn, newer
    ckpt.apply_retention(tmp_path, keep_last=1)
    assert (tmp_path / "step-1").is_dir()  # the newest complete one survives


def test_resave_same_step_replaces(tmp_path):
    ckpt.save_checkpoint(tmp_path, 2, _writers(b"old"))
    ckpt.save_checkpoint(tmp_path, 2, _writers(b"newer"))
    assert (tmp_path / "step-2" / "a.bin").read_bytes() == b"newer"
    assert [p.name for p in tmp_path.iterdir()] == ["step-2"]


def test_clean_stale_removes_dead_temp_dirs_only(tmp_path):
    dead = tmp_path / ".tmp-step-3-999999999"
    dead.mkdir()
    mine = tmp_path / f".tmp-step-4-{os.getpid()}"
    mine.mkdir()
    alive = tmp_path / f".tmp-step-5-{os.getppid()}"  # the parent process is alive: another writer
    alive.mkdir()
    removed = ckpt.clean_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted([dead.name, mine.name])
    assert alive.is_dir() and not dead.exists()


def test_save_error_removes_temp_dir(tmp_path):
    def boom(path):
        path.write_bytes(b"partial")
        raise ValueError("writer bug")

    try:
        ckpt.save_checkpoint(tmp_path, 1, {"x": boom})
    except ValueError:
        pass
    assert list(tmp_path.iterdir()) == []


def test_rng_roundtrip_through_json():
    rng.seed_everything(5)
    state = json.loads(json.dumps(rng.capture()))
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(7)  # move every generator on
    rng.restore(state)
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_metrics_resume_drops_records_after_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(1, 6):
        log.write({"step": step, "loss": float(step)})
    log.write({"step": 4, "val_loss": 1.5})
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # torn line from a kill
    log = MetricsLog(path, resume_step=3)
    log.write({"step": 4, "loss": float("nan")})
    log.close()
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] is None  # NaN written as null: the file stays valid JSON
    fresh = MetricsLog(path)  # a fresh run starts an empty file
    fresh.close()
    assert path.read_text() == ""
