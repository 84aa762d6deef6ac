"""Artifacts: PEFT-format adapters, HF-format whole models, and merging.

`save_artifact` dispatches on the method's `artifact` kind ("adapter" or "model"), `load_adapter` on what
`inspect(dir)` finds (the same answer merge, eval and serve read); neither knows any method by name.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tunelab.artifacts import hf_model, peft_format
from tunelab.artifacts.atomic import artifact_bytes, atomic_dir
from tunelab.artifacts.files import read_label_names
from tunelab.artifacts.info import ArtifactInfo, check_adapter_dir, inspect
from tunelab.artifacts.merge import merge_and_unload, save_merged
from tunelab.artifacts.peft_format import method_for_config, read_adapter_config
from tunelab.errors import ConfigError
from tunelab.methods import get_method, tokens
from tunelab.methods.base import adapter_state, set_active

__all__ = ["save_artifact", "load_adapter", "inspect", "ArtifactInfo", "check_adapter_dir", "merge_and_unload",
           "save_merged", "artifact_bytes", "read_label_names", "read_adapter_config", "method_for_config",
           "atomic_dir"]


def _write_adapter(out_dir, model, tokenizer, method, name, base_model, label_names):
    peft_format.write_adapter(out_dir, model, method, name, base_model=base_model, label_names=label_names)
    if tokenizer is not None and tokens.config_field(model, name):  # added tokens: the base needs this tokenizer
        tokenizer.save_pretrained(out_dir)


def _write_model(out_dir, model, tokenizer, method, name, base_model, label_names):
    hf_model.write_model(out_dir, model, tokenizer, label_names=label_names, method=method, name=name)


WRITERS = {"adapter": _write_adapter, "model": _write_model}
LOADERS = {"adapter": peft_format.load_adapter_dir, "model": hf_model.load_model_dir}  # by `ArtifactInfo.kind`


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


def load_adapter(model: nn.Module, adapter_dir: str | Path, name: str = "default", *,
                 as_method: str | None = None) -> str:
    """Inject the method saved in `adapter_dir` into `model` as adapter `name` and load its weights.

    Reads tunelab's and HF PEFT's adapter dirs (by `peft_type`) and whole-model dirs (config.json); the method is
    `inspect(adapter_dir).method`, or `as_method` when given, which must be one that reads the same files
    (`.method` or `.files_method`: serve loads a qlora artifact as the plain LoRA it is). Returns `name`; the
    new adapter is the active one. Bad files raise `ArtifactError` naming the file, and the model is then left
    as it was.
    """
    info = inspect(adapter_dir)
    if as_method is not None and as_method not in (info.method, info.files_method):
        raise ConfigError(f"{info.path}: holds a '{info.method}' artifact, which cannot be loaded as "
                          f"'{as_method}'; expected {info.method!r} or {info.files_method!r}")
    LOADERS[info.kind](model, info.path, get_method(as_method or info.method), name)
    set_active(model, [name])
    return name
