"""Adapters in HF PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`."""

from __future__ import annotations

import re
from pathlib import Path

import safetensors.torch
from pydantic import ValidationError
from torch import nn

from tunelab.artifacts.files import (check_finite, check_finite_values, read_json, read_safetensors, read_sidecar,
                                     write_json, write_sidecar)
from tunelab.defaults import MODEL_ALIASES, resolve_alias
from tunelab.errors import ArtifactError, ConfigError
from tunelab.methods import all_methods, tokens
from tunelab.methods.base import Method, adapter_state

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def write_adapter(out_dir: Path, model: nn.Module, method: Method, name: str, *,
                  base_model: str | None = None, label_names: list[str] | None = None) -> None:
    """Write adapter `name` of `model` into `out_dir` (PEFT keys; tensors contiguous in their own dtype)."""
    options = adapter_state(model).options[name]
    config = {**method.adapter_config(model, options, name), **tokens.config_field(model, name)}
    written = base_model if base_model is not None else config.get("base_model_name_or_path")
    config["base_model_name_or_path"] = resolved_base(written)
    # clone: safetensors refuses tensors sharing storage, and the file must not alias live weights
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in method.state_dict(model, name).items()}
    safetensors.torch.save_file(tensors, out_dir / WEIGHTS, metadata={"format": "pt"})  # module attribute: tests inject a full disk
    write_json(out_dir / CONFIG, config)
    write_sidecar(out_dir, model, method.name, options.model_dump(), label_names,
                  base_model=str(written) if written is not None else None)


def resolved_base(spec: str | Path | None) -> str | None:
    """The base as HF PEFT resolves it offline: an alias's local model dir, an existing dir as an absolute path.

    `AutoPeftModel*.from_pretrained` reads `base_model_name_or_path` and would look an alias up on the model hub;
    the alias itself stays in tunelab's sidecar (`base_model`). Anything else is written as given.
    """
    if spec is None:
        return None
    if str(spec) in MODEL_ALIASES:
        return str(resolve_alias(str(spec)).resolve())
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.is_dir() else str(spec)


def peft_types() -> dict[str, Method]:
    """`peft_type` string -> the registered method that reads it (the first registered wins a shared type)."""
    out: dict[str, Method] = {}
    for method in all_methods().values():
        if method.artifact == "adapter":
            out.setdefault(method.peft_type or method.name.upper(), method)
    return out


def method_for_config(config: dict, path: Path | str = CONFIG, written_by: str | None = None) -> Method:
    """The method that reads the config; errors name the file and list the supported `peft_type`s.

    Among the methods of the config's `peft_type`: the one tunelab's sidecar names (`written_by`), else the
    first whose `matches_config(config)` is true (PEFT's LORA with `use_dora: true` is dora's). `written_by` also
    resolves a tunelab-only `peft_type` that no method declares, when that method declares none itself (its
    `adapter_config` writes its own string).
    """
    types = peft_types()
    if "peft_type" not in config:
        raise ArtifactError(f"{path}: no 'peft_type' field; expected one of {', '.join(sorted(types))}")
    peft_type = config["peft_type"]
    if not isinstance(peft_type, str):  # a list or object would not even be hashable below
        raise ArtifactError(f"{path}: field 'peft_type' expected a string (one of {', '.join(sorted(types))}), "
                            f"found {type(peft_type).__name__}")
    adapters = [m for m in all_methods().values() if m.artifact == "adapter"]
    by_sidecar = {m.name: m for m in adapters if m.peft_type is None}
    if peft_type not in types and written_by in by_sidecar:
        return by_sidecar[written_by]
    if peft_type not in types:
        raise ArtifactError(f"{path}: peft_type {peft_type!r} is not supported; supported: {', '.join(sorted(types))}")
    same_type = [m for m in adapters if (m.peft_type or m.name.upper()) == peft_type]
    for method in same_type:
        if method.name == written_by:
            return method
    for method in same_type:
        if method.matches_config(config):
            return method
    raise ArtifactError(f"{path}: no method reads this {peft_type} config; methods of that type: "
                        f"{', '.join(m.name for m in same_type)}")


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """`adapter_config.json` of an adapter dir, with `label_names` from tunelab's sidecar (None if absent).

    For a whole-model dir (no adapter_config.json, a config.json): only `task_type` and `label_names`.
    """
    path = Path(adapter_dir)
    side = read_sidecar(path) if path.is_dir() else {}
    if not (path / CONFIG).exists() and (path / "config.json").exists():
        config = {"task_type": side.get("task_type")}
    else:
        config = read_json(path / CONFIG)
    config.setdefault("label_names", side.get("label_names"))
    return config


def load_adapter_dir(model: nn.Module, adapter_dir: Path, method: Method, name: str) -> str:
    """Inject `method`'s adapter saved in `adapter_dir` as `name` and load its weights; return `name`.

    `method` is the one `tunelab.artifacts.inspect` found (or one reading the same files). Everything is read
    and checked before the model is touched; if the weights do not fit, the adapter is removed again and the
    model is as before.
    """
    config_path = adapter_dir / CONFIG
    config = read_json(config_path)
    check_finite_values(config, config_path)
    token_indices = config.pop("trainable_token_indices", None)
    try:
        options = method.options_from_config(config)
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from None
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"{config_path}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    weights_path = adapter_dir / WEIGHTS
    weights = read_safetensors(weights_path)
    check_finite(weights, weights_path)
    check_rank(config, weights, config_path, weights_path)  # before the injection allocates r-sized matrices
    rows = None
    if token_indices is not None:  # the embeddings are resized before the adapter attaches to them
        tokens.check_method(method)
        rows = tokens.rows_from_config(model, token_indices)
        tokens.fit_vocab(model, rows, saved_vocab_size(adapter_dir), str(config_path))
    weights, full_rows = tokens.split_base_layers(model, weights, str(weights_path))
    inject_and_load(model, method, options, weights, name, config_source=config_path, weights_source=weights_path,
                    token_rows=rows)
    tokens.load_base_layers(model, full_rows)
    return name


def saved_tokenizer(adapter_dir: str | Path):
    """The tokenizer saved with an adapter (one that added tokens), None when it has none."""
    if not (Path(adapter_dir) / "tokenizer_config.json").is_file():
        return None
    from tunelab.models import load_tokenizer

    return load_tokenizer(Path(adapter_dir))


def saved_vocab_size(adapter_dir: Path) -> int | None:
    """The length of the tokenizer saved with an adapter, None when it has none."""
    tokenizer = saved_tokenizer(adapter_dir)
    return None if tokenizer is None else len(tokenizer)


def tokenizer_for(base_tokenizer, adapter_dirs):
    """The tokenizer to encode with for `adapter_dirs` over a base: the one saved with the adapters that added
    tokens (they must share its vocabulary), else the base's own."""
    chosen, owner = None, None
    for adapter_dir in adapter_dirs:
        tokenizer = saved_tokenizer(adapter_dir)
        if tokenizer is None:
            continue
        if chosen is not None and tokenizer.get_vocab() != chosen.get_vocab():
            raise ConfigError(f"adapter {adapter_dir}: its tokenizer (added tokens) differs from that of adapter "
                              f"{owner}; expected adapters used together to share one vocabulary")
        chosen, owner = chosen or tokenizer, owner or adapter_dir
    return chosen or base_tokenizer


RANK_DIM = ((re.compile(r"(^|\.)lora_(embedding_)?A(\.|$)"), 0), (re.compile(r"(^|\.)lora_(embedding_)?B(\.|$)"), -1))


def check_rank(config: dict, weights: dict, config_path: Path, weights_path: Path) -> None:
    """The config's `r` must be a dimension of every saved low-rank tensor (lora_A: [r, in], lora_B: [out, r]).

    Checked on the tensors already read, before anything of size `r` is allocated: a config claiming r = 2^40,
    or 3,000,000 over rank-8 tensors, is refused in one line instead of exhausting memory. (Other misfits, such
    as a transposed tensor, are named by the loader against the model's own shapes.)
    """
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or config.get("rank_pattern"):
        return
    for key, tensor in weights.items():
        for pattern, dim in RANK_DIM:
            if tensor.ndim >= 2 and pattern.search(key) and r not in tensor.shape:
                needed = list(tensor.shape)
                needed[dim] = r
                raise ArtifactError(f"{weights_path}: {key} has shape {tuple(tensor.shape)}, the base model "
                                    f"needs {tuple(needed)} (r = {r} in {config_path}); expected the r the weights "
                                    f"were saved with")


def inject_and_load(model: nn.Module, method: Method, options, weights: dict, name: str, *,
                    config_source: Path, weights_source: Path, token_rows: dict | None = None) -> None:
    """Inject adapter `name` (with trainable rows `token_rows` of added tokens, {module path: ids}) and load
    `weights` into it; errors are prefixed with the file they come from.

    When the weights do not fit, the adapter is removed again, so a failed load leaves the model as it was.
    """
    try:
        method.inject(model, options, name)
    except ConfigError as e:
        raise ConfigError(f"{config_source}: {e}") from None
    try:
        if token_rows:
            tokens.attach_tokens(model, name, token_rows)
        method.load_state_dict(model, weights, name)
    except (ArtifactError, ConfigError) as e:
        method.remove(model, name)
        raise ArtifactError(f"{weights_source}: {e}") from None
