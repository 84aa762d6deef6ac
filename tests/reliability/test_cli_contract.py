"""The CLI contract of DESIGN.md and RELIABILITY.md, across commands: exit code 2 and one line on stderr that
starts with `error:` and names the file, option or key; a traceback only with `--debug`; nothing half-written.

The helpers here (`cli`, `one_line_error`, `train_artifact`, ...) are shared by the other reliability files
that drive the real CLI (`test_files.py`, `test_data_errors.py`). `plan` and `compare` are not CLI subcommands
yet, so they have no cases here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunelab.cli import main
from tunelab.errors import ArtifactError

ROOT = Path(__file__).resolve().parents[2]
PAIRS = [{"prompt": f"what is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(12)]


# --- helpers shared with test_files.py and test_data_errors.py ------------------------------------------------

def cli(capsys, *argv) -> tuple[int, str]:
    """Run `tunelab ARGV` in-process; return (exit code, stderr)."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line_error(capsys, *argv, names=(), says=()) -> str:
    """Run the CLI and check the contract for bad input: exit 2, exactly one stderr line starting with `error: `,
    no traceback, naming every item of `names` and saying every item of `says`. Returns that line."""
    code, err = cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in (*names, *says):
        assert str(needle) in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows (any JSON value) one per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_artifact(model_dir: Path, data: Path, out: Path, method: str = "lora", *extra) -> Path:
    """Train one step through the CLI and return the artifact dir."""
    code = main(["train", "--model", str(model_dir), "--data", str(data), "--method", method, "--max-steps", "1",
                 "--batch-size", "4", "--output", str(out), "--quiet", *map(str, extra)])
    assert code == 0 and (out / "artifact").is_dir()
    return out / "artifact"


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `root` (to prove a dir was left exactly as it was)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(parent: Path, name: str) -> list[str]:
    """Temp or half-written siblings of `parent/name` (atomic writes use `.NAME.tmp-*` beside the target)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}"))


# --- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("contract-data") / "pairs.jsonl", PAIRS)


@pytest.fixture(scope="module")
def artifacts(tiny_dirs, pairs, tmp_path_factory) -> dict[str, Path]:
    """One-step artifacts of the tiny Llama: lora (mergeable), prompt and prefix (input-side), full (a model)."""
    root = tmp_path_factory.mktemp("contract-runs")
    return {m: train_artifact(tiny_dirs["llama"], pairs, root / m, m) for m in ("lora", "prompt", "prefix", "full")}


# --- usage errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, closest", [(["trian"], "train"), (["evl"], "eval"), (["merg"], "merge"),
                                            (["method"], "methods")])
def test_unknown_subcommand_suggests_the_closest(capsys, argv, closest):
    line = one_line_error(capsys, *argv, names=[argv[0]])
    assert f"'{closest}'" in line


@pytest.mark.parametrize("argv, closest", [
    (["train", "--max-step", "3"], "--max-steps"),
    (["train", "--seqlen", "8"], "--seq-len"),
    (["eval", "--adaptor", "x", "--model", "m", "--data", "d"], "--adapter"),
    (["merge", "--outptu", "x"], "--output"),
])
def test_unknown_option_suggests_the_closest(capsys, argv, closest):
    one_line_error(capsys, *argv, names=[argv[1]], says=[closest])


@pytest.mark.parametrize("argv, option", [
    (["eval", "--model", "m"], "--data"),
    (["eval", "--data", "d"], "--model"),
    (["merge", "--model", "m", "--adapter", "a"], "--output"),
    (["train", "--max-steps"], "--max-steps"),  # an option without its value
])
def test_missing_required_option_or_value_is_named(capsys, argv, option):
    one_line_error(capsys, *argv, names=[option])


def test_option_value_of_the_wrong_type_names_the_option(capsys):
    one_line_error(capsys, "train", "--max-steps", "three", names=["--max-steps"], says=["integer"])


# --- bad paths --------------------------------------------------------------------------------------------

def test_eval_model_dir_missing_or_not_a_model_names_the_path(capsys, tmp_path, pairs):
    one_line_error(capsys, "eval", "--model", "/missing/model", "--data", pairs, names=["/missing/model"],
                   says=["expected a local HF model dir"])
    (tmp_path / "file").write_text("x")
    one_line_error(capsys, "eval", "--model", tmp_path / "file", "--data", pairs, names=[tmp_path / "file"],
                   says=["is a file"])
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, "eval", "--model", tmp_path / "empty", "--data", pairs,
                   names=[tmp_path / "empty" / "config.json"], says=["not found"])


@pytest.mark.parametrize("command", ["train", "merge"])
def test_output_under_a_file_is_refused_naming_both(capsys, tmp_path, tiny_dirs, pairs, artifacts, command):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "run"
    argv = (["train", "--data", pairs, "--max-steps", "1", "--quiet"] if command == "train"
            else ["merge", "--adapter", artifacts["lora"]])
    one_line_error(capsys, *argv, "--model", tiny_dirs["llama"], "--output", out, names=[out, tmp_path / "afile"],
                   says=["expected a directory path"])
    assert (tmp_path / "afile").read_text() == "x"


def test_unnamed_os_errors_are_one_line_naming_the_path(capsys, tmp_path, tiny_dirs, pairs, monkeypatch):
    """A path the system refuses where no check looked first (here: permission denied creating the run dir)."""
    real_mkdir = Path.mkdir
    out = tmp_path / "locked" / "run"

    def refuse(self, *args, **kwargs):
        if self == out:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    one_line_error(capsys, "train", "--model", tiny_dirs["llama"], "--data", pairs, "--output", out, "--quiet",
                   names=[out], says=["Permission denied"])


# --- --debug ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_raises_the_error_instead_of_one_line(capsys, pairs, where):
    argv = ["eval", "--model", "/missing/model", "--data", str(pairs)]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(ArtifactError, match="/missing/model"):
        main(argv)


def test_traceback_only_with_debug_in_a_real_process(tmp_path, tiny_dirs):
    """The console entry point in a fresh interpreter, failing after the model loaded: stderr is the one error
    line (no loading progress bars, no warnings) and exit 2; with --debug a traceback and exit 1."""
    def run(*argv):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
        return subprocess.run([sys.executable, "-m", "tunelab.cli", *map(str, argv)], capture_output=True,
                              text=True, cwd=tmp_path, timeout=120, env=env)

    missing = tmp_path / "missing.jsonl"
    plain = run("eval", "--model", tiny_dirs["llama"], "--data", missing)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [f"error: {missing}: data file not found; expected a .jsonl, "
                                                 f".csv or .parquet file, or default or default:prose"]
    debug = run("eval", "--model", tiny_dirs["llama"], "--data", missing, "--debug")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and f"DataError: {missing}" in debug.stderr


# --- merge: atomic, never over someone else's files, refuses what cannot merge -------------------------------

@pytest.fixture
def user_dirs(tmp_path, tiny_dirs, artifacts):
    """Dirs a merge must never replace: a user's dir, a copy of the base model dir, a copy of the adapter."""
    import shutil

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not tunelab's")
    shutil.copytree(tiny_dirs["llama"], tmp_path / "base")
    shutil.copytree(artifacts["lora"], tmp_path / "adapter")
    return tmp_path


@pytest.mark.parametrize("output", ["mine", "base", "adapter"])
def test_merge_never_replaces_an_existing_dir(capsys, user_dirs, output):
    base, adapter, target = user_dirs / "base", user_dirs / "adapter", user_dirs / output
    before = tree_digest(target)
    one_line_error(capsys, "merge", "--model", base, "--adapter", adapter, "--output", target,
                   names=[target], says=["not empty", "expected a new or empty directory"])
    assert tree_digest(target) == before and leftovers(user_dirs, output) == []


def test_merge_into_an_empty_dir_writes_a_complete_model(capsys, tmp_path, tiny_dirs, artifacts):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    out.mkdir()
    code, err = cli(capsys, "merge", "--model", tiny_dirs["llama"], "--adapter", artifacts["lora"], "--output", out)
    assert code == 0, err
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert leftovers(tmp_path, "merged") == []
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).state_dict()
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)  # the lora targets, folded in


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EIO])
def test_merge_failing_midway_leaves_nothing_half_written(capsys, tmp_path, tiny_dirs, artifacts, monkeypatch,
                                                          failure):
    """The disk fills (or fails) after part of the model is written: no output dir, no temp dir, exit 2."""
    from transformers import PreTrainedModel

    def torn_save(self, save_directory, *args, **kwargs):
        (Path(save_directory) / "model.safetensors").write_bytes(b"\0" * 100)  # a torn weights file
        raise OSError(failure, "No space left on device" if failure == errno.ENOSPC else "I/O error",
                      str(Path(save_directory) / "model.safetensors"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", torn_save)
    out = tmp_path / "merged"
    says = "disk full" if failure == errno.ENOSPC else "I/O error"
    one_line_error(capsys, "merge", "--model", tiny_dirs["llama"], "--adapter", artifacts["lora"], "--output", out,
                   names=[out], says=[says, "previous contents are intact"])
    assert not out.exists() and leftovers(tmp_path, "merged") == []


@pytest.mark.parametrize("method, says", [("prompt", "soft prompt"), ("prefix", "prefixes"),
                                          ("full", "a whole model dir, not an adapter")])
def test_merge_of_a_non_mergeable_adapter_is_refused_before_loading(capsys, tmp_path, tiny_dirs, artifacts,
                                                                    monkeypatch, method, says):
    import tunelab.models

    def no_load(*args, **kwargs):
        raise AssertionError("the base model was loaded before the refusal")

    monkeypatch.setattr(tunelab.models, "load_model", no_load)
    out = tmp_path / "merged"
    one_line_error(capsys, "merge", "--model", tiny_dirs["llama"], "--adapter", artifacts[method], "--output", out,
                   names=[artifacts[method]], says=[says])
    assert not out.exists() and leftovers(tmp_path, "merged") == []


@pytest.mark.parametrize("command", ["eval", "merge"])
def test_adapter_dir_missing_or_a_file_names_it(capsys, tmp_path, tiny_dirs, pairs, command):
    (tmp_path / "file").write_text("x")
    for adapter, says in ((tmp_path / "nope", "adapter directory not found"),
                          (tmp_path / "file", "is a file, expected an adapter directory")):
        tail = ["--data", pairs] if command == "eval" else ["--output", tmp_path / "out"]
        one_line_error(capsys, command, "--model", tiny_dirs["llama"], "--adapter", adapter, *tail,
                       names=[adapter], says=[says])
    assert not (tmp_path / "out").exists()
