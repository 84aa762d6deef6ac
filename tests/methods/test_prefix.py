"""prefix: the method matrix on tiny Llama (grouped-query attention) and GPT-2, with and without the
reparameterisation MLP; padding, generation with the KV cache, parity with HF PEFT's PREFIX_TUNING both ways,
the analytic count, and errors (BERT, gradient checkpointing, bad options and files)."""

from __future__ import annotations

import json

import pytest
import torch
from _matrix import (
    check_count, check_generate_cache, check_padded_rows, check_train_keeps_base, check_two_adapters,
    labelled_batch, outputs,
)
from conftest import build_tiny, sample_batch
from safetensors.torch import load_file, save_file

from tunelab.config import build_config, parse_set
from tunelab.errors import ArtifactError, ConfigError
from tunelab.methods import get_method
from tunelab.methods.base import adapter_state, disabled, set_active
from tunelab.validation import parse_model

peft = pytest.importorskip("peft")  # the reference implementation (a test dependency)
METHOD = get_method("prefix")
PLAIN = METHOD.Options(num_virtual_tokens=3)
PROJECTED = METHOD.Options(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=24)
OPTIONS = {"plain": PLAIN, "projected": PROJECTED}
KINDS = ("llama", "gpt2")  # BERT's classifier takes no key/value cache: see test_bert_is_refused


@pytest.mark.parametrize("check", (check_train_keeps_base, check_two_adapters, check_count), ids=lambda c: c.__name__)
@pytest.mark.parametrize("variant", OPTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_matrix(kind, variant, check, tokenizer):
    check(kind, tokenizer, "prefix", OPTIONS[variant])


def injected(kind, tokenizer, name="default", options=PLAIN):
    model = build_tiny(kind, tokenizer)
    METHOD.inject(model, options, name)
    set_active(model, [name])
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_shapes_and_disabled(kind, tokenizer):
    """The prefixes follow the key/value heads (2 of 4 on Llama); the logits keep their shape and change;
    disabled gives the base."""
    batch = labelled_batch(tokenizer, kind)
    base = outputs(build_tiny(kind, tokenizer), batch)
    model = injected(kind, tokenizer)
    kv_dim = 16 if kind == "llama" else 32  # Llama: 2 kv heads * head_dim 8; GPT-2: 4 heads * 8
    assert tuple(model.prefix_encoder["default"].embedding.shape) == (3, 2 * 2 * kv_dim)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert out.logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    assert not torch.allclose(outputs(model, batch), base, atol=1e-4)
    with disabled(model):
        assert torch.equal(outputs(model, batch), base)


@pytest.mark.parametrize("variant", OPTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_same_logits(kind, variant, tokenizer, tmp_path):
    """state_dict (the computed prefixes, MLP folded away) -> safetensors -> a fresh base -> the same logits."""
    batch = labelled_batch(tokenizer, kind)
    model = injected(kind, tokenizer, options=OPTIONS[variant])
    want = outputs(model, batch)
    sd = METHOD.state_dict(model, "default")
    kv_dim = 16 if kind == "llama" else 32
    assert set(sd) == {"prompt_embeddings"} and tuple(sd["prompt_embeddings"].shape) == (3, 2 * 2 * kv_dim)
    save_file(sd, tmp_path / "adapter_model.safetensors")
    config = json.loads(json.dumps(METHOD.adapter_config(model, OPTIONS[variant], "default")))

    torch.manual_seed(123)  # different prefixes before loading
    other = injected(kind, tokenizer, options=METHOD.options_from_config(config))
    before = METHOD.parameters(other, "default")
    METHOD.load_state_dict(other, load_file(tmp_path / "adapter_model.safetensors"), "default")
    assert torch.allclose(outputs(other, batch), want, atol=1e-6)
    after = METHOD.parameters(other, "default")
    assert list(after) == ["prefix_encoder.default.embedding"]  # with the MLP: folded away
    if variant == "plain":  # loaded in place: an optimizer built before the load still trains the prefixes
        assert after["prefix_encoder.default.embedding"] is before["prefix_encoder.default.embedding"]


@pytest.mark.parametrize("side", ("left", "right"))
@pytest.mark.parametrize("kind", KINDS)
def test_padded_rows_match_rows_alone(kind, side, tokenizer):
    check_padded_rows(injected(kind, tokenizer), tokenizer, side)


@pytest.mark.parametrize("variant", OPTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_generate_with_cache_equals_without(kind, variant, tokenizer):
    check_generate_cache(injected(kind, tokenizer, options=OPTIONS[variant]), tokenizer)


def test_prompt_and_prefix_together(tokenizer):
    """A soft prompt and prefixes active at once (two methods' hooks on one model) decode the same with and
    without the KV cache, and differ from each alone."""
    model = injected("llama", tokenizer, "kv")
    get_method("prompt").inject(model, get_method("prompt").Options(num_virtual_tokens=2), "soft")
    set_active(model, ["kv", "soft"])
    check_generate_cache(model, tokenizer, max_new_tokens=6)
    batch = labelled_batch(tokenizer, "llama")
    both = outputs(model, batch)
    for alone in (["kv"], ["soft"]):
        set_active(model, alone)
        assert not torch.allclose(outputs(model, batch), both, atol=1e-4)


def _peft_config(options) -> "peft.PrefixTuningConfig":
    return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=options.num_virtual_tokens,
                                   prefix_projection=options.prefix_projection,
                                   encoder_hidden_size=options.encoder_hidden_size)


def _out(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits, out.loss


@pytest.mark.parametrize("variant", OPTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_peft_to_tunelab(kind, variant, tokenizer):
    """Random prefixes made and saved by PEFT load into tunelab: the same logits and loss."""
    batch = labelled_batch(tokenizer, kind)  # with labels, -100 on padding
    peft_model = peft.get_peft_model(build_tiny(kind, tokenizer), _peft_config(OPTIONS[variant])).eval()
    want_logits, want_loss = _out(peft_model, batch)
    sd = peft.get_peft_model_state_dict(peft_model)
    model = injected(kind, tokenizer, options=METHOD.options_from_config(peft_model.peft_config["default"].to_dict()))
    METHOD.load_state_dict(model, sd, "default")
    got_logits, got_loss = _out(model, batch)
    assert torch.allclose(got_logits, want_logits, atol=1e-5)
    assert torch.allclose(got_loss, want_loss, atol=1e-5)


@pytest.mark.parametrize("variant", OPTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_tunelab_to_peft(kind, variant, tokenizer, tmp_path):
    """tunelab's artifact (folded prefixes) loads in `PeftModel.from_pretrained`: the same logits and loss."""
    batch = labelled_batch(tokenizer, kind)
    model = injected(kind, tokenizer, options=OPTIONS[variant])
    want_logits, want_loss = _out(model, batch)
    save_file(METHOD.state_dict(model, "default"), tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(METHOD.adapter_config(model, OPTIONS[variant], "default")))
    loaded = peft.PeftModel.from_pretrained(build_tiny(kind, tokenizer), tmp_path).eval()
    got_logits, got_loss = _out(loaded, batch)
    assert torch.allclose(got_logits, want_logits, atol=1e-5)
    assert torch.allclose(got_loss, want_loss, atol=1e-5)


@pytest.mark.parametrize("variant", OPTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_analytic_count(kind, variant, tokenizer):
    """expected_trainable: 2 * layers * n * kv_dim, or the MLP; PEFT trains as many parameters."""
    options = OPTIONS[variant]
    kv_dim, layers, n = (16 if kind == "llama" else 32), 2, 3
    flat = 2 * layers * kv_dim
    want = n * flat if variant == "plain" else n * kv_dim + (kv_dim * 24 + 24) + (24 * flat + flat)
    assert METHOD.expected_trainable(build_tiny(kind, tokenizer), options) == want
    trainable, _ = peft.get_peft_model(build_tiny(kind, tokenizer), _peft_config(options)).get_nb_trainable_parameters()
    assert trainable == want


def test_set_options_select_prefix():
    cfg = build_config({}, {"method": "prefix", "method_options": parse_set(
        ["num_virtual_tokens=10", "prefix_projection=true", "encoder_hidden_size=64"])})
    opts = cfg.method_opts()
    assert (opts.num_virtual_tokens, opts.prefix_projection, opts.encoder_hidden_size) == (10, True, 64)


# --- errors -----------------------------------------------------------------------------------------------

def test_bert_is_refused(tiny_bert):
    with pytest.raises(ConfigError, match="BertForSequenceClassification takes no key/value cache.*'prompt'"):
        METHOD.inject(tiny_bert, PLAIN, "default")
    assert adapter_state(tiny_bert).methods == {}


def test_gradient_checkpointing_is_refused(tokenizer):
    from tunelab.train.activations import enable_gradient_checkpointing

    model = build_tiny("llama", tokenizer)
    enable_gradient_checkpointing(model)
    with pytest.raises(ConfigError, match="gradient checkpointing drops the key/value cache"):
        METHOD.inject(model, PLAIN, "default")
    model = injected("llama", tokenizer)
    enable_gradient_checkpointing(model)  # turned on after inject, as the training loop does
    model.train()
    with pytest.raises(ConfigError, match="gradient checkpointing drops the key/value cache"):
        model(**sample_batch(tokenizer))


def test_folded_adapter_is_for_inference(tokenizer):
    """Prefixes loaded into an adapter with the MLP replace it (PEFT's inference mode): usable, not trainable."""
    model = injected("llama", tokenizer, options=PROJECTED)
    METHOD.load_state_dict(model, METHOD.state_dict(injected("llama", tokenizer, options=PROJECTED), "default"),
                           "default")
    batch = labelled_batch(tokenizer, "llama")
    model.train()
    with torch.no_grad():
        model(**batch)  # evaluation in train mode is fine
    with pytest.raises(ConfigError, match="prefix adapter 'default' holds prefixes loaded from a file.*cannot train"):
        model(**batch)


@pytest.mark.parametrize("values, needle", [
    ({"num_virtual_tokens": -1}, "num_virtual_tokens"),
    ({"encoder_hidden_size": 0}, "encoder_hidden_size"),
    ({"prefix_projection": "maybe"}, "prefix_projection"),
    ({"projection": True}, "did you mean 'prefix_projection'"),
])
def test_bad_options(values, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_model(METHOD.Options, values, where="--set for method 'prefix'")


def test_load_missing_and_wrong_shape(tiny_llama):
    METHOD.inject(tiny_llama, PLAIN, "default")
    with pytest.raises(ArtifactError, match="prefix adapter 'default': missing keys prompt_embeddings"):
        METHOD.load_state_dict(tiny_llama, {}, "default")
    # a GPT-2-shaped prefix (4 kv heads) does not fit Llama's 2 kv heads
    with pytest.raises(ArtifactError, match=r"prompt_embeddings has shape \(3, 128\), the base model needs \(3, 64\)"):
        METHOD.load_state_dict(tiny_llama, {"prompt_embeddings": torch.zeros(3, 128)}, "default")


def test_duplicate_unknown_and_mixed_batches(tiny_gpt2, tokenizer):
    METHOD.inject(tiny_gpt2, PLAIN, "default")
    with pytest.raises(ConfigError, match="already exists"):
        METHOD.inject(tiny_gpt2, PLAIN, "default")
    with pytest.raises(ConfigError, match="no prefix adapter 'other'"):
        METHOD.parameters(tiny_gpt2, "other")
    adapter_state(tiny_gpt2).row_adapters = ["default", None]
    with pytest.raises(ConfigError, match="cannot serve mixed-adapter batches"):
        tiny_gpt2(**sample_batch(tokenizer))
