"""RELIABILITY.md cases 1-5: interruption and resume, with real processes killed by real signals.

Each test runs the same config uninterrupted and interrupted-then-resumed in subprocesses (one thread each),
and requires bit-identical results: every logged loss (float equality), every eval record, every artifact
tensor (torch.equal). LoRA dropout is on, so the restored RNG state matters.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys

import pytest
import yaml

from harness import (assert_same_run, base_config, kill_after_windows, kill_at_step,
                     logged_steps, run, saving_now, start, train_losses, wait_until, write_config)
from tunelab.config import RunConfig
from tunelab.errors import ConfigError
from tunelab.train import checkpoint as ckpt
from tunelab.train import train

STEPS = 14  # 36 training examples in windows of 4: 9 steps an epoch, so the run crosses into a second epoch


@pytest.fixture(scope="module")
def base(tiny_dirs, tmp_path_factory) -> dict:
    """The run config every test here shares (the output dir aside)."""
    return base_config(tiny_dirs["llama"], tmp_path_factory.mktemp("resume-data"), STEPS)


def _samples(path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """The uninterrupted run, and the example indices of each of its steps."""
    out = tmp_path_factory.mktemp("reference")
    samples = out / "samples.jsonl"
    done = run(write_config(out / "cfg.json", **base, output=str(out / "run")), HARNESS_SAMPLES=str(samples))
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(train_losses(out / "run")) == list(range(1, STEPS + 1))
    return out / "run", _samples(samples)


def _resume(config, **env):
    cfg = json.loads(config.read_text())
    config.write_text(json.dumps({**cfg, "resume": True}))
    done = run(config, **env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


KILLS = sorted(random.Random(20240611).sample(range(3, 9), 2)) + [random.Random(20240611).randint(11, 13)]


@pytest.fixture(scope="module")
def killed_three_times(base, tmp_path_factory):
    """One run SIGKILLed at three random steps (the last in the second epoch), resumed after each kill.

    Returns the output dir, the step each resume started from, and the samples every process saw.
    """
    tmp = tmp_path_factory.mktemp("killed")
    out = tmp / "run"
    config = write_config(tmp / "cfg.json", **base, output=str(out))
    resumed_from, segments = [0], []
    for i, step in enumerate(KILLS):
        segments.append(tmp / f"samples-{i}.jsonl")
        proc = start(config, HARNESS_STEP_DELAY="0.05", HARNESS_SAMPLES=str(segments[-1]))
        kill_after_windows(proc, segments[-1], step - resumed_from[-1] + 1)  # step `step` is done
        assert proc.returncode == -signal.SIGKILL
        assert not (out / "run.json").exists()  # really killed before the end
        latest = ckpt.find_latest(out / "checkpoints")[0]
        resumed_from.append(int(latest.name.split("-")[1]))
        config.write_text(json.dumps({**json.loads(config.read_text()), "resume": True}))
    segments.append(tmp / "samples-last.jsonl")
    _resume(config, HARNESS_SAMPLES=str(segments[-1]))
    return out, resumed_from[1:], [_samples(p) for p in segments]


def test_case01_sigkill_at_random_steps_resume_bit_identical(reference, killed_three_times):
    out, resumed_from, _ = killed_three_times
    assert len(resumed_from) == 3 and resumed_from == sorted(resumed_from)
    assert_same_run(reference[0], out)


def test_case03_mid_epoch_resume_sees_the_same_samples(reference, killed_three_times):
    out, resumed_from, segments = killed_three_times
    last = json.loads((out / "checkpoints" / f"step-{resumed_from[-1]}" / "state.json").read_text())
    assert last["position"]["epoch"] == 1 and 0 < last["position"]["index"] < 36  # mid second epoch
    # what each process trained on, up to the step the next one resumed from
    starts = [0] + resumed_from
    seen = []
    for i, segment in enumerate(segments):
        if i + 1 < len(starts):
            segment = segment[:starts[i + 1] - starts[i]]
        seen += segment
    assert seen == reference[1]


def test_case02_sigkill_during_save_resumes_from_previous(base, reference, tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "cfg.json", **{**base, "save_every": 3}, output=str(out))
    proc = start(config, TUNELAB_TEST_SAVE_DELAY="0.3")
    root = out / "checkpoints"
    wait_until(lambda: (root / "step-3" / "COMPLETE").exists() and saving_now(out), proc, what="the save of step 6")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    torn = [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert torn and torn[0].startswith(".tmp-step-6-")  # the torn save is there ...
    assert not (root / "step-6").exists()
    assert ckpt.find_latest(root)[0] == root / "step-3"  # ... and never chosen
    samples = tmp_path / "resumed-samples.jsonl"
    _resume(config, HARNESS_SAMPLES=str(samples))
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())  # stale temp dir cleaned
    resumed = [json.loads(line) for line in samples.read_text().splitlines()]
    assert resumed == reference[1][3:]  # it continued from step 3
    assert_same_run(reference[0], out)


def test_case04_sigterm_saves_checkpoint_exits_0_and_resumes(base, reference, tmp_path):
    """Through the `tunelab train` CLI: SIGTERM -> checkpoint at the next step boundary -> exit 0 -> resume."""
    out = tmp_path / "run"
    yaml_cfg = tmp_path / "run.yaml"
    yaml_cfg.write_text(yaml.safe_dump({**base, "save_every": None, "output": str(out)}))
    from harness import subprocess_env

    cmd = [sys.executable, "-m", "tunelab.cli", "train", "--config", str(yaml_cfg), "--quiet"]
    proc = subprocess.Popen(cmd, env=subprocess_env(TUNELAB_TEST_SAVE_DELAY="0.05"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # no periodic saves: the only checkpoint is the one SIGTERM asks for
    wait_until(lambda: len(logged_steps(out)) >= 3, proc, what="step 3")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    saved = ckpt.find_latest(out / "checkpoints")[0]
    assert saved is not None and 3 <= int(saved.name.split("-")[1]) < STEPS
    assert "SIGTERM" in stderr and "--resume" in stderr
    assert stderr.count("stopped by SIGTERM") == 1, stderr  # printed once, not by the log and the CLI both
    assert not (out / "run.json").exists()
    done = subprocess.run(cmd + ["--resume"], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(reference[0], out)


def test_case05_resume_from_missing_dir_names_the_path(base, tmp_path):
    missing = tmp_path / "never-ran"
    with pytest.raises(ConfigError, match=str(missing)):
        train(RunConfig(**{**base, "output": str(missing), "resume": True}), progress=False)


def test_case05_resume_from_dir_without_checkpoint_names_the_path(base, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=f"{empty / 'checkpoints'}.*no complete checkpoint"):
        train(RunConfig(**{**base, "output": str(empty), "resume": True}), progress=False)
    (empty / "checkpoints" / "step-4").mkdir(parents=True)  # only a torn one
    with pytest.raises(ConfigError, match="step-4: no COMPLETE marker"):
        train(RunConfig(**{**base, "output": str(empty), "resume": True}), progress=False)


@pytest.mark.slow
def test_case01_case02_sigkill_at_20_random_points(base, reference, tmp_path):
    rng = random.Random(7)
    for i in range(20):
        out = tmp_path / f"run{i}"
        save_every = rng.choice([1, 2, 3])
        config = write_config(tmp_path / f"cfg{i}.json", **{**base, "save_every": save_every}, output=str(out))
        during_save = i % 4 == 3
        proc = start(config, HARNESS_STEP_DELAY="0.02", TUNELAB_TEST_SAVE_DELAY="0.05" if during_save else "0")
        if during_save:
            wait_until(lambda: saving_now(out) and ckpt.find_latest(out / "checkpoints")[0] is not None, proc,
                       what="a save after the first")
            proc.kill()
            proc.communicate(timeout=60)
        else:
            kill_at_step(proc, out, rng.randrange(save_every + 1, STEPS), signal.SIGKILL)  # after a first save
        _resume(config)
        assert_same_run(reference[0], out)
