"""GGUF files for llama.cpp and Ollama, in the layout llama.cpp's own converters write for Llama models.

- A model (`write_model`): `convert_hf_to_gguf.py`'s keys (`llama.block_count`, `llama.attention.head_count`, ...,
  the tokenizer: `gguf_vocab`), tensor names from `gguf`'s Llama name map (`token_embd`, `blk.N.attn_q`, ...,
  `output`; no `output` when the embeddings are tied), and q/k projection rows permuted as the converter
  permutes them (llama.cpp's RoPE pairs neighbouring dimensions, HF's the two halves of a head).
- A LoRA adapter (`write_lora`): `convert_lora_to_gguf.py`'s layout: `general.type = adapter`,
  `adapter.type = lora`, `adapter.lora.alpha`, tensors `<base tensor name>.lora_a` (r, in) and `.lora_b`
  (out, r); the permutation of q/k acts on B's rows. llama.cpp scales each pair by alpha / r (r from lora_a),
  so a module whose scaling differs (rsLoRA, `rank_pattern`, `alpha_pattern`) has the difference folded into B.

Tensor types (`--outtype`): f32; f16 / bf16 for matrices with 1-D tensors (norms) in f32; q8_0 for matrices
whose rows are whole 32-value blocks, others f16 (as the converter falls back).
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import torch

from tunelab.artifacts.gguf_vocab import add_vocab
from tunelab.errors import ConfigError

OUTTYPES = {"f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
            "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
            "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
            "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]  # "llama"


def check_llama(config: dict, where: str) -> None:
    """Refuse, in one line, a model (its config.json as a dict) that llama.cpp's `llama` architecture does not
    describe exactly."""
    kind = config.get("model_type")
    if kind != "llama":
        archs = ", ".join(config.get("architectures") or ["unknown class"])
        raise ConfigError(f"{where}: architecture '{kind}' ({archs}); GGUF export supports Llama-architecture "
                          f"models only (model_type llama)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{where}: rope scaling '{rope_type}' is not written by tunelab's GGUF export; "
                          f"expected the default RoPE")


def encode(t: torch.Tensor, outtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """(data, GGML type) of one tensor for `outtype`; 1-D tensors stay f32, q8_0 falls back to f16."""
    data = t.detach().to(torch.float32).cpu().numpy()
    qtype = OUTTYPES[outtype][0] if data.ndim > 1 else gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
        qtype = gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, qtype), qtype


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute`: rows (n_head * head_dim, ...) from HF's rotate-half order to the
    interleaved order of its RoPE."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def heads_for(hf_name: str, config) -> int | None:
    """The head count to permute `hf_name`'s rows by (q: attention heads, k: key/value heads), or None."""
    if ".q_proj." in hf_name:
        return config.num_attention_heads
    if ".k_proj." in hf_name:
        return config.num_key_value_heads or config.num_attention_heads
    return None


def gguf_name(name_map: gguf.TensorNameMap, hf_name: str) -> str:
    """The llama.cpp tensor name of an HF parameter name (`model.layers.0.self_attn.q_proj.weight` ->
    `blk.0.attn_q.weight`); a parameter llama.cpp has no name for is refused."""
    found = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise ConfigError(f"tensor {hf_name}: llama.cpp's llama layout has no tensor of that name; expected a "
                          f"plain Llama model")
    return found


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hparams(writer: gguf.GGUFWriter, config, outtype: str, name: str) -> None:
    """The `llama.*` keys of `convert_hf_to_gguf.py` for an HF `LlamaConfig`."""
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(OUTTYPES[outtype][1])
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def model_tensors(model) -> dict[str, torch.Tensor]:
    """The HF state dict of a plain Llama causal LM, the tied output head left out (llama.cpp reuses
    `token_embd` when `output` is absent)."""
    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


def write_model(path: Path, model, tokenizer, outtype: str, name: str) -> None:
    """Write `model` (a plain HF Llama causal LM, no adapters attached) and its tokenizer as a GGUF model."""
    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, ARCH)
    add_hparams(writer, config, outtype, name)
    add_vocab(writer, tokenizer, config.vocab_size, f"tokenizer of {name}")
    for hf_name, tensor in model_tensors(model).items():
        n_head = heads_for(hf_name, config)
        data = permute(tensor, n_head) if n_head else tensor
        array, qtype = encode(data, outtype)
        writer.add_tensor(gguf_name(name_map, hf_name), array, raw_dtype=qtype)
    _finish(writer)


def write_lora(path: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]], alpha: float, config,
               outtype: str, name: str) -> None:
    """Write LoRA factors {module path: (A (r, in), B (out, r), scaling)} of a Llama base as a GGUF adapter."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, ARCH)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for module_path, (a, b, scaling) in modules.items():
        base_name = gguf_name(name_map, f"{module_path}.weight")
        b = b * (scaling * a.shape[0] / alpha)  # llama.cpp applies alpha / r; the rest of the scaling rides in B
        n_head = heads_for(f"{module_path}.weight", config)
        b = permute(b, n_head) if n_head else b
        for suffix, t in (("lora_a", a), ("lora_b", b)):
            array, qtype = encode(t, outtype)
            writer.add_tensor(f"{base_name}.{suffix}", array, raw_dtype=qtype)
    _finish(writer)


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def lora_alpha_for(modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]], config_alpha: float) -> float:
    """`adapter.lora.alpha`: the adapter config's alpha (a finite positive number; else the largest rank)."""
    if isinstance(config_alpha, (int, float)) and math.isfinite(config_alpha) and config_alpha > 0:
        return float(config_alpha)
    return float(max(a.shape[0] for a, _, _ in modules.values()))
