"""Cases 33-37 (issue 16): one writer per run dir, a finished run kept unless `--overwrite`, resume checks the
model and data by content, a swap killed halfway is recovered, stale temp dirs of dead runs are cleaned."""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness import base_config, logged_steps, start, subprocess_env, wait_until, write_config
from test_cli_contract import cli, leftovers, one_line_error, tree_digest, write_jsonl

HERE = Path(__file__).resolve().parent
PAIRS = [{"prompt": f"what is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(16)]


def train_argv(model, data, out, *extra) -> list:
    return ["train", "--model", model, "--data", data, "--max-steps", "2", "--batch-size", "4", "--output", out,
            "--quiet", *extra]


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def killed(point: str, argv: list) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess that SIGKILLs itself at `point` (see kill_at.py)."""
    done = subprocess.run([sys.executable, str(HERE / "kill_at.py"), *map(str, argv)], capture_output=True,
                          text=True, timeout=180, env=subprocess_env(KILL_AT=point))
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    return done


def test_case33_a_second_writer_is_refused_naming_the_holder(capsys, tmp_path, tiny_dirs):
    out = tmp_path / "run"
    config = write_config(tmp_path / "cfg.json", **{**base_config(tiny_dirs["llama"], tmp_path, 40),
                                                    "output": str(out)})
    proc = start(config, HARNESS_STEP_DELAY="0.5")
    try:
        wait_until(lambda: logged_steps(out), proc, what="step 1")
        line = one_line_error(capsys, *train_argv(tiny_dirs["llama"], tmp_path / "pairs.jsonl", out),
                              names=[out, f"pid {proc.pid}"], says=["in use by another tunelab run"])
        assert "--output" in line
        assert logged_steps(out) == sorted(set(logged_steps(out)))  # one run's records only
    finally:
        proc.kill()
        proc.communicate(timeout=60)


def test_case34_a_finished_run_is_kept_unless_overwrite(capsys, tmp_path, tiny_dirs):
    data, out = write_jsonl(tmp_path / "pairs.jsonl", PAIRS), tmp_path / "run"
    assert cli(capsys, *train_argv(tiny_dirs["llama"], data, out))[0] == 0
    before = tree_digest(out)
    one_line_error(capsys, *train_argv(tiny_dirs["llama"], data, out, "--seed", "5"), names=[out, "run.json"],
                   says=["finished run", "--overwrite"])
    assert tree_digest(out) == before
    code, err = cli(capsys, *train_argv(tiny_dirs["llama"], data, out, "--seed", "5", "--overwrite"))
    assert code == 0, err
    assert tree_digest(out)["run.json"] != before["run.json"]


@pytest.fixture
def resumable(capsys, tmp_path, tiny_dirs, monkeypatch):
    """A run with checkpoints, trained on a copy of the tiny model and data named by relative paths."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dirs["llama"], tmp_path / "model")
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    code, err = cli(capsys, *train_argv("model", "pairs.jsonl", "run", "--save-every", "1"))
    assert code == 0, err
    return tmp_path


def test_case35_resume_accepts_the_same_files_by_another_path(capsys, resumable):
    code, err = cli(capsys, *train_argv(resumable / "model", resumable / "pairs.jsonl", resumable / "run",
                                        "--resume"))
    assert code == 0, err


def test_case35_resume_refuses_changed_data_unless_force(capsys, resumable):
    write_jsonl(resumable / "pairs.jsonl", PAIRS[::-1])  # same path, same size, other bytes
    argv = train_argv("model", "pairs.jsonl", "run", "--resume")
    one_line_error(capsys, *argv, names=["pairs.jsonl"], says=["cannot resume", "changed", "--force"])
    code, err = cli(capsys, *argv, "--force")
    assert code == 0, err


def test_case35_resume_refuses_changed_model_weights(capsys, resumable, tokenizer):
    from conftest import build_tiny

    build_tiny("llama", tokenizer, resumable / "model", seed=1)  # same shapes, other weights
    capsys.readouterr()
    one_line_error(capsys, *train_argv("model", "pairs.jsonl", "run", "--resume"), names=["model"],
                   says=["cannot resume", "the model", "changed", "--force"])


def test_case36_a_swap_killed_between_its_renames_is_finished_by_the_next_start(capsys, caplog, tmp_path,
                                                                                tiny_dirs):
    data, out = write_jsonl(tmp_path / "pairs.jsonl", PAIRS), tmp_path / "run"
    assert cli(capsys, *train_argv(tiny_dirs["llama"], data, out))[0] == 0
    killed("moved-aside:artifact", train_argv(tiny_dirs["llama"], data, out, "--seed", "5", "--overwrite"))
    assert not (out / "artifact").exists()  # killed between the two renames
    caplog.set_level(logging.WARNING)
    code, err = cli(capsys, "eval", "--model", tiny_dirs["llama"], "--data", data, "--adapter", out / "artifact",
                    "--json")
    assert code == 0, err
    notes = [r.getMessage() for r in caplog.records if "half-replaced" in r.getMessage()]
    assert len(notes) == 1 and str(out / "artifact") in notes[0]
    assert (out / "artifact" / "adapter_model.safetensors").is_file() and leftovers(out, "artifact") == []


def test_case37_stale_temp_dirs_of_a_killed_merge_are_cleaned_by_the_next_write(capsys, caplog, tmp_path,
                                                                                tiny_dirs):
    from test_cli_contract import train_artifact

    adapter = train_artifact(tiny_dirs["llama"], write_jsonl(tmp_path / "pairs.jsonl", PAIRS), tmp_path / "run")
    parent = tmp_path / "models"
    parent.mkdir()
    killed("saved-model", ["merge", "--model", tiny_dirs["llama"], "--adapter", adapter, "--output",
                           parent / "merged-1"])
    assert leftovers(parent, "merged-1")  # the killed merge's temp dir, weights and all
    live = parent / f".merged-9.tmp-{__import__('os').getpid()}-x"  # a writer still alive: kept
    live.mkdir()
    (parent / ".keep-me.tmp").mkdir()  # not a tunelab temp name: kept
    caplog.set_level(logging.WARNING)
    code, err = cli(capsys, "merge", "--model", tiny_dirs["llama"], "--adapter", adapter, "--output",
                    parent / "merged-2")
    assert code == 0, err
    assert leftovers(parent, "merged-1") == [] and live.is_dir() and (parent / ".keep-me.tmp").is_dir()
    notes = [r.getMessage() for r in caplog.records if "temp file" in r.getMessage()]
    assert len(notes) == 1 and str(parent) in notes[0]
