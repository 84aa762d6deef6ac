"""qlora: the base linears stored as torchao NF4 (names and shapes kept, memory smaller, head untouched), the NF4
forward and backward against the dequantised weight (Linear and GPT-2's Conv1D), training with the NF4 data
frozen, save/load, the artifact in PEFT on the unquantised base, merge, removal, and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from _matrix import (
    adam_steps,
    labelled_batch,
    logits,
    perturb,
    run_cli,
    same_bits,
    snapshot,
)
from conftest import build_tiny
from torch import nn

from tunelab.artifacts import load_adapter, save_artifact
from tunelab.errors import ConfigError
from tunelab.methods import get_method, nf4
from tunelab.methods.base import adapter_state

QLORA = get_method("qlora")
LORA = get_method("lora")
Options = QLORA.Options
HEADS = {"llama": "lm_head", "gpt2": "lm_head", "bert": "classifier"}


def is_nf4(t: torch.Tensor) -> bool:
    return type(t).__name__ == "NF4Tensor"


def linears(model):
    return {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}


def reference_nf4(weight: torch.Tensor) -> torch.Tensor:
    """torchao's own round trip of `weight` with the block sizes nf4.py picks."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    block, scaler = nf4.block_sizes(weight)
    return to_nf4(weight, block_size=block, scaler_block_size=scaler).get_original_weight()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_inject_stores_every_linear_but_the_head_as_nf4(kind, tokenizer):
    base = build_tiny(kind, tokenizer)
    model = build_tiny(kind, tokenizer)
    touched = QLORA.inject(model, Options(r=4), "default")
    params = dict(model.named_parameters())
    assert set(params) - set(QLORA.parameters(model, "default")) == set(dict(base.named_parameters()))
    quantized = {p for p, m in linears(model).items() if is_nf4(m.weight)}
    heads = {p for p in linears(base) if p == HEADS[kind] or p.startswith(HEADS[kind] + ".")}
    assert quantized == set(linears(base)) - heads and quantized <= set(touched)  # all-linear, as QLoRA
    for path in quantized:
        weight, original = model.get_submodule(path).weight, base.get_submodule(path).weight
        assert weight.shape == original.shape and weight.dtype == original.dtype and not weight.requires_grad
        assert torch.equal(weight.get_original_weight(), reference_nf4(original.detach()))
        assert (weight.get_original_weight() - original).abs().max() < 0.2 * original.abs().max()
    for path in heads:
        assert not is_nf4(model.get_submodule(path).weight)
    report = QLORA.memory_report(model, "default")
    before = sum(base.get_submodule(p).weight.nbytes for p in quantized)
    assert report["quantized_modules"] == len(quantized) and report["quantized_weight_bytes_before"] == before
    assert report["quantized_weight_bytes_after"] < 0.2 * before  # 4-bit codes + int8 scalers vs fp32
    assert report["base_bytes_saved"] == before - report["quantized_weight_bytes_after"]
    assert report["unquantized_modules"] == {}


def test_a_layer_no_block_size_fits_stays_as_it_is():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 8))
    QLORA.inject(model, Options(r=2), "default")
    assert [is_nf4(model[i].weight) for i in (0, 2, 4)] == [True, True, False]  # 24 is not a multiple of 16
    assert model[2].weight.get_original_weight().shape == (24, 64)
    report = QLORA.memory_report(model, "default")
    assert report["quantized_modules"] == 2
    assert list(report["unquantized_modules"]) == ["4"] and "24" in report["unquantized_modules"]["4"]
    out = model(torch.randn(3, 32))
    assert out.shape == (3, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("kind, path", [("llama", "model.layers.0.mlp.down_proj"),
                                        ("gpt2", "transformer.h.0.attn.c_attn")])
def test_nf4_forward_and_backward_use_the_dequantised_weight(kind, path, tokenizer):
    model = build_tiny(kind, tokenizer)
    QLORA.inject(model, Options(r=4), "default")
    perturb(QLORA, model, "default", seed=1)
    layer = model.get_submodule(path)
    w = layer.weight.get_original_weight()
    w = w if isinstance(layer, nn.Linear) else w.T  # (out, in)
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_scaling["default"]
    x = torch.randn(2, 3, w.shape[1], requires_grad=True)
    ref_x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    want = ref_x @ w.T + s * ref_x @ a.T @ b.T + (0 if layer.bias is None else layer.bias)
    assert torch.allclose(out, want, atol=1e-5)
    out.pow(2).sum().backward()
    want.pow(2).sum().backward()
    assert torch.allclose(x.grad, ref_x.grad, atol=1e-5)
    assert layer.weight.grad is None


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_loss_goes_down_with_the_nf4_data_frozen(kind, tokenizer):
    model = build_tiny(kind, tokenizer)
    QLORA.inject(model, Options(r=4), "default")
    frozen = {n: w for n, w in snapshot(model).items() if isinstance(w, tuple)}  # NF4 inner tensors
    assert frozen
    losses = adam_steps(model, QLORA, "default", labelled_batch(tokenizer, kind))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    params = dict(model.named_parameters())
    assert all(same_bits(params[n], w) for n, w in frozen.items())


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_artifact_reloads_exactly_and_loads_in_peft_on_the_unquantised_base(kind, tokenizer, tmp_path):
    from peft import PeftModel

    batch = labelled_batch(tokenizer, kind)
    model = build_tiny(kind, tokenizer)
    QLORA.inject(model, Options(r=4), "default")
    perturb(QLORA, model, "default", seed=2)
    want = logits(model, batch)
    labels = ["a", "b", "c"] if kind == "bert" else None
    save_artifact(model, tokenizer, "default", tmp_path / "a", label_names=labels)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is False
    fresh = build_tiny(kind, tokenizer)
    load_adapter(fresh, tmp_path / "a")  # tunelab's sidecar says qlora: the base is quantised the same way
    assert adapter_state(fresh).methods == {"default": "qlora"}
    assert torch.allclose(logits(fresh, batch), want, atol=1e-5)
    peft_model = PeftModel.from_pretrained(build_tiny(kind, tokenizer), tmp_path / "a").eval()
    theirs = logits(peft_model, batch)
    plain = build_tiny(kind, tokenizer)  # the same weights as a plain LoRA on the unquantised base
    LORA.inject(plain, LORA.options_from_config(config), "default")
    LORA.load_state_dict(plain, QLORA.state_dict(model, "default"), "default")
    assert torch.allclose(theirs, logits(plain, batch), atol=1e-5)
    gap = (theirs - want).abs().max()  # trained against the NF4 base: close, not equal
    assert 0 < gap < 0.25 * want.abs().max()


def test_merge_dequantises_and_remove_restores_plain_weights(tokenizer):
    batch = labelled_batch(tokenizer, "gpt2")
    base = build_tiny("gpt2", tokenizer)
    model = build_tiny("gpt2", tokenizer)
    QLORA.inject(model, Options(r=4, target_modules=["c_attn"]), "default")
    perturb(QLORA, model, "default", seed=3)
    want = logits(model, batch)
    layer = model.transformer.h[0].attn.c_attn
    dequantised = layer.weight.get_original_weight()
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.lora_scaling["default"]).T
    QLORA.merge(model, "default")
    assert not is_nf4(layer.weight) and torch.allclose(layer.weight, dequantised + delta, atol=1e-6)
    assert is_nf4(model.transformer.h[0].mlp.c_fc.weight)  # not a target: still NF4
    assert torch.allclose(logits(model, batch), want, atol=1e-5)
    report = QLORA.memory_report(model, "default")
    assert report["unquantized_modules"]["transformer.h.0.attn.c_attn"] == "dequantised by merge"
    QLORA.remove(model, "default")  # the last qlora adapter: everything plain again, same names
    assert not any(is_nf4(p) for p in model.parameters())
    assert set(dict(model.named_parameters())) == set(dict(base.named_parameters()))
    assert not any(hasattr(m, nf4.NF4_ATTR) or "forward" in vars(m) for m in model.modules())
    assert torch.allclose(logits(model, batch), want, atol=1e-5)  # merged and unloaded


def test_two_qlora_adapters_share_the_quantised_base(tokenizer):
    model = build_tiny("llama", tokenizer)
    QLORA.inject(model, Options(r=4), "a")
    data = model.model.layers[0].self_attn.q_proj.weight.quantized_data
    QLORA.inject(model, Options(r=2), "b")
    assert model.model.layers[0].self_attn.q_proj.weight.quantized_data is data  # quantised once
    QLORA.remove(model, "b")
    assert is_nf4(model.model.layers[0].self_attn.q_proj.weight)  # "a" still trains on it
    QLORA.remove(model, "a")
    assert not any(is_nf4(p) for p in model.parameters())


def test_quantising_under_or_beside_other_methods_is_refused(tokenizer):
    model = build_tiny("llama", tokenizer)
    LORA.inject(model, LORA.Options(r=4), "plain")
    with pytest.raises(ConfigError, match=r"already loaded \(plain \(lora\)\)"):
        QLORA.inject(model, Options(r=4), "q")
    assert not any(is_nf4(p) for p in model.parameters()) and "q" not in adapter_state(model).methods
    other = build_tiny("llama", tokenizer)
    QLORA.inject(other, Options(r=4), "q")
    with pytest.raises(ConfigError, match=r"q_proj: its weight is NF4-quantised for qlora"):
        LORA.inject(other, LORA.Options(r=4), "plain")


def test_cli_qlora_reports_the_memory_saved(tiny_dirs, instruction_jsonl, tmp_path, tokenizer):
    summary = run_cli(tiny_dirs, instruction_jsonl, tmp_path / "run", "qlora", "r=4")
    report = summary["memory_report"]
    assert report["quantized_modules"] == 2 * 7  # q k v o gate up down in each of 2 layers
    assert 0 < report["quantized_weight_bytes_after"] < report["quantized_weight_bytes_before"]
    assert report["base_bytes_saved"] > 0 and report["unquantized_modules"] == {}
    assert summary["params_trainable"] == QLORA.expected_trainable(build_tiny("llama", tokenizer), Options(r=4))
