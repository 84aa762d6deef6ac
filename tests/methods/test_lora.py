"""lora: injection per architecture (Linear and GPT-2's Conv1D), scaling, init, target selection, several named
adapters, disabling, merging and mixed-adapter batches, on the tiny models of tests/conftest.py."""

from __future__ import annotations

import math

import pytest
import torch
from _matrix import adam_steps, labelled_batch, logits, perturb, snapshot
from conftest import build_tiny

from tunelab.errors import ConfigError
from tunelab.methods import get_method
from tunelab.methods.base import adapter_state, disabled, set_active
from tunelab.validation import parse_model

LORA = get_method("lora")
Options = LORA.Options


def injected(kind, tokenizer, name="default", **options):
    model = build_tiny(kind, tokenizer)
    touched = LORA.inject(model, Options(**options), name)
    return model, touched


@pytest.mark.parametrize("kind, leaves, shapes", [
    ("llama", {"q_proj", "v_proj"}, {"q_proj": (32, 32), "v_proj": (32, 16)}),  # (in, out); GQA: v has 2 kv heads
    ("gpt2", {"c_attn"}, {"c_attn": (32, 96)}),  # Conv1D: weight (in, out), fused q|k|v
    ("bert", {"query", "value", "classifier"}, {"query": (32, 32), "value": (32, 32)}),
])
def test_default_targets_and_shapes(kind, leaves, shapes, tokenizer):
    model, touched = injected(kind, tokenizer, r=4)
    assert {t.rsplit(".", 1)[-1] for t in touched} == leaves
    assert len([t for t in touched if not t.endswith("classifier")]) == 2 * len(shapes)  # 2 layers
    for path in touched:
        module = model.get_submodule(path)
        leaf = path.rsplit(".", 1)[-1]
        if leaf in shapes:
            d_in, d_out = shapes[leaf]
            assert module.lora_A["default"].weight.shape == (4, d_in)
            assert module.lora_B["default"].weight.shape == (d_out, 4)
            assert module.lora_A["default"].weight.dtype == torch.float32


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_steps_train_A_and_B_and_keep_base(kind, tokenizer):
    model = build_tiny(kind, tokenizer)
    snap = snapshot(model)
    LORA.inject(model, Options(r=4), "default")
    before = {k: p.detach().clone() for k, p in LORA.parameters(model, "default").items()}
    losses = adam_steps(model, LORA, "default", labelled_batch(tokenizer, kind))
    assert losses[-1] < losses[0]
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], w) for n, w in snap.items())  # the base, head included, bit-identical
    after = LORA.parameters(model, "default")
    for kind_of in ("lora_A", "lora_B"):  # B moves on step 1, A once B is non-zero
        assert all(not torch.equal(after[k], before[k]) for k in before if f".{kind_of}." in k)
    if kind == "bert":  # the new classification head trains with the adapter
        head = [k for k in before if ".modules_to_save.default." in k]
        assert head and all(not torch.equal(after[k], before[k]) for k in head)


@pytest.mark.parametrize("rslora, scaling", [(False, 16 / 4), (True, 16 / math.sqrt(4))])
def test_scaling_and_delta(rslora, scaling, tokenizer):
    model, _ = injected("llama", tokenizer, r=4, alpha=16, rslora=rslora)
    perturb(LORA, model, "default", seed=0)
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_scaling["default"] == pytest.approx(scaling)
    x = torch.randn(2, 5, 32)  # (batch, seq, hidden)
    a, b = q.lora_A["default"].weight, q.lora_B["default"].weight
    want = x @ q.weight.T + scaling * (x @ a.T @ b.T)  # W x + s * B A x
    with torch.no_grad():
        assert torch.allclose(q(x), want, atol=1e-5)


@pytest.mark.parametrize("init, peft_init", [("default", True), ("gaussian", "gaussian")])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_init_matches_peft_exactly(kind, init, peft_init, tokenizer):
    """Same seed -> the same A and B as PEFT (kaiming-uniform(a=sqrt 5) or normal(1/r) A, zero B)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    model = build_tiny(kind, tokenizer)
    torch.manual_seed(7)
    touched = LORA.inject(model, Options(r=4, init=init), "default")
    ours = LORA.state_dict(model, "default")
    leaves = sorted({t.rsplit(".", 1)[-1] for t in touched})
    base = build_tiny(kind, tokenizer)  # seeds itself: build it before seeding the adapter init
    torch.manual_seed(7)
    peft_model = get_peft_model(base, LoraConfig(r=4, init_lora_weights=peft_init, target_modules=leaves))
    theirs = get_peft_model_state_dict(peft_model)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(torch.count_nonzero(t) == 0 for k, t in ours.items() if "lora_B" in k)
    a_values = torch.cat([t.flatten() for k, t in ours.items() if "lora_A" in k])
    if init == "gaussian":
        assert a_values.std().item() == pytest.approx(1 / 4, rel=0.15)
    else:
        assert a_values.abs().max().item() <= 1 / math.sqrt(32)  # kaiming-uniform(a=sqrt 5) bound: 1/sqrt(fan_in)


def test_target_modules_list_regex_all_linear(tokenizer):
    _, as_list = injected("llama", tokenizer, target_modules=["k_proj", "down_proj"])
    assert sorted(as_list) == sorted(f"model.layers.{i}.{m}" for i in (0, 1)
                                     for m in ("self_attn.k_proj", "mlp.down_proj"))
    _, as_regex = injected("llama", tokenizer, target_modules=r"model\.layers\.1\.self_attn\.(q|o)_proj")
    assert as_regex == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj"]
    _, every = injected("llama", tokenizer, target_modules="all-linear")
    assert len(every) == 2 * 7 and "lm_head" not in every  # q k v o gate up down per layer
    bert, every_bert = injected("bert", tokenizer, target_modules="all-linear")
    lora_targets = [t for t in every_bert if hasattr(bert.get_submodule(t), "lora_A")]
    assert "classifier" not in lora_targets and len(lora_targets) == 2 * 6 + 1  # 6 per layer + pooler
    assert "classifier" in every_bert  # the head is touched as a full copy, not by LoRA


def test_no_match_lists_patterns_and_real_names(tokenizer):
    with pytest.raises(ConfigError) as err:
        injected("llama", tokenizer, target_modules=["qkv", "attn_out"])
    msg = str(err.value)
    assert "['qkv', 'attn_out']" in msg and "q_proj" in msg and "\n" not in msg
    assert adapter_state(build_tiny("llama", tokenizer)).methods == {}


@pytest.mark.parametrize("values, key", [({"r": 0}, "r"), ({"dropout": 1.0}, "dropout"),
                                         ({"target_modules": []}, "target_modules"),
                                         ({"target_modules": "(unclosed"}, "target_modules"),
                                         ({"rank": 4}, "rank")])
def test_bad_options_are_config_errors(values, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        parse_model(Options, values, where="--set for method 'lora'")


def test_two_named_adapters_switch_and_remove(tokenizer):
    model = build_tiny("llama", tokenizer)
    batch = labelled_batch(tokenizer, "llama")
    snap, base = snapshot(model), logits(model, batch)
    LORA.inject(model, Options(r=4), "a")
    assert adapter_state(model).active == ("a",)  # inject leaves the new adapter active
    LORA.inject(model, Options(r=2, target_modules="all-linear"), "b")
    assert adapter_state(model).active == ("b",)
    assert not any("lora_A.a.lora" in k for k in LORA.parameters(model, "b"))  # b never adapts a's layers
    perturb(LORA, model, "a", seed=1)
    perturb(LORA, model, "b", seed=2)
    set_active(model, ["a"])
    out_a = logits(model, batch)
    set_active(model, ["b"])
    out_b = logits(model, batch)
    assert not torch.allclose(out_a, out_b, atol=1e-3)
    set_active(model, ["a", "b"])  # both active: each layer adds both deltas
    q, x = model.model.layers[0].self_attn.q_proj, torch.randn(2, 3, 32)
    deltas = [(x @ q.lora_A[n].weight.T @ q.lora_B[n].weight.T) * q.lora_scaling[n] for n in ("a", "b")]
    with torch.no_grad():
        assert torch.allclose(q(x), x @ q.weight.T + deltas[0] + deltas[1], atol=1e-5)
    with pytest.raises(ConfigError, match="already exists"):
        LORA.inject(model, Options(), "a")
    LORA.remove(model, "b")
    set_active(model, ["a"])
    assert torch.equal(logits(model, batch), out_a)
    LORA.remove(model, "a")
    assert set(dict(model.named_parameters())) == set(snap)
    assert not any(hasattr(m, "lora_A") or hasattr(m, "lora_scaling") for m in model.modules())
    hooks = [h for m in model.modules() for h in m._forward_hooks.values()]  # transformers adds its own
    assert not any(getattr(h, "__module__", "").startswith("tunelab.methods.lora") for h in hooks)
    assert torch.equal(logits(model, batch), base)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_disabled_is_base_and_merge_is_unmerged(kind, tokenizer):
    model = build_tiny(kind, tokenizer)
    batch = labelled_batch(tokenizer, kind)
    snap, base = snapshot(model), logits(model, batch)
    LORA.inject(model, Options(r=4, rslora=True), "default")
    perturb(LORA, model, "default", seed=3)
    adapted = logits(model, batch)
    assert not torch.allclose(adapted, base, atol=1e-3)
    with disabled(model):
        assert torch.equal(logits(model, batch), base)
    LORA.merge(model, "default")
    assert adapter_state(model).active == ()
    assert torch.allclose(logits(model, batch), adapted, atol=1e-5)
    set_active(model, ["default"])  # a merged adapter is not added a second time
    assert torch.allclose(logits(model, batch), adapted, atol=1e-5)
    LORA.unmerge(model, "default")
    params = dict(model.named_parameters())
    assert all(torch.allclose(params[n], w, atol=1e-6) for n, w in snap.items())
    assert torch.allclose(logits(model, batch), adapted, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_mixed_row_adapters_match_per_row_forwards(kind, tokenizer):
    texts = ("the quick brown fox", "hello, how are you today? i am fine", "a language model predicts")
    batch = dict(tokenizer(list(texts), return_tensors="pt", padding=True))
    model = build_tiny(kind, tokenizer)
    LORA.inject(model, Options(r=4), "a")
    LORA.inject(model, Options(r=2, target_modules="all-linear"), "b")
    perturb(LORA, model, "a", seed=4)
    perturb(LORA, model, "b", seed=5)
    rows = ["b", None, "a"]
    state = adapter_state(model)
    state.row_adapters = rows
    mixed = logits(model, batch)
    state.row_adapters = None
    for i, name in enumerate(rows):
        set_active(model, [name] if name else [])
        alone = logits(model, {k: v[i:i + 1] for k, v in batch.items()})
        keep = batch["attention_mask"][i].bool() if kind == "llama" else slice(None)  # padded positions differ
        # the stacked path's batched matmuls sum in another order: fp32 rounding, not a wrong adapter (~1e-1)
        assert torch.allclose(mixed[i][keep], alone[0][keep], atol=5e-5), (i, name)
    state.row_adapters = ["a", "nope", None]
    with pytest.raises(ConfigError, match="nope"):
        logits(model, batch)


def test_bf16_base_keeps_fp32_adapters(tokenizer):
    model = build_tiny("llama", tokenizer).to(torch.bfloat16)
    LORA.inject(model, Options(r=4), "default")
    perturb(LORA, model, "default", seed=6)
    assert all(p.dtype == torch.float32 for p in LORA.parameters(model, "default").values())
    out = logits(model, labelled_batch(tokenizer, "llama"))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("field, value", [("use_dora", True), ("lora_bias", True),
                                          ("layer_replication", [[0, 1]]), ("init_lora_weights", "loftq"),
                                          ("trainable_token_indices", [0])])
def test_unsupported_peft_features_are_refused(field, value):
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], field: value}
    with pytest.raises(ConfigError, match=field):
        LORA.options_from_config(config)


def test_options_from_peft_field_names():
    opts = LORA.options_from_config({"peft_type": "LORA", "r": 4, "lora_alpha": 32, "lora_dropout": 0.1,
                                     "use_rslora": True, "init_lora_weights": "gaussian",
                                     "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM",
                                     "some_future_field": None})
    assert opts == Options(r=4, alpha=32, dropout=0.1, rslora=True, init="gaussian",
                           target_modules=["q_proj", "v_proj"])
