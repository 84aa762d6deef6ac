"""Artifacts: PEFT-format adapters, HF-format whole models, and merging.

`save_artifact` dispatches on the method's `artifact` kind ("adapter" or "model"), `load_adapter` on which
files the dir holds; neither knows any method by name.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tunelab.artifacts import hf_model, peft_format
from tunelab.artifacts.atomic import artifact_bytes, atomic_dir
from tunelab.artifacts.files import read_label_names
from tunelab.artifacts.merge import merge_and_unload, save_merged
from tunelab.artifacts.recovery import recover
from tunelab.artifacts.peft_format import method_for_config, read_adapter_config
from tunelab.errors import ArtifactError, ConfigError
from tunelab.methods import get_method
from tunelab.methods.base import adapter_state, set_active

__all__ = ["save_artifact", "load_adapter", "check_adapter_dir", "merge_and_unload", "save_merged", "artifact_bytes",
           "read_label_names", "read_adapter_config", "method_for_config", "atomic_dir"]


def _write_adapter(out_dir, model, tokenizer, method, name, base_model, label_names):
    peft_format.write_adapter(out_dir, model, method, name, base_model=base_model, label_names=label_names)


def _write_model(out_dir, model, tokenizer, method, name, base_model, label_names):
    hf_model.write_model(out_dir, model, tokenizer, label_names=label_names, method=method, name=name)


WRITERS = {"adapter": _write_adapter, "model": _write_model}
# Which loader reads a dir, by the file that marks its kind (checked in this order).
LOADERS = ((peft_format.CONFIG, peft_format.load_adapter_dir), (hf_model.CONFIG, hf_model.load_model_dir))


def save_artifact(model: nn.Module, tokenizer, name: str, out_dir: str | Path, *,
                  base_model: str | None = None, label_names: list[str] | None = None) -> int:
    """Write adapter `name` of `model` to `out_dir` atomically and return the bytes written.

    Adapter methods: `adapter_config.json` + `adapter_model.safetensors` (PEFT's layout) + `tunelab.json`
    (method, options, label names). Whole-model methods (`full`): an HF model dir with the tokenizer, label
    names in config.json's id2label. An existing `out_dir` is replaced only once the new one is complete.
    """
    state = adapter_state(model)
    if name not in state.methods:
        raise ConfigError(f"unknown adapter {name!r}; loaded adapters: {sorted(state.methods) or 'none'}")
    method = get_method(state.methods[name])
    with atomic_dir(out_dir) as tmp:
        WRITERS[method.artifact](tmp, model, tokenizer, method, name, base_model, label_names)
    return artifact_bytes(out_dir)


def load_adapter(model: nn.Module, adapter_dir: str | Path, name: str = "default") -> str:
    """Inject the method saved in `adapter_dir` into `model` as adapter `name` and load its weights.

    Reads tunelab's and HF PEFT's adapter dirs (by `peft_type`) and whole-model dirs (config.json). Returns
    `name`; the new adapter is the active one. Bad files raise `ArtifactError` naming the file, and the model
    is then left as it was.
    """
    path = check_adapter_dir(adapter_dir)
    for marker, loader in LOADERS:
        if (path / marker).exists():
            loader(model, path, name)
            set_active(model, [name])
            return name
    raise ArtifactError(f"{path}: neither {peft_format.CONFIG} nor {hf_model.CONFIG} found")


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """`adapter_dir` as a Path; `ArtifactError` naming it when it is missing or a file.

    A replacement of it that a killed run left half-done is finished or rolled back first (one line logged).
    """
    path = Path(adapter_dir)
    recover(path.parent, path.name)
    if not path.is_dir():
        raise ArtifactError(f"{path}: adapter directory not found" if not path.exists()
                            else f"{path}: is a file, expected an adapter directory")
    return path
