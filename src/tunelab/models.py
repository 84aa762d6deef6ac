"""Load a base model and its tokenizer from a local HF model dir or a packaged alias; pick dtype and device.

Before transformers sees a directory, tunelab checks it: `config.json` present and valid, no remote code unless
the user allows it, and safetensors weights whose headers fit their files. Pickle weights (`.bin`, `.pt`) are
never unpickled: a directory that has only those is refused.
"""

from __future__ import annotations

import contextlib
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from tunelab.defaults import MODEL_ALIASES, resolve_alias
from tunelab.errors import ArtifactError, ConfigError
from tunelab.jsonio import read_json_object

TASKS = ("causal-lm", "classification")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class LoadedModel:
    """A loaded base model with its tokenizer, where it came from, and how it was placed."""

    model: torch.nn.Module
    tokenizer: Any
    path: Path
    task: str
    dtype: torch.dtype
    device: torch.device

    @property
    def pad_id(self) -> int:
        """The padding token id for collating batches (see `pad_token_id`)."""
        return pad_token_id(self.tokenizer, self.model)


def pad_token_id(tokenizer, model: torch.nn.Module | None = None) -> int:
    """The one padding-id rule: the tokenizer's pad token, else the model config's, else EOS, else 0.

    `load_tokenizer` gives a tokenizer without a pad token its EOS, so the later choices matter only for
    tokenizers loaded elsewhere.
    """
    config = getattr(model, "config", None)
    for value in (tokenizer.pad_token_id, getattr(config, "pad_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            return value
    return 0


def pick_device(device: str = "auto") -> torch.device:
    """`auto` -> CUDA when available, else CPU; any other string is passed to `torch.device` as it is."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"key 'device': expected auto, cpu, cuda or cuda:N, found {device!r}") from None


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on a CUDA GPU that supports it, else float32; `float32`/`bfloat16`/`float16` as given."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        on_cuda = torch.device(device).type == "cuda"
        return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"key 'dtype': expected auto, {', '.join(DTYPES)}, found {dtype!r}")
    return DTYPES[dtype]


def resolve_spec(spec: str | Path) -> Path:
    """A model spec as a directory: an alias name (exactly as written) wins; anything else is a local path."""
    if isinstance(spec, str) and spec in MODEL_ALIASES:
        return resolve_alias(spec)
    return Path(spec).expanduser()


def read_config(path: Path) -> dict:
    """`config.json` of a model dir as a dict; ArtifactError naming the path when missing or not JSON."""
    if not path.exists():
        raise ArtifactError(f"{path}: model dir not found; expected a local HF model dir or an alias "
                            f"({', '.join(MODEL_ALIASES)})")
    if not path.is_dir():
        raise ArtifactError(f"{path}: is a file; expected a HF model dir (with config.json and *.safetensors)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ArtifactError(f"{config_file}: not found; expected a HF model dir with config.json")
    return read_json_object(config_file, ArtifactError)


def check_remote_code(path: Path, config: dict, trust_remote_code: bool) -> None:
    """Refuse a model dir whose config or tokenizer needs custom code, unless the user allowed it."""
    if trust_remote_code:
        return

    reason = None
    if "auto_map" in config:
        reason = f"config.json has auto_map {sorted(config['auto_map'])}"
    elif config.get("model_type") not in CONFIG_MAPPING:
        reason = f"model_type {config.get('model_type')!r} is not built into transformers"
    else:
        tok_config = path / "tokenizer_config.json"
        if tok_config.is_file() and '"auto_map"' in tok_config.read_text(errors="replace"):
            reason = "tokenizer_config.json has auto_map"
    if reason:
        raise ArtifactError(f"{path}: needs remote code ({reason}); refused. Pass --trust-remote-code (or set "
                            f"trust_remote_code: true in the run config) if you trust this code")


def check_safetensors_file(file: Path) -> None:
    """Validate a `.safetensors` header against the file size, then open it; ArtifactError naming the file.

    The header length is checked before anything is read with it, so a corrupt length never becomes a huge
    allocation; safetensors' own loader then validates the header JSON and every tensor's offsets (memory-mapped).
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise ArtifactError(f"{file}: truncated safetensors file ({size} bytes); expected an 8-byte header length")
    (header_len,) = struct.unpack("<Q", head)  # little-endian u64
    if header_len > size - 8:
        raise ArtifactError(f"{file}: corrupt safetensors header: length {header_len} exceeds the file size {size}")
    try:
        with safe_open(str(file), framework="pt") as st:
            st.keys()
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{file}: corrupt safetensors file ({e})") from None


def check_weights(path: Path) -> list[Path]:
    """The safetensors weight files of a model dir, each validated; pickle-only dirs are refused."""
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError, TypeError):
            raise ArtifactError(f"{index}: not a valid safetensors index (expected a JSON object with weight_map)") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ArtifactError(f"{index}: lists shards that are missing: {', '.join(missing)}")
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ArtifactError(f"{path}: has only pickle weights ({', '.join(pickles)}); tunelab loads safetensors "
                                f"only and never unpickles. Convert them to model.safetensors with a trusted tool")
        raise ArtifactError(f"{path}: no weights found; expected model.safetensors (or sharded *.safetensors)")
    for file in files:
        check_safetensors_file(file)
    return files


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The tokenizer of a model dir, ready for training: a pad token (eos when it has none), right padding."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: cannot load the tokenizer ({str(e).splitlines()[0]}); expected tokenizer.json "
                            f"or tokenizer_config.json with vocab files") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ArtifactError(f"{path}: the tokenizer has neither a pad token nor an eos token; expected one")
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of attention and labels anyway
    tokenizer.padding_side = "right"  # training batches are right-padded (labels -100 on padding)
    return tokenizer


def _head_kwargs(config: dict, num_labels: int | None, label_names: list[str] | None) -> dict:
    """from_pretrained kwargs for a sequence-classification head with the requested labels."""
    if label_names is not None:
        label_names = [str(n) for n in label_names]
        if num_labels is not None and num_labels != len(label_names):
            raise ConfigError(f"num_labels={num_labels} but label_names has {len(label_names)} names; expected equal")
        num_labels = len(label_names)
    if num_labels is None:
        return {}
    if num_labels < 1:
        raise ConfigError(f"num_labels: expected a positive number, found {num_labels}")
    names = label_names or [f"LABEL_{i}" for i in range(num_labels)]
    kwargs = {"num_labels": num_labels, "id2label": dict(enumerate(names)),
              "label2id": {n: i for i, n in enumerate(names)}}
    if config.get("id2label") is not None and len(config["id2label"]) != num_labels:
        kwargs["ignore_mismatched_sizes"] = True  # a saved head of another size is replaced by a new one
    return kwargs


def load_model(spec: str | Path, task: str = "causal-lm", *, dtype: str | torch.dtype = "auto", device: str = "auto",
               trust_remote_code: bool = False, num_labels: int | None = None,
               label_names: list[str] | None = None) -> LoadedModel:
    """Load a base model and its tokenizer from a local HF model dir or an alias.

    Args:
        spec: a local HF model dir, or an alias (`smollm2-135m`, `minilm-l6`); an alias name wins over a
            relative path of the same spelling (write `./minilm-l6` for the path).
        task: `causal-lm` (AutoModelForCausalLM) or `classification` (AutoModelForSequenceClassification).
        dtype: `auto` (see `pick_dtype`), `float32`, `bfloat16` or `float16`.
        device: `auto` (see `pick_device`), `cpu`, `cuda`, `cuda:N`.
        trust_remote_code: allow model dirs whose config needs custom code (refused otherwise).
        num_labels / label_names: the classification head; `label_names` also sets id2label / label2id.
    Returns:
        A `LoadedModel`; the tokenizer has a pad token and pads on the right.
    """
    if task not in TASKS:
        raise ConfigError(f"task: expected one of {', '.join(TASKS)}, found {task!r}")
    path = resolve_spec(spec)
    config = read_config(path)
    check_remote_code(path, config, trust_remote_code)
    check_weights(path)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    tokenizer = load_tokenizer(path, trust_remote_code)
    model = _from_pretrained(path, task, config, dt, trust_remote_code, num_labels, label_names)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # classification heads find the last token with it
    return LoadedModel(model=model.to(dev), tokenizer=tokenizer, path=path, task=task, dtype=dt, device=dev)


def _from_pretrained(path: Path, task: str, config: dict, dtype: torch.dtype, trust_remote_code: bool,
                     num_labels: int | None, label_names: list[str] | None):
    """transformers' own loader, restricted to local safetensors."""
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "local_files_only": True,
                              "trust_remote_code": trust_remote_code}
    if task == "classification":
        auto = AutoModelForSequenceClassification
        kwargs.update(_head_kwargs(config, num_labels, label_names))
    else:
        auto = AutoModelForCausalLM
    try:
        with _progress_bars_on_terminal_only():
            return auto.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{path}: cannot load the model for task {task} ({first})") from None


@contextlib.contextmanager
def _progress_bars_on_terminal_only():
    """transformers' weight-loading bars only when stderr is a terminal.

    Piped stderr (scripts, CI logs) then carries tunelab's own lines only, so an error stays one line.
    """
    was_on = hf_logging.is_progress_bar_enabled()
    if was_on and not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
