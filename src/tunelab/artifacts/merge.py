"""Merge an adapter into the base weights and write the result as a plain HF model dir (`tunelab merge`)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tunelab.artifacts.atomic import artifact_bytes, atomic_dir
from tunelab.artifacts.hf_model import write_model
from tunelab.errors import ConfigError
from tunelab.methods import get_method
from tunelab.methods.base import adapter_state


def merge_and_unload(model: nn.Module, name: str) -> nn.Module:
    """Fold adapter `name` into the base weights and remove it: `model` becomes a plain HF model again.

    Raises `ConfigError` naming the adapter when it is unknown or its method cannot be merged.
    """
    state = adapter_state(model)
    if name not in state.methods:
        raise ConfigError(f"unknown adapter {name!r}; loaded adapters: {sorted(state.methods) or 'none'}")
    method = get_method(state.methods[name])
    method.merge(model, name)
    method.remove(model, name)
    return model


def save_merged(model: nn.Module, tokenizer, name: str, out_dir: str | Path, *,
                label_names: list[str] | None = None) -> int:
    """Merge and unload adapter `name`, then write `model` (+ tokenizer) as an HF model dir, atomically.

    Returns the bytes written. The dir loads with `AutoModelForCausalLM` / `AutoModelForSequenceClassification`.
    """
    merge_and_unload(model, name)
    with atomic_dir(out_dir) as tmp:
        write_model(tmp, model, tokenizer, label_names=label_names)
    return artifact_bytes(out_dir)
