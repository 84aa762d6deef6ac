"""`tunelab export --format gguf`: a model, a model with an adapter merged in, or a LoRA adapter as GGUF files.

Everything is checked before the weights load: the output path is new, the base is a Llama model with the
default RoPE (`gguf_write.check_llama`), a LoRA adapter's modules have the base's shapes. The file is written
beside its target and renamed into place complete (`atomic_file`). The writers are in `gguf_write`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.artifacts.atomic import artifact_bytes, atomic_file
from tunelab.artifacts.combine import read_lora
from tunelab.artifacts.gguf_write import OUTTYPES, check_llama, head_dim, lora_alpha_for, write_lora, write_model
from tunelab.artifacts.merge import merge_and_unload
from tunelab.artifacts.peft_format import tokenizer_for
from tunelab.errors import ConfigError
from tunelab.models import load_model, read_config, resolve_spec

FORMATS = ("gguf",)


def check_request(out_file: Path, fmt: str, outtype: str) -> None:
    """The format and tensor type are known and `out_file` is a new path (an export never replaces a file)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if outtype not in OUTTYPES:
        raise ConfigError(f"--outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    if out_file.exists() or out_file.is_symlink():
        raise ConfigError(f"--output {out_file}: exists; expected a new file path (remove it or choose another)")
    for parent in out_file.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--output {out_file}: its parent {parent} is a file; expected a directory")
            break


def base_config(model: str | Path) -> dict:
    """config.json of the base (a local dir or an alias), checked to be a Llama model."""
    path = resolve_spec(model)
    config = read_config(path)
    check_llama(config, f"--model {model}")
    return config


def module_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear of a Llama block, by its leaf name."""
    from transformers import LlamaConfig

    hd, hidden, inter = head_dim(LlamaConfig(**config)), config["hidden_size"], config["intermediate_size"]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    return {"q_proj": (n_head * hd, hidden), "k_proj": (n_kv * hd, hidden), "v_proj": (n_kv * hd, hidden),
            "o_proj": (hidden, n_head * hd), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
            "down_proj": (hidden, inter)}


def export_lora(model: str | Path, adapter: str | Path, out_file: str | Path, outtype: str = "f32") -> int:
    """Write LoRA adapter `adapter` of Llama base `model` as a GGUF LoRA adapter (llama.cpp's `--lora`).

    Returns the bytes written. A DoRA or non-LoRA adapter, or one whose modules do not fit the base, is refused.
    """
    out = Path(out_file)
    check_request(out, "gguf", outtype)
    config = base_config(model)
    files = read_lora(adapter, purpose="export as a GGUF LoRA adapter")
    shapes = module_shapes(config)
    for path, (a, b, _) in files.modules.items():
        want = shapes.get(path.rsplit(".", 1)[-1])
        if want is not None and (b.shape[0], a.shape[1]) != want:
            raise ConfigError(f"adapter {files.path}: module {path} is {b.shape[0]}x{a.shape[1]}, the base "
                              f"{model} has {want[0]}x{want[1]}; expected an adapter of this base")
    from transformers import LlamaConfig

    alpha = lora_alpha_for(files.modules, files.config.get("lora_alpha"))
    with atomic_file(out) as tmp:
        write_lora(tmp, files.modules, alpha, LlamaConfig(**config), outtype, name=Path(adapter).name)
    return artifact_bytes(out)


def export_model(model: str | Path, out_file: str | Path, outtype: str = "f16", *, adapter: str | Path | None = None,
                 trust_remote_code: bool = False) -> int:
    """Write Llama model `model` (with `adapter` merged in, when given) and its tokenizer as a GGUF model file.

    Returns the bytes written. `outtype`: f32, f16, bf16 or q8_0.
    """
    out = Path(out_file)
    check_request(out, "gguf", outtype)
    base_config(model)
    from tunelab.artifacts import load_adapter

    loaded = load_model(model, task="causal-lm", dtype="float32", device="cpu", trust_remote_code=trust_remote_code)
    tokenizer = loaded.tokenizer
    if adapter is not None:
        merge_and_unload(loaded.model, load_adapter(loaded.model, adapter))
        tokenizer = tokenizer_for(tokenizer, [adapter])  # an adapter that added tokens carries the grown vocab
    name = Path(adapter).name if adapter is not None else resolve_spec(model).name
    with torch.no_grad(), atomic_file(out) as tmp:
        write_model(tmp, loaded.model, tokenizer, outtype, name)
    return artifact_bytes(out)
