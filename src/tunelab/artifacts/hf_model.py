"""Whole models as HF model dirs (config.json + model*.safetensors + tokenizer), for `full` and merged models."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tunelab.artifacts.files import read_safetensors, read_sidecar, write_sidecar
from tunelab.artifacts.peft_format import inject_and_load
from tunelab.errors import ArtifactError, ConfigError
from tunelab.methods import all_methods, get_method
from tunelab.methods.base import Method, adapter_state

CONFIG = "config.json"


def write_model(out_dir: Path, model: nn.Module, tokenizer=None, *, label_names: list[str] | None = None,
                method: Method | None = None, name: str | None = None) -> None:
    """`save_pretrained` the model (safetensors, 5GB shards) and tokenizer into `out_dir`.

    Label names go into the config's id2label/label2id. Adapters still attached would be written into the
    weights, so any adapter other than a whole-model one is refused.
    """
    state = adapter_state(model)
    attached = [n for n, m in state.methods.items() if get_method(m).artifact != "model"]
    if attached:
        raise ConfigError(f"adapters {attached} are still attached; merge and unload or remove them before "
                          f"saving a plain model")
    if label_names:
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {n: i for i, n in enumerate(label_names)}
    model.save_pretrained(out_dir, max_shard_size="5GB")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if method is not None:
        write_sidecar(out_dir, model, method.name, state.options[name].model_dump(), label_names)


def read_model_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the dir's `model*.safetensors` files (one file or shards)."""
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise ArtifactError(f"{model_dir}: no model*.safetensors weights found")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(read_safetensors(f))
    return weights


def whole_model_method(model_dir: Path) -> Method:
    """The whole-model method that loads this dir: the one its sidecar names, else the only one registered."""
    named = read_sidecar(model_dir).get("method")
    candidates = [m for m in all_methods().values() if m.artifact == "model"]
    if named is not None:
        candidates = [m for m in candidates if m.name == named] or candidates
    if len(candidates) != 1:
        raise ArtifactError(f"{model_dir}: cannot tell which whole-model method wrote it "
                            f"(candidates: {[m.name for m in candidates]})")
    return candidates[0]


def load_model_dir(model: nn.Module, model_dir: Path, method: Method, name: str) -> str:
    """Load the weights of an HF model dir into `model` as whole-model adapter `name` of `method`; return `name`."""
    options = method.options_from_config(read_sidecar(model_dir).get("options") or {})
    inject_and_load(model, method, options, read_model_weights(model_dir), name,
                    config_source=model_dir / CONFIG, weights_source=model_dir)
    return name
