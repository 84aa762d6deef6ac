"""`tunelab export --format gguf`: a merged model loads back through transformers' GGUF loader with the logits of
the merged model (f32 exactly, f16 / bf16 / q8_0 within their rounding), in llama.cpp's tensor names and keys; a
LoRA adapter is written in llama.cpp's adapter layout, and applying it the way llama.cpp does (W + alpha / r *
B A, on the exported tensors) gives the exported merged model. Non-Llama models and bad requests are refused."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from builders import build_tiny, sample_batch
from test_artifacts import LORA, randomize

from tunelab.artifacts import save_artifact
from tunelab.artifacts.export import export_lora, export_model
from tunelab.cli import main
from tunelab.errors import ConfigError
from tunelab.methods import get_method

TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 2e-2, "q8_0": 3e-2}  # max |logit difference|, by tensor type


def lora_dir(base_dir, tokenizer, out, seed=1, **options):
    """A tunelab LoRA adapter with random (non-zero) weights on the tiny model saved at `base_dir`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    LORA.inject(model, LORA.Options(**options), "default")
    randomize(LORA.parameters(model, "default"), seed)
    save_artifact(model, tokenizer, "default", out, base_model=str(base_dir))
    return out


def merged_logits(base_dir, adapter, tokenizer):
    from transformers import AutoModelForCausalLM

    from tunelab.artifacts import load_adapter, merge_and_unload

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if adapter is not None:
        merge_and_unload(model, load_adapter(model, adapter))
    with torch.no_grad():
        return model(**sample_batch(tokenizer)).logits


def gguf_logits(path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    with torch.no_grad():
        return model(**sample_batch(tokenizer)).logits, model


def fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    out = {}
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            out[key] = field.contents()
    return out


def tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_merged_model_loads_in_transformers_gguf_with_same_logits(outtype, tiny_dirs, tokenizer, tmp_path):
    adapter = lora_dir(tiny_dirs["llama"], tokenizer, tmp_path / "a", target_modules="all-linear", r=4)
    out = tmp_path / "gguf" / f"model-{outtype}.gguf"
    written = export_model(tiny_dirs["llama"], out, outtype, adapter=adapter)
    assert written == out.stat().st_size and not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    want = merged_logits(tiny_dirs["llama"], adapter, tokenizer)
    got, model = gguf_logits(out, tokenizer)
    assert (got - want).abs().max().item() <= TOLERANCE[outtype]
    assert not model.config.tie_word_embeddings


def test_model_file_names_and_keys_follow_llama_cpp(tiny_dirs, tokenizer, tmp_path):
    out = tmp_path / "m.gguf"
    export_model(tiny_dirs["llama"], out, "q8_0")
    keys = fields(out)
    assert keys["general.architecture"] == "llama" and keys["general.type"] == "model"
    assert keys["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (keys["llama.block_count"], keys["llama.embedding_length"], keys["llama.attention.head_count"],
            keys["llama.attention.head_count_kv"], keys["llama.rope.dimension_count"]) == (2, 32, 4, 2, 8)
    assert keys["tokenizer.ggml.model"] == "gpt2" and keys["tokenizer.ggml.pre"] == "gpt-2"
    assert keys["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert keys["tokenizer.ggml.add_bos_token"] is False and keys["tokenizer.ggml.add_space_prefix"] is False
    assert keys["tokenizer.chat_template"] == tokenizer.chat_template
    types = keys["tokenizer.ggml.token_type"]
    assert types[tokenizer.convert_tokens_to_ids("<|im_start|>")] == gguf.TokenType.CONTROL
    assert types[100] == gguf.TokenType.NORMAL
    found = tensors(out)
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    assert set(found) == {"token_embd.weight", "output_norm.weight", "output.weight",
                          *[f"blk.{i}.{n}.weight" for i in range(2) for n in per_block]}
    assert found["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert found["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert list(found["blk.0.attn_k.weight"].shape) == [32, 16]  # ggml order: (in, out), 2 kv heads of 8


def test_q_and_k_rows_are_permuted_as_llama_cpp_does(tiny_dirs, tokenizer, tmp_path):
    """llama.cpp's converter: rows of each head reordered from (2, head_dim / 2) halves to interleaved pairs."""
    from transformers import AutoModelForCausalLM

    export_model(tiny_dirs["llama"], tmp_path / "m.gguf", "f32")
    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).model.layers[0].self_attn
    found = tensors(tmp_path / "m.gguf")
    for name, w, heads in (("attn_q", hf.q_proj.weight, 4), ("attn_k", hf.k_proj.weight, 2)):
        want = w.detach().reshape(heads, 2, 4, 32).swapaxes(1, 2).reshape(w.shape)
        assert torch.equal(torch.from_numpy(found[f"blk.0.{name}.weight"].data.copy()), want)
    assert torch.equal(torch.from_numpy(found["blk.0.attn_v.weight"].data.copy()), hf.v_proj.weight.detach())


def test_tied_embeddings_write_no_output_tensor(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny("llama", tokenizer)
    model.config.tie_word_embeddings = True
    tied = AutoModelForCausalLM.from_config(model.config).eval()
    tied.save_pretrained(tmp_path / "tied")
    tokenizer.save_pretrained(tmp_path / "tied")
    export_model(tmp_path / "tied", tmp_path / "t.gguf", "f32")
    assert "output.weight" not in tensors(tmp_path / "t.gguf")
    got, loaded = gguf_logits(tmp_path / "t.gguf", tokenizer)
    assert loaded.config.tie_word_embeddings
    assert torch.allclose(got, merged_logits(tmp_path / "tied", None, tokenizer), atol=1e-5)


@pytest.mark.parametrize("options", [
    {"target_modules": "all-linear", "r": 4, "alpha": 8},
    {"target_modules": ["q_proj", "k_proj", "down_proj"], "r": 4, "alpha": 8, "rslora": True,
     "rank_pattern": {"k_proj": 2}, "alpha_pattern": {"down_proj": 3}},
])
def test_lora_adapter_applied_like_llama_cpp_gives_the_merged_model(options, tiny_dirs, tokenizer, tmp_path):
    adapter = lora_dir(tiny_dirs["llama"], tokenizer, tmp_path / "a", **options)
    export_lora(tiny_dirs["llama"], adapter, tmp_path / "lora.gguf", "f32")
    export_model(tiny_dirs["llama"], tmp_path / "base.gguf", "f32")
    export_model(tiny_dirs["llama"], tmp_path / "merged.gguf", "f32", adapter=adapter)
    keys = fields(tmp_path / "lora.gguf")
    assert keys["general.type"] == "adapter" and keys["adapter.type"] == "lora"
    assert keys["general.architecture"] == "llama" and keys["adapter.lora.alpha"] == options["alpha"]
    lora, base, merged = (tensors(tmp_path / f) for f in ("lora.gguf", "base.gguf", "merged.gguf"))
    pairs = {n.removesuffix(".lora_a") for n in lora if n.endswith(".lora_a")}
    assert {n for n in lora} == {f"{p}.lora_{x}" for p in pairs for x in "ab"} and "blk.1.attn_q.weight" in pairs
    for name in base:
        w = torch.from_numpy(base[name].data.copy())
        if name in pairs:
            a, b = (torch.from_numpy(lora[f"{name}.lora_{x}"].data.copy()) for x in "ab")
            assert a.shape[0] == b.shape[1] and a.shape[1] == w.shape[1] and b.shape[0] == w.shape[0]
            w = w + keys["adapter.lora.alpha"] / a.shape[0] * b @ a  # llama.cpp: scale = alpha / rank
        assert torch.allclose(w, torch.from_numpy(merged[name].data.copy()), atol=1e-5), name


def test_non_llama_refused_in_one_line(tiny_dirs, tmp_path, capsys):
    code = main(["export", "--model", str(tiny_dirs["gpt2"]), "--format", "gguf", "--output", str(tmp_path / "g.gguf")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "architecture 'gpt2' (GPT2LMHeadModel); GGUF export supports Llama-architecture models only" in err
    assert not (tmp_path / "g.gguf").exists()


@pytest.mark.parametrize("argv, message", [
    (["--format", "onnx"], "--format 'onnx': expected one of gguf"),
    (["--format", "gguf", "--outtype", "q4"], "--outtype 'q4': expected one of f32, f16, bf16, q8_0"),
    (["--format", "gguf", "--lora"], "--lora: expected --adapter DIR"),
])
def test_bad_requests_exit_2(argv, message, tiny_dirs, tmp_path, capsys):
    code = main(["export", "--model", str(tiny_dirs["llama"]), "--output", str(tmp_path / "x.gguf"), *argv])
    assert code == 2 and message in capsys.readouterr().err


def test_existing_output_and_dora_lora_refused(tiny_dirs, tokenizer, tmp_path):
    (tmp_path / "x.gguf").write_text("keep")
    with pytest.raises(ConfigError, match="exists; expected a new file path"):
        export_model(tiny_dirs["llama"], tmp_path / "x.gguf", "f32")
    assert (tmp_path / "x.gguf").read_text() == "keep"
    from transformers import AutoModelForCausalLM

    dora = get_method("dora")
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    dora.inject(model, dora.Options(), "default")
    save_artifact(model, tokenizer, "default", tmp_path / "d")
    with pytest.raises(ConfigError, match="method 'dora'.*expected a plain LoRA adapter .* to export as a GGUF"):
        export_lora(tiny_dirs["llama"], tmp_path / "d", tmp_path / "d.gguf")


def test_cli_exports_model_and_lora(tiny_dirs, tokenizer, tmp_path, capsys):
    adapter = lora_dir(tiny_dirs["llama"], tokenizer, tmp_path / "a")
    base = ["export", "--model", str(tiny_dirs["llama"]), "--format", "gguf", "--adapter", str(adapter)]
    assert main([*base, "--output", str(tmp_path / "m.gguf"), "--outtype", "f32"]) == 0
    assert main([*base, "--lora", "--output", str(tmp_path / "l.gguf")]) == 0
    out = capsys.readouterr().out
    assert "model written to" in out and "LoRA adapter written to" in out
    assert fields(tmp_path / "l.gguf")["adapter.lora.alpha"] == json.loads(
        (adapter / "adapter_config.json").read_text())["lora_alpha"]
