"""RELIABILITY.md cases 6-8 and the checkpoint guarantees around them, injected in-process.

NaN/inf loss (case 6), out of memory (case 7), disk full while saving (case 8), a torn or corrupted
checkpoint never chosen for a resume, a changed config refused, SIGINT during training.
"""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from harness import artifact_tensors, base_config, train_losses
from tunelab.config import RunConfig
from tunelab.errors import ConfigError, ResourceError
from tunelab.train import TrainingInterrupted, train
from tunelab.train import checkpoint as ckpt
from tunelab.train import loop as loop_module

STEPS = 8


@pytest.fixture(scope="module")
def base(tiny_dirs, tmp_path_factory) -> dict:
    return {**base_config(tiny_dirs["llama"], tmp_path_factory.mktemp("faults-data"), STEPS), "eval_every": None}


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults-ref") / "run"
    train(RunConfig(**base, output=str(out)), progress=False)
    return out


def _cfg(base, out, **changes) -> RunConfig:
    return RunConfig(**{**base, "output": str(out), **changes})


def _adapter(path):
    return load_file(path / "trainable.safetensors")


def test_case06_nan_stops_naming_the_step_and_keeps_last_good_checkpoint(base, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("TUNELAB_TEST_NAN_AT_STEP", "5")
    with pytest.raises(ResourceError, match=r"step 5: training loss is nan.*nan_policy=stop.*step-4"):
        train(_cfg(base, out), progress=False)
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-4"]  # the bad state was not saved
    assert ckpt.find_latest(root)[0] == root / "step-4"
    assert max(train_losses(out)) == 4
    monkeypatch.delenv("TUNELAB_TEST_NAN_AT_STEP")
    train(_cfg(base, out, resume=True), progress=False)  # the kept checkpoint is a good one to go on from
    assert train_losses(out) == train_losses(reference)


def test_case06_nan_skip_policy_skips_the_update_and_counts_it(base, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("TUNELAB_TEST_NAN_AT_STEP", "3")
    summary = train(_cfg(base, out, nan_policy="skip", save_every=1, max_steps=4), progress=False)
    assert summary["nan_skipped"] == 1
    assert json.loads((out / "run.json").read_text())["nan_skipped"] == 1
    records = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert records[3]["loss"] is None and records[4]["loss"] is not None
    root = out / "checkpoints"
    before, skipped, after = _adapter(root / "step-2"), _adapter(root / "step-3"), _adapter(root / "step-4")
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # no update at the NaN step
    assert any(not torch.equal(skipped[k], after[k]) for k in skipped)  # training went on
    assert all(torch.isfinite(t).all() for t in after.values())


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate; "
                                                "out of memory")])
def test_case07_out_of_memory_names_batch_seq_len_and_hints(base, tmp_path, monkeypatch, error):
    def oom(*args, **kwargs):
        raise error

    monkeypatch.setattr(loop_module, "batch_loss_sum", oom)
    with pytest.raises(ResourceError) as info:
        train(_cfg(base, tmp_path / "run"), progress=False)
    message = str(info.value)
    assert "\n" not in message
    for part in ("out of memory at step 1", "batch_size=4", "sequence length", "seq_len=256", "--batch-size",
                 "--seq-len", "--gradient-checkpointing", "PEFT method"):
        assert part in message


def test_case07_other_runtime_errors_are_not_reported_as_oom(base, tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(loop_module, "batch_loss_sum", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        train(_cfg(base, tmp_path / "run"), progress=False)


def test_case08_disk_full_while_saving_keeps_previous_checkpoint(base, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_write = ckpt.write_bytes
    calls = []

    def fill_disk(path, data):
        calls.append(path)
        if "step-4" in str(path) and len([c for c in calls if "step-4" in str(c)]) == 2:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])  # part of the file made it to disk
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(ckpt, "write_bytes", fill_disk)
    with pytest.raises(ResourceError, match=r"checkpoints/step-4: could not write checkpoint \(disk full\)"):
        train(_cfg(base, out), progress=False)
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-2"]  # no temp dir, no step-4
    assert ckpt.verify(root / "step-2") is None
    monkeypatch.setattr(ckpt, "write_bytes", real_write)
    train(_cfg(base, out, resume=True), progress=False)
    assert train_losses(out) == train_losses(reference)


def test_torn_or_corrupt_checkpoints_are_never_chosen(base, reference, tmp_path, caplog):
    out = tmp_path / "run"
    train(_cfg(base, out), progress=False)
    root = out / "checkpoints"
    (root / "step-8" / "COMPLETE").unlink()  # torn: killed before the marker
    blob = root / "step-6" / "trainable.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # corrupted after the fact: size right, checksum wrong
    blob.write_bytes(bytes(data))
    caplog.set_level("WARNING", logger="tunelab.train")
    train(_cfg(base, out, resume=True), progress=False)
    assert "step-8: no COMPLETE marker" in caplog.text.replace("checkpoint ", "").replace(f"{root}/", "")
    assert "does not match its checksum" in caplog.text
    assert train_losses(out) == train_losses(reference)
    ref, got = artifact_tensors(reference), artifact_tensors(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_changed_result_config_is_refused_with_the_keys(base, tmp_path):
    out = tmp_path / "run"
    train(_cfg(base, out, max_steps=2), progress=False)
    with pytest.raises(ConfigError) as info:
        train(_cfg(base, out, max_steps=2, lr=5e-3, batch_size=2, resume=True), progress=False)
    message = str(info.value)
    assert "batch_size: 4 -> 2" in message and "lr: 0.01 -> 0.005" in message and "--force" in message
    assert "seed" not in message
    summary = train(_cfg(base, out, max_steps=3, resume=True, force=True), progress=False)
    assert summary["status"] == "completed" and summary["steps"] == 3


def test_fresh_run_refuses_to_mix_with_old_checkpoints(base, tmp_path):
    out = tmp_path / "run"
    train(_cfg(base, out, max_steps=2), progress=False)
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run.*--resume"):
        train(_cfg(base, out, max_steps=2), progress=False)
    with pytest.raises(ConfigError, match="--overwrite to start over"):  # --force never deletes checkpoints
        train(_cfg(base, out, max_steps=2, force=True), progress=False)
    train(_cfg(base, out, max_steps=2, save_every=None, overwrite=True), progress=False)
    assert not (out / "checkpoints").exists()  # --overwrite started over


def test_sigint_saves_a_checkpoint_and_raises(base, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_log = loop_module.Loop.log

    def log_then_interrupt(self, step, *args):
        real_log(self, step, *args)
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step: handled at the step boundary

    monkeypatch.setattr(loop_module.Loop, "log", log_then_interrupt)
    with pytest.raises(TrainingInterrupted) as info:
        train(_cfg(base, out, save_every=None), progress=False)
    assert info.value.exit_code == 130 and info.value.step == 3
    assert info.value.checkpoint == str(out / "checkpoints" / "step-3")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.setattr(loop_module.Loop, "log", real_log)
    train(_cfg(base, out, save_every=None, resume=True), progress=False)
    assert train_losses(out) == train_losses(reference)
