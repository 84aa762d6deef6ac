"""Cases 39-47 (issue 16): inputs that used to crash or hang get the one-line contract (exit 2, one `error:`
line naming the file, row, key or flag), in bounded time.

Inputs that hung before are run in a subprocess with a timeout, so a regression fails instead of hanging.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from harness import subprocess_env
from test_cli_contract import cli, leftovers, one_line_error, train_artifact, write_jsonl

PAIRS = [{"prompt": f"what is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(16)]
DEEP = "[" * 100_000 + "]" * 100_000
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def cli_process(*argv, timeout: float = 90) -> tuple[int, str]:
    """Run `tunelab ARGV` in a subprocess, bounded in time; return (exit code, stderr)."""
    done = subprocess.run([sys.executable, "-m", "tunelab.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env())
    return done.returncode, done.stderr


def one_line_error_process(*argv, names=(), says=(), timeout: float = 90) -> str:
    code, err = cli_process(*argv, timeout=timeout)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    for needle in (*names, *says):
        assert str(needle) in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("inputs") / "pairs.jsonl", PAIRS)


@pytest.fixture(scope="module")
def lora(tiny_dirs, pairs, tmp_path_factory) -> Path:
    return train_artifact(tiny_dirs["llama"], pairs, tmp_path_factory.mktemp("inputs-run") / "run")


@pytest.fixture
def copy_of(tmp_path):
    def copy(path: Path) -> Path:
        return Path(shutil.copytree(path, tmp_path / path.name))
    return copy


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# --- case 39: JSON nested 100,000 deep ----------------------------------------------------------------------

@pytest.mark.parametrize("where", ["data-row", "adapter_config.json", "tunelab.json", "config.json"])
def test_case39_deeply_nested_json_is_one_line(capsys, tmp_path, tiny_dirs, pairs, lora, copy_of, where):
    model, data, adapter = tiny_dirs["llama"], pairs, copy_of(lora)
    if where == "data-row":
        data = tmp_path / "deep.jsonl"
        data.write_text(json.dumps(PAIRS[0]) + "\n" + '{"prompt": "x", "response": ' + DEEP + "}\n")
        named = [f"{data} line 2"]
    elif where == "config.json":
        model = copy_of(tiny_dirs["llama"])
        (model / "config.json").write_text(DEEP)
        named = [model / "config.json"]
    else:
        (adapter / where).write_text(DEEP)
        named = [adapter / where]
    one_line_error(capsys, "eval", "--model", model, "--data", data, "--adapter", adapter, names=named,
                   says=["nested too deeply"])


# --- case 40: a YAML alias bomb -------------------------------------------------------------------------------

def test_case40_yaml_aliases_are_refused(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    lines.append("method_options: {target_modules: *i}")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 1000
    one_line_error_process("train", "--config", bomb, "--max-steps", "1", names=[bomb, "line 2"],
                           says=["aliases"], timeout=60)


# --- case 41: a data path that is not a regular file ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["fifo", "device-symlink"])
def test_case41_data_that_is_not_a_regular_file_is_refused_before_reading(tmp_path, tiny_dirs, kind):
    data = tmp_path / "data.jsonl"
    if kind == "fifo":
        os.mkfifo(data)
    else:
        device = next(d for d in ("/dev/zero", "/dev/urandom", "/dev/random") if Path(d).is_char_device())
        data.symlink_to(device)
    one_line_error_process("train", "--model", tiny_dirs["llama"], "--data", data, "--max-steps", "1", "--output",
                           tmp_path / "run", names=[data], says=["not a regular file"], timeout=60)


# --- case 42: a huge row; CSV cells as long as JSONL rows -------------------------------------------------------

def test_case42_a_row_over_the_size_limit_is_refused_naming_it(tmp_path, tiny_dirs):
    from tunelab.data.sources import MAX_ROW_CHARS

    data = tmp_path / "big.jsonl"
    rows = [json.dumps(r) for r in PAIRS]
    rows.insert(2, json.dumps({"prompt": "x", "response": "y " * (MAX_ROW_CHARS // 2 + 10)}))
    data.write_text("\n".join(rows) + "\n")
    one_line_error_process("train", "--model", tiny_dirs["llama"], "--data", data, "--max-steps", "1", "--output",
                           tmp_path / "run", names=[f"{data} line 3"], says=["over the limit", str(MAX_ROW_CHARS)],
                           timeout=120)


def test_case42_a_csv_cell_over_128_kib_trains_like_the_same_jsonl_row(capsys, tmp_path, tiny_dirs):
    import csv

    data = tmp_path / "long.csv"
    with open(data, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "response"])
        writer.writerows([[r["prompt"], r["response"]] for r in PAIRS])
        writer.writerow(["tell me a long story", "once upon a time " * 12_000])  # ~200 KB
    code, err = cli(capsys, "train", "--model", tiny_dirs["llama"], "--data", data, "--max-steps", "1",
                    "--batch-size", "4", "--seq-len", "32", "--output", tmp_path / "run", "--quiet")
    assert code == 0, err


# --- case 43: an adapter whose r does not fit its tensors ------------------------------------------------------

@pytest.mark.parametrize("r", [2 ** 40, 300_000])
def test_case43_adapter_r_is_checked_against_the_tensors_before_allocating(capsys, tiny_dirs, pairs, lora,
                                                                          copy_of, r):
    adapter = copy_of(lora)
    _edit_json(adapter / "adapter_config.json", r=r)
    for command, tail in (("eval", ["--data", pairs]), ("merge", ["--output", adapter.parent / "merged"])):
        one_line_error(capsys, command, "--model", tiny_dirs["llama"], "--adapter", adapter, *tail,
                       names=[adapter / "adapter_model.safetensors", Q_A], says=[f"r = {r}", "has shape (8, 32)"])
    assert not (adapter.parent / "merged").exists()


# --- case 44: a model config that disagrees with its weights -----------------------------------------------------

@pytest.mark.parametrize("key, value", [("vocab_size", 400), ("intermediate_size", 80),
                                        ("num_hidden_layers", 10 ** 7)])
def test_case44_model_config_is_checked_against_the_weight_headers(tmp_path, tiny_dirs, pairs, copy_of, key, value):
    model = copy_of(tiny_dirs["llama"])
    _edit_json(model / "config.json", **{key: value})
    one_line_error_process("eval", "--model", model, "--data", pairs, names=[model / "config.json", key],
                           says=["weights"], timeout=60)


# --- case 45: numeric flags of every command, checked before anything loads --------------------------------------

@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test (where the CLI's commands look it up)."""
    import tunelab.models
    import tunelab.serve.service

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    for module in (tunelab.models, tunelab.serve.service):
        monkeypatch.setattr(module, "load_model", no_load)


@pytest.mark.parametrize("argv, flag", [
    (["eval", "--batch-size", "0"], "--batch-size"), (["eval", "--batch-size", "-3"], "--batch-size"),
    (["eval", "--max-examples", "-1"], "--max-examples"), (["eval", "--max-examples", "0"], "--max-examples"),
    (["eval", "--seq-len", "0"], "--seq-len"),
    (["serve", "--port", "99999"], "--port"), (["serve", "--port", "0"], "--port"),
    (["serve", "--max-batch-size", "0"], "--max-batch-size"),
    (["plan", "--batch-size", "0"], "--batch-size"), (["compare", "--tasks", "0"], "--tasks"),
])
def test_case45_numeric_flags_are_validated_before_loading(capsys, no_model_load, tiny_dirs, pairs, argv, flag):
    model_and_data = {"eval": ["--model", tiny_dirs["llama"], "--data", pairs], "serve": ["--model", tiny_dirs["llama"]],
                      "plan": ["--model", tiny_dirs["llama"]], "compare": ["--model", tiny_dirs["llama"]]}
    one_line_error(capsys, argv[0], *model_and_data[argv[0]], *argv[1:], names=[flag])


def test_case45_serve_checks_host_and_adapter_paths_before_loading(capsys, no_model_load, tmp_path, tiny_dirs):
    one_line_error(capsys, "serve", "--model", tiny_dirs["llama"], "--adapter", f"a={tmp_path / 'missing'}",
                   names=[tmp_path / "missing"], says=["not found"])
    one_line_error(capsys, "serve", "--model", tiny_dirs["llama"], "--host", "no such host.invalid",
                   names=["--host"])


# --- case 46: non-finite adapter weights or numbers --------------------------------------------------------------

@pytest.mark.parametrize("bad", ["nan-tensor", "inf-tensor", "alpha-infinity"])
def test_case46_non_finite_adapters_are_refused_naming_the_tensor(capsys, tiny_dirs, pairs, lora, copy_of, bad):
    adapter = copy_of(lora)
    if bad == "alpha-infinity":
        (adapter / "adapter_config.json").write_text(
            (adapter / "adapter_config.json").read_text().replace('"lora_alpha": 16', '"lora_alpha": Infinity'))
        assert math.isinf(json.loads((adapter / "adapter_config.json").read_text())["lora_alpha"])
        named = [adapter / "adapter_config.json", "lora_alpha"]
    else:
        weights = load_file(adapter / "adapter_model.safetensors")
        weights[Q_A][0, 0] = float("nan") if bad == "nan-tensor" else float("inf")
        save_file(weights, adapter / "adapter_model.safetensors")
        named = [adapter / "adapter_model.safetensors", Q_A]
    for command, tail in (("eval", ["--data", pairs, "--json"]), ("merge", ["--output", adapter.parent / "merged"])):
        one_line_error(capsys, command, "--model", tiny_dirs["llama"], "--adapter", adapter, *tail, names=named)
    assert not (adapter.parent / "merged").exists() and leftovers(adapter.parent, "merged") == []
    from tunelab.errors import TunelabError
    from tunelab.serve.service import build_service

    with pytest.raises(TunelabError, match="finite"):
        build_service(str(tiny_dirs["llama"]), {"a": adapter}, device="cpu", dtype="float32").close()
