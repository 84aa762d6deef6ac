"""Parity with transformers: a merged LoRA dir and a full fine-tuning dir load with AutoModelForCausalLM /
AutoModelForSequenceClassification and give the logits of the in-memory model."""

from __future__ import annotations

import pytest
import torch
from builders import build_tiny
from test_artifacts import FULL, LABELS, logits, lora_model, randomize

from tunelab.artifacts import merge_and_unload, save_artifact, save_merged
from tunelab.methods.base import adapter_state


def auto_load(kind, path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if kind == "bert" else AutoModelForCausalLM
    return auto.from_pretrained(path).eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_merged_dir_loads_in_transformers(kind, tokenizer, tmp_path):
    model = lora_model(kind, tokenizer, seed=4, target_modules="all-linear", rslora=True)
    want = logits(model, tokenizer=tokenizer)
    base = logits(build_tiny(kind, tokenizer), tokenizer=tokenizer)
    labels = LABELS if kind == "bert" else None
    written = save_merged(model, tokenizer, "default", tmp_path / "merged", label_names=labels)
    assert written > 0 and adapter_state(model).methods == {}
    assert not any(hasattr(m, "lora_A") or hasattr(m, "modules_to_save") for m in model.modules())
    loaded = auto_load(kind, tmp_path / "merged")
    got = logits(loaded, tokenizer=tokenizer)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, base, atol=1e-3)
    if kind == "bert":
        assert loaded.config.id2label == dict(enumerate(LABELS))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_full_dir_loads_in_transformers(kind, tokenizer, tmp_path):
    model = build_tiny(kind, tokenizer)
    FULL.inject(model, FULL.Options(), "default")
    randomize({n: p for n, p in model.named_parameters() if "norm" in n.lower() or "ln_" in n}, seed=5, std=1.0)
    want = logits(model, tokenizer=tokenizer)
    save_artifact(model, tokenizer, "default", tmp_path / "full")
    got = logits(auto_load(kind, tmp_path / "full"), tokenizer=tokenizer)
    assert torch.allclose(got, want, atol=1e-5)


def test_merge_and_unload_returns_a_plain_model(tokenizer):
    model = lora_model("bert", tokenizer, seed=6)
    want = logits(model, tokenizer=tokenizer)
    names = {n for n, _ in build_tiny("bert", tokenizer).named_parameters()}
    assert merge_and_unload(model, "default") is model
    assert {n for n, _ in model.named_parameters()} == names
    assert torch.allclose(logits(model, tokenizer=tokenizer), want, atol=1e-5)
