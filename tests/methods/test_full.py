"""full: every weight trains, the artifact is the model itself, and it combines with no other adapter."""

from __future__ import annotations

import pytest
import torch
from _matrix import adam_steps, labelled_batch, logits, snapshot
from conftest import build_tiny

from tunelab.errors import ArtifactError, ConfigError
from tunelab.methods import get_method
from tunelab.methods.base import adapter_state

FULL = get_method("full")
LORA = get_method("lora")


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_inject_trains_everything(kind, tokenizer):
    model = build_tiny(kind, tokenizer)
    for p in model.parameters():
        p.requires_grad_(False)
    assert FULL.inject(model, FULL.Options(), "default") == []
    assert all(p.requires_grad for p in model.parameters())
    params = FULL.parameters(model, "default")
    assert set(params) == {n for n, _ in model.named_parameters()}
    assert sum(p.numel() for p in params.values()) == FULL.expected_trainable(model, FULL.Options())
    snap = snapshot(model)
    losses = adam_steps(model, FULL, "default", labelled_batch(tokenizer, kind))
    assert losses[-1] < losses[0]
    after = dict(model.named_parameters())
    embed = next(n for n in snap if "embed" in n or "wte" in n or "word_embeddings" in n)
    head = [n for n in snap if n.startswith(("lm_head", "classifier"))] or [embed]  # gpt2 ties lm_head to wte
    for n in (embed, *head):
        assert not torch.equal(after[n], snap[n]), f"{n} did not train"


def test_state_dict_round_trip_with_tied_weights(tokenizer):
    model = build_tiny("gpt2", tokenizer)  # lm_head.weight is tied to transformer.wte.weight
    FULL.inject(model, FULL.Options(), "default")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    sd = FULL.state_dict(model, "default")
    assert set(sd) == set(model.state_dict())  # plain HF keys
    batch = labelled_batch(tokenizer, "gpt2")
    want = logits(model, batch)
    fresh = build_tiny("gpt2", tokenizer)
    FULL.inject(fresh, FULL.Options(), "default")
    tied_only_once = {k: v for k, v in sd.items() if k != "lm_head.weight"}  # as save_pretrained writes it
    FULL.load_state_dict(fresh, tied_only_once, "default")
    assert torch.equal(logits(fresh, batch), want)


def test_load_errors_name_keys_and_shapes(tokenizer):
    model = build_tiny("llama", tokenizer)
    FULL.inject(model, FULL.Options(), "default")
    sd = dict(FULL.state_dict(model, "default"))
    missing = {k: v for k, v in sd.items() if k != "model.norm.weight"}
    with pytest.raises(ArtifactError, match="missing keys model.norm.weight"):
        FULL.load_state_dict(model, missing, "default")
    wrong = {**sd, "model.norm.weight": torch.ones(7)}
    with pytest.raises(ArtifactError, match=r"model.norm.weight has shape \(7,\).*\(32,\)"):
        FULL.load_state_dict(model, wrong, "default")
    with pytest.raises(ArtifactError, match="unexpected keys extra.weight"):
        FULL.load_state_dict(model, {**sd, "extra.weight": torch.ones(1)}, "default")


def test_one_full_adapter_and_nothing_else(tokenizer):
    model = build_tiny("llama", tokenizer)
    FULL.inject(model, FULL.Options(), "default")
    with pytest.raises(ConfigError, match="whole-model method cannot be combined"):
        FULL.inject(model, FULL.Options(), "second")
    with pytest.raises(ConfigError, match="whole-model method cannot be combined"):
        LORA.inject(model, LORA.Options(), "lora")
    other = build_tiny("llama", tokenizer)
    LORA.inject(other, LORA.Options(), "lora")
    with pytest.raises(ConfigError, match="whole-model method cannot be combined"):
        FULL.inject(other, FULL.Options(), "default")
    assert adapter_state(other).methods == {"lora": "lora"}


def test_merge_is_refused_and_remove_keeps_weights(tokenizer):
    model = build_tiny("llama", tokenizer)
    FULL.inject(model, FULL.Options(), "default")
    with pytest.raises(ConfigError, match="nothing to merge"):
        FULL.merge(model, "default")
    snap = snapshot(model)
    FULL.remove(model, "default")
    assert adapter_state(model).methods == {}
    assert all(torch.equal(p, snap[n]) for n, p in model.named_parameters())
