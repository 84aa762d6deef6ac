"""RELIABILITY.md cases 9-15, files from outside, through the real CLI (`tunelab eval`, `merge`, `train`).

Each case runs over a family of variations (other corruptions, other ways a file can lie), and each one checks
the CLI contract: exit 2, one line naming the file (and the key, parameter or field), nothing executed or
allocated that should not be, and no output left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli_contract import ROOT, cli, one_line_error, pairs, train_artifact, write_jsonl  # noqa: F401 (pairs)

from tunelab.cli import main

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


# --- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora(tiny_dirs, pairs, tmp_path_factory) -> Path:
    """A rank-4 LoRA of the tiny Llama on q_proj/v_proj, trained one step through the CLI."""
    return train_artifact(tiny_dirs["llama"], pairs, tmp_path_factory.mktemp("files-lora") / "run", "lora",
                          "--set", "r=4")


@pytest.fixture(scope="module")
def bert_lora(tiny_dirs, tmp_path_factory) -> tuple[Path, Path]:
    """(artifact, data) of a classification LoRA of the tiny BERT (its head is saved with it)."""
    root = tmp_path_factory.mktemp("files-bert")
    data = write_jsonl(root / "topics.jsonl", [{"text": f"text number {i}", "label": "ab"[i % 2]} for i in range(8)])
    return train_artifact(tiny_dirs["bert"], data, root / "run", "lora", "--task", "classification"), data


@pytest.fixture
def copy_of(tmp_path):
    """copy_of(dir) -> a writable copy under tmp_path."""
    def copy(src: Path, name: str = "copy") -> Path:
        return Path(shutil.copytree(src, tmp_path / name))
    return copy


class Trap:
    """Unpickling this creates `marker`: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- case 9: truncated or corrupted .safetensors ------------------------------------------------------------

def _rewrite_header(data: bytes, edit) -> bytes:
    """`data` with its JSON header changed by `edit(header)` and the tensor bytes kept."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header, next(k for k in header if k != "__metadata__"))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def corruptions(data: bytes) -> dict[str, bytes]:
    """Ways a safetensors file can be truncated or lie, from the bytes of a valid one."""
    (n,) = struct.unpack("<Q", data[:8])
    body = len(data) - 8 - n
    return {
        "empty": b"",
        "7-bytes": data[:7],
        "8-bytes": data[:8],
        "mid-header": data[:8 + n // 2],
        "mid-data": data[:8 + n + body // 2],
        "header-length-2**62": (2**62).to_bytes(8, "little") + data[8:],
        "header-not-json": data[:8] + b"\xff" * n + data[8 + n:],
        "offsets-out-of-range": _rewrite_header(data, lambda h, k: h[k].update(data_offsets=[0, 10**12])),
        "dtype-unknown": _rewrite_header(data, lambda h, k: h[k].update(dtype="Q7")),
        "shape-lies": _rewrite_header(data, lambda h, k: h[k].update(shape=[10**6, 10**6])),
    }


CORRUPTIONS = ["empty", "7-bytes", "8-bytes", "mid-header", "mid-data", "header-length-2**62", "header-not-json",
               "offsets-out-of-range", "dtype-unknown", "shape-lies"]


@pytest.mark.parametrize("variant", CORRUPTIONS)
def test_case09_corrupt_safetensors_in_a_model_dir_names_the_file(capsys, tiny_dirs, pairs, copy_of, variant):
    model = copy_of(tiny_dirs["llama"])
    file = model / "model.safetensors"
    file.write_bytes(corruptions(file.read_bytes())[variant])
    one_line_error(capsys, "eval", "--model", model, "--data", pairs, names=[file], says=["safetensors"])


@pytest.mark.parametrize("command", ["eval", "merge"])
@pytest.mark.parametrize("variant", CORRUPTIONS)
def test_case09_corrupt_safetensors_in_an_adapter_dir_names_the_file(capsys, tiny_dirs, pairs, lora, copy_of,
                                                                     tmp_path, command, variant):
    adapter = copy_of(lora)
    file = adapter / WEIGHTS
    file.write_bytes(corruptions(file.read_bytes())[variant])
    tail = ["--data", pairs] if command == "eval" else ["--output", tmp_path / "merged"]
    one_line_error(capsys, command, "--model", tiny_dirs["llama"], "--adapter", adapter, *tail, names=[file],
                   says=["safetensors"])
    assert not (tmp_path / "merged").exists()


_LIMITED_RUNNER = """
import contextlib, io, json, os, resource, sys
from tunelab.cli import main
pages = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
limit = pages + (1 << 30)  # what is mapped now plus 1 GiB: room to load a tiny model, not a lying header
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    bytearray(1 << 31)
    enforced = False
except MemoryError:
    enforced = True
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    results.append([code, err.getvalue()])
print(json.dumps({"enforced": enforced, "results": results}))
"""


def test_case09_lying_header_lengths_never_allocate_a_huge_buffer(tiny_dirs, pairs, lora, tmp_path):
    """Header lengths of 2**62, 2**40 and 2**31 bytes, and a shape of 10**12 elements, in model and adapter
    files, read in a process whose address space is capped at 1 GiB above what it already maps: a huge
    allocation would fail (or abort the process); each must be a one-line error naming the file instead."""
    argvs, files = [], []
    for length in (2**62, 2**40, 2**31):
        model = Path(shutil.copytree(tiny_dirs["llama"], tmp_path / f"model-{length}"))
        adapter = Path(shutil.copytree(lora, tmp_path / f"adapter-{length}"))
        for file in (model / "model.safetensors", adapter / WEIGHTS):
            file.write_bytes(length.to_bytes(8, "little") + file.read_bytes()[8:])
        argvs += [["eval", "--model", str(model), "--data", str(pairs)],
                  ["eval", "--model", str(tiny_dirs["llama"]), "--adapter", str(adapter), "--data", str(pairs)]]
        files += [model / "model.safetensors", adapter / WEIGHTS]
    adapter = Path(shutil.copytree(lora, tmp_path / "adapter-shape"))
    lie = corruptions((adapter / WEIGHTS).read_bytes())["shape-lies"]
    (adapter / WEIGHTS).write_bytes(lie)
    argvs.append(["merge", "--model", str(tiny_dirs["llama"]), "--adapter", str(adapter), "--output",
                  str(tmp_path / "merged")])
    files.append(adapter / WEIGHTS)
    proc = subprocess.run([sys.executable, "-c", _LIMITED_RUNNER, json.dumps(argvs)], capture_output=True,
                          text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"),
                                                       "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]  # no crash, no abort
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["enforced"]  # the cap is real: 2 GiB could not be allocated under it
    for (code, err), file in zip(report["results"], files):
        assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {file}: "), err


@pytest.mark.parametrize("variant", ["empty", "mid-data", "header-not-json"])
def test_case09_corrupt_checkpoint_weights_are_refused_on_resume(capsys, checkpointed, variant):
    """A checkpoint edited by hand (its COMPLETE marker updated to match) still cannot crash a resume."""
    run, argv = checkpointed
    file = run / "checkpoints" / "step-2" / "trainable.safetensors"
    with swapped_checkpoint_file(file, corruptions(file.read_bytes())[variant]):
        one_line_error(capsys, *argv, "--resume", names=[file], says=["safetensors"])


# --- case 10: pickle files are never unpickled --------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpointed(tiny_dirs, pairs, tmp_path_factory) -> tuple[Path, list]:
    """A finished 2-step run with checkpoints at steps 1 and 2, and the argv that made it."""
    run = tmp_path_factory.mktemp("files-ckpt") / "run"
    argv = ["train", "--model", tiny_dirs["llama"], "--data", pairs, "--max-steps", "2", "--batch-size", "4",
            "--save-every", "1", "--output", run, "--quiet"]
    assert main([str(a) for a in argv]) == 0
    return run, argv


@contextlib.contextmanager
def swapped_checkpoint_file(file: Path, data: bytes):
    """Replace a checkpoint file and its entry in the COMPLETE marker (a hand-edited checkpoint); restore both after."""
    marker_file = file.parent / "COMPLETE"
    saved, marker = file.read_bytes(), marker_file.read_text()
    entries = json.loads(marker)
    entries["files"][file.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    file.write_bytes(data)
    marker_file.write_text(json.dumps(entries))
    try:
        yield
    finally:
        file.write_bytes(saved)
        marker_file.write_text(marker)


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.pt", "model.ckpt"])
def test_case10_pickle_only_model_dir_is_refused_and_never_unpickled(capsys, tiny_dirs, pairs, lora, copy_of,
                                                                       tmp_path, weights):
    model = copy_of(tiny_dirs["llama"])
    marker = tmp_path / "unpickled"
    (model / "model.safetensors").unlink()
    (model / weights).write_bytes(pickle.dumps(Trap(marker)))
    for tail in (["eval", "--data", pairs], ["train", "--data", pairs, "--output", tmp_path / "run", "--quiet"],
                 ["merge", "--adapter", lora, "--output", tmp_path / "merged"]):
        one_line_error(capsys, *tail, "--model", model, names=[model, weights], says=["never unpickles"])
    assert not marker.exists() and not (tmp_path / "merged").exists()


def test_case10_pickle_beside_safetensors_is_ignored(capsys, tiny_dirs, pairs, lora, copy_of, tmp_path):
    """A dir holding both: the safetensors file is used, the pickle never opened as a pickle."""
    marker = tmp_path / "unpickled"
    model, adapter = copy_of(tiny_dirs["llama"], "model"), copy_of(lora, "adapter")
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(Trap(marker)))
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Trap(marker)))
    code, err = cli(capsys, "eval", "--model", model, "--adapter", adapter, "--data", pairs, "--json")
    assert code == 0, err
    assert not marker.exists()


@pytest.mark.parametrize("command", ["eval", "merge"])
def test_case10_pickle_only_adapter_dir_is_refused_and_never_unpickled(capsys, tiny_dirs, pairs, lora, copy_of,
                                                                       tmp_path, command):
    adapter = copy_of(lora)
    marker = tmp_path / "unpickled"
    (adapter / WEIGHTS).unlink()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Trap(marker)))
    tail = ["--data", pairs] if command == "eval" else ["--output", tmp_path / "merged"]
    one_line_error(capsys, command, "--model", tiny_dirs["llama"], "--adapter", adapter, *tail,
                   names=[adapter / WEIGHTS, "adapter_model.bin"], says=["never loaded"])
    assert not marker.exists() and not (tmp_path / "merged").exists()


@pytest.mark.parametrize("form", ["raw-pickle", "torch-zip"])
def test_case10_malicious_optimizer_pt_is_refused_on_resume(capsys, checkpointed, tmp_path, form):
    """optimizer.pt is read with weights_only=True and no fallback: a pickle that runs code is refused unrun."""
    run, argv = checkpointed
    file = run / "checkpoints" / "step-2" / "optimizer.pt"
    marker = tmp_path / "unpickled"
    if form == "raw-pickle":
        data = pickle.dumps(Trap(marker))
    else:  # torch.save's zip container around the same trap
        buf = io.BytesIO()
        torch.save({"optimizer": Trap(marker), "scheduler": {}}, buf)
        data = buf.getvalue()
    with swapped_checkpoint_file(file, data):
        one_line_error(capsys, *argv, "--resume", names=[file], says=["weights-only"])
    assert not marker.exists()


def test_case10_every_torch_load_is_weights_only(capsys, checkpointed, monkeypatch):
    """A real resume: every torch.load call asks for weights_only=True."""
    run, argv = checkpointed
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    code, err = cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert calls and all(c is True for c in calls)


# --- case 11: remote code -----------------------------------------------------------------------------------

REMOTE_CODE = '''
from pathlib import Path
Path({marker!r}).write_text("ran")  # proof this file was executed
from transformers import LlamaConfig, LlamaForCausalLM


class TinyConfig(LlamaConfig):
    model_type = "tunelab-test-tiny"


class TinyForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig
'''


@pytest.fixture
def remote_code_model(tiny_dirs, copy_of, tmp_path) -> tuple[Path, Path]:
    """(model dir whose config.json maps to its own custom_tiny.py, the file that code writes when it runs)."""
    model, marker = copy_of(tiny_dirs["llama"]), tmp_path / "remote-code-ran"
    (model / "custom_tiny.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="tunelab-test-tiny",
                  auto_map={"AutoConfig": "custom_tiny.TinyConfig", "AutoModelForCausalLM": "custom_tiny.TinyForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


def _needs_code_elsewhere(model: Path, where: str) -> None:
    if where == "model_type":
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "model_type": "my-secret-arch"}))
    elif where == "tokenizer":
        tok = json.loads((model / "tokenizer_config.json").read_text())
        tok["auto_map"] = {"AutoTokenizer": ["custom_tiny.TinyTokenizer", None]}
        (model / "tokenizer_config.json").write_text(json.dumps(tok))


@pytest.mark.parametrize("where", ["auto_map", "model_type", "tokenizer"])
@pytest.mark.parametrize("command", ["eval", "train", "merge"])
def test_case11_remote_code_is_refused_unless_allowed(capsys, tiny_dirs, pairs, lora, copy_of, tmp_path, command,
                                                      where):
    model = copy_of(tiny_dirs["llama"])
    if where == "auto_map":
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    else:
        _needs_code_elsewhere(model, where)
    tail = {"eval": ["--data", pairs], "train": ["--data", pairs, "--output", tmp_path / "run", "--quiet"],
            "merge": ["--adapter", lora, "--output", tmp_path / "merged"]}[command]
    one_line_error(capsys, command, "--model", model, *tail, names=[model],
                   says=["needs remote code", "--trust-remote-code"])
    assert not (tmp_path / "merged").exists() and not (tmp_path / "run" / "artifact").exists()


def test_case11_remote_code_runs_only_with_the_flag(capsys, remote_code_model, pairs, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # keep the copied code here
    monkeypatch.setattr(sys, "path", list(sys.path))
    model, marker = remote_code_model
    one_line_error(capsys, "eval", "--model", model, "--data", pairs, names=[model], says=["auto_map"])
    assert not marker.exists()  # refused before any of it ran
    code, err = cli(capsys, "eval", "--model", model, "--data", pairs, "--json", "--trust-remote-code")
    assert code == 0, err
    assert marker.read_text() == "ran"


# --- case 12: shapes that do not fit -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def wider_llama(tokenizer, tmp_path_factory) -> Path:
    """A tiny Llama of hidden size 48 (the adapters here are for hidden size 32)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp("llama-48")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
V_B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


def _edit_weights(adapter: Path, edit) -> None:
    weights = load_file(adapter / WEIGHTS)
    edit(weights)
    save_file(weights, adapter / WEIGHTS)


def _edit_config(adapter: Path, **changes) -> None:
    config = json.loads((adapter / CONFIG).read_text())
    (adapter / CONFIG).write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("variant", ["config-r-8", "one-tensor-reshaped", "A-transposed", "wider-base"])
def test_case12_adapter_shapes_that_do_not_fit_list_parameter_and_both_shapes(capsys, tiny_dirs, pairs, lora,
                                                                              copy_of, wider_llama, variant):
    adapter, model = copy_of(lora), tiny_dirs["llama"]
    key, found, needed = Q_A, "(4, 32)", "(8, 32)"
    if variant == "config-r-8":
        _edit_config(adapter, r=8)  # the file's tensors are rank 4
    elif variant == "one-tensor-reshaped":
        key, found, needed = V_B, "(16, 3)", "(16, 4)"  # v_proj: 2 kv heads of 8
        _edit_weights(adapter, lambda w: w.update({V_B: torch.zeros(16, 3)}))
    elif variant == "A-transposed":
        found, needed = "(32, 4)", "(4, 32)"
        _edit_weights(adapter, lambda w: w.update({Q_A: w[Q_A].T.contiguous()}))
    else:
        model, needed = wider_llama, "(4, 48)"
    for command, tail in (("eval", ["--data", pairs]), ("merge", ["--output", adapter.parent / "merged"])):
        one_line_error(capsys, command, "--model", model, "--adapter", adapter, *tail, names=[adapter / WEIGHTS, key],
                       says=[f"has shape {found}", f"needs {needed}"])
    assert not (adapter.parent / "merged").exists()


def test_case12_classification_head_of_another_size_lists_both_shapes(capsys, tiny_dirs, bert_lora, copy_of):
    """The sidecar says 3 labels, the saved head has 2 rows."""
    artifact, data = bert_lora
    adapter = copy_of(artifact)
    side = json.loads((adapter / "tunelab.json").read_text())
    (adapter / "tunelab.json").write_text(json.dumps({**side, "label_names": ["a", "b", "c"]}))
    line = one_line_error(capsys, "eval", "--model", tiny_dirs["bert"], "--adapter", adapter, "--task",
                          "classification", "--data", data, names=[adapter / WEIGHTS, "classifier"],
                          says=["has shape (2, 32)", "needs (3, 32)"])
    assert "classifier.weight" in line or "classifier.bias" in line


# --- case 13: missing keys ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["one-key", "every-lora_B", "empty-file", "keys-without-peft-prefix"])
def test_case13_adapter_missing_keys_lists_them(capsys, tiny_dirs, pairs, lora, copy_of, tmp_path, variant):
    adapter = copy_of(lora)
    weights = load_file(adapter / WEIGHTS)
    if variant == "one-key":
        kept = {k: v for k, v in weights.items() if k != V_B}
    elif variant == "every-lora_B":
        kept = {k: v for k, v in weights.items() if "lora_B" not in k}
    elif variant == "empty-file":
        kept = {}
    else:
        kept = {k.removeprefix("base_model.model."): v for k, v in weights.items()}
    save_file(kept, adapter / WEIGHTS)
    missing = sorted(set(weights) - set(kept))
    for command, tail in (("eval", ["--data", pairs]), ("merge", ["--output", tmp_path / "merged"])):
        line = one_line_error(capsys, command, "--model", tiny_dirs["llama"], "--adapter", adapter, *tail,
                              names=[adapter / WEIGHTS, *missing[:5]], says=["missing keys"])
        if len(missing) > 5:
            assert f"and {len(missing) - 5} more" in line
    assert not (tmp_path / "merged").exists()


def test_case13_missing_classification_head_keys_are_listed(capsys, tiny_dirs, bert_lora, copy_of):
    artifact, data = bert_lora
    adapter = copy_of(artifact)
    weights = load_file(adapter / WEIGHTS)
    head = sorted(k for k in weights if ".classifier." in k)
    assert head  # the head is saved with every PEFT method for classification
    save_file({k: v for k, v in weights.items() if k not in head}, adapter / WEIGHTS)
    one_line_error(capsys, "eval", "--model", tiny_dirs["bert"], "--adapter", adapter, "--task", "classification",
                   "--data", data, names=[adapter / WEIGHTS, *head], says=["missing keys"])


# --- case 14: target modules that match nothing ---------------------------------------------------------------

@pytest.mark.parametrize("method, targets, shown", [
    ("lora", "[nope]", "['nope']"),
    ("lora", "[q_proj,nope]", "['nope']"),  # one misspelt entry beside a good one
    ("lora", ".*nope.*", "'.*nope.*'"),  # a regex
    ("lora", r"model\.layers\.9\.self_attn\.q_proj", "layers"),  # a layer the model does not have
    ("ia3", "[k_proj,nope]", "['nope']"),
])
def test_case14_target_modules_matching_nothing_list_patterns_and_real_names(capsys, tiny_dirs, pairs, tmp_path,
                                                                            method, targets, shown):
    extra = ["--set", "feedforward_modules=[]"] if method == "ia3" else []
    out = tmp_path / "run"
    line = one_line_error(capsys, "train", "--model", tiny_dirs["llama"], "--data", pairs, "--method", method,
                          "--set", f"target_modules={targets}", *extra, "--output", out, "--quiet",
                          says=["target_modules", shown, "matched no module", "q_proj", "v_proj"])
    assert "lora_A" not in line and "default" not in line  # real module names, not the adapter's own
    assert not any((out / name).exists() for name in ("artifact", "checkpoints", "run.json", "metrics.jsonl"))


# --- case 15: adapter_config.json that is not what it should be -------------------------------------------------

CONFIG_VARIANTS = {
    "not-json": ('{"peft_type": "LORA", "r": 4,', ["not valid JSON"]),
    "empty": ("", ["not valid JSON"]),
    "binary": (b"\xff\xfe\x00\x01", ["not valid JSON"]),
    "a-list": ("[1, 2]", ["expected a JSON object, found list"]),
    "a-string": ('"LORA"', ["expected a JSON object, found str"]),
    "no-peft_type": ({"r": 4}, ["no 'peft_type' field", "LORA"]),
    "unknown-peft_type": ({"peft_type": "VERA"}, ["'VERA' is not supported", "LORA"]),
    "peft_type-a-list": ({"peft_type": ["LORA"]}, ["'peft_type' expected a string", "found list"]),
    "peft_type-null": ({"peft_type": None}, ["'peft_type' expected a string", "found NoneType"]),
    "r-eight": ({"r": "eight"}, ["'r'", "integer", "'eight'"]),
    "r-negative": ({"r": -1}, ["'r'"]),
    "alpha-text": ({"lora_alpha": "x"}, ["alpha", "'x'"]),
    "target_modules-a-number": ({"target_modules": 5}, ["target_modules", "got 5"]),
}


@pytest.mark.parametrize("command", ["eval", "merge"])
@pytest.mark.parametrize("variant", list(CONFIG_VARIANTS))
def test_case15_bad_adapter_config_names_the_file(capsys, tiny_dirs, pairs, lora, copy_of, tmp_path, command,
                                                  variant):
    adapter = copy_of(lora)
    content, says = CONFIG_VARIANTS[variant]
    if isinstance(content, dict):
        config = json.loads((adapter / CONFIG).read_text())
        content = json.dumps({k: v for k, v in {**config, **content}.items()
                              if not (variant == "no-peft_type" and k == "peft_type")})
    (adapter / CONFIG).write_bytes(content if isinstance(content, bytes) else content.encode())
    tail = ["--data", pairs] if command == "eval" else ["--output", tmp_path / "merged"]
    one_line_error(capsys, command, "--model", tiny_dirs["llama"], "--adapter", adapter, *tail,
                   names=[adapter / CONFIG], says=says)
    assert not (tmp_path / "merged").exists()
