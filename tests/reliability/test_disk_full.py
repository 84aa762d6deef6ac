"""Case 38 (issue 16): a full disk at every write of a run, a merge and a compare gives one line, "disk full
while writing PATH", exit 2, the previous state intact and no temp file behind.

The disk fills for real only on a real device; here the writes fail as they do then: Python file writes with
OSError ENOSPC after part of the bytes went out, safetensors (Rust) with its SafetensorError for os error 28.
"""

from __future__ import annotations

import errno
import io
from pathlib import Path

import pytest

from test_cli_contract import leftovers, one_line_error, train_artifact, write_jsonl

PAIRS = [{"prompt": f"what is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(16)]
ENOSPC_TEXT = "Error while serializing: I/O error: No space left on device (os error 28)"


class FullFile(io.TextIOWrapper):
    """A text file on a full disk: the first write puts half its bytes down, then fails with ENOSPC."""

    def write(self, text):
        if not text:
            return 0
        super().write(text[: len(text) // 2])
        super().flush()
        raise OSError(errno.ENOSPC, "No space left on device")


def fill_disk_for(monkeypatch, name_part: str) -> None:
    """Files whose name holds `name_part`, opened for writing by Python code (`open`, `Path.write_text`), are
    on a full disk."""
    import builtins

    real_open = builtins.open

    def full_open(path, mode="r", *args, **kwargs):
        if name_part in Path(path).name and ("w" in mode or "a" in mode):
            return FullFile(real_open(path, mode.replace("t", "") + "b" if "b" not in mode else mode),
                            encoding=kwargs.get("encoding") or "utf-8")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_open)
    monkeypatch.setattr(io, "open", full_open)


def fill_disk_for_safetensors(monkeypatch) -> None:
    """Every safetensors file written (by tunelab or by transformers' save_pretrained) fills the disk halfway."""
    import safetensors.torch
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def save_file(tensors, filename, metadata=None):
        data = safetensors.torch.save(tensors, metadata)
        Path(filename).write_bytes(data[: len(data) // 2])
        raise SafetensorError(ENOSPC_TEXT)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", PAIRS)


def train_argv(model, data, out, method="lora", *extra) -> list:
    return ["train", "--model", model, "--data", data, "--method", method, "--max-steps", "1", "--batch-size", "4",
            "--output", out, "--quiet", *extra]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_case38_disk_full_at_the_final_artifact(capsys, monkeypatch, tmp_path, tiny_dirs, data, method):
    out = tmp_path / "run"
    fill_disk_for_safetensors(monkeypatch)
    one_line_error(capsys, *train_argv(tiny_dirs["llama"], data, out, method), names=[out / "artifact"],
                   says=["disk full while writing"])
    assert not (out / "artifact").exists() and leftovers(out, "artifact") == []
    assert not (out / "run.json").exists()  # no finished run is claimed


def test_case38_disk_full_at_run_json(capsys, monkeypatch, tmp_path, tiny_dirs, data):
    out = tmp_path / "run"
    fill_disk_for(monkeypatch, "run.json")
    one_line_error(capsys, *train_argv(tiny_dirs["llama"], data, out), names=[out / "run.json"],
                   says=["disk full while writing"])
    assert not (out / "run.json").exists() and leftovers(out, "run.json") == []


def test_case38_disk_full_at_the_first_metrics_record(capsys, monkeypatch, tmp_path, tiny_dirs, data):
    out = tmp_path / "run"
    fill_disk_for(monkeypatch, "metrics.jsonl")
    one_line_error(capsys, *train_argv(tiny_dirs["llama"], data, out), names=[out / "metrics.jsonl"],
                   says=["disk full while writing"])
    assert not (out / "run.json").exists() and not (out / "artifact").exists() and leftovers(out, "metrics") == []


def test_case38_disk_full_at_the_merge_output(capsys, monkeypatch, tmp_path, tiny_dirs, data):
    adapter = train_artifact(tiny_dirs["llama"], data, tmp_path / "run")
    capsys.readouterr()
    fill_disk_for_safetensors(monkeypatch)
    out = tmp_path / "merged"
    one_line_error(capsys, "merge", "--model", tiny_dirs["llama"], "--adapter", adapter, "--output", out,
                   names=[out], says=["disk full while writing"])
    assert not out.exists() and leftovers(tmp_path, "merged") == []


def test_case38_disk_full_at_the_compare_plots(capsys, monkeypatch, tmp_path, tiny_dirs, data):
    from matplotlib.figure import Figure

    def savefig(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", savefig)
    out = tmp_path / "cmp"
    prose = write_jsonl(tmp_path / "prose.jsonl", [{"text": f"the lazy dog sleeps {i}."} for i in range(4)])
    one_line_error(capsys, "compare", "--model", tiny_dirs["llama"], "--data", data, "--reference-data", prose,
                   "--methods", "lora", "--max-steps", "1", "--batch-size", "2", "--seq-len", "32", "--output", out,
                   names=[out / "plots"], says=["disk full while writing"])
    assert not (out / "plots").exists() and leftovers(out, "plots") == []
