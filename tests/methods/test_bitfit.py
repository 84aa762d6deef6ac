"""bitfit: the method matrix on tiny Llama (include_norms), GPT-2 and BERT, the no-bias error, and errors."""

from __future__ import annotations

import pytest
import torch
from _matrix import (
    ALL_CHECKS,
    KINDS,
    check_bf16_base,
    check_load_errors,
    check_merge,
    labelled_batch,
    outputs,
    perturb,
)
from conftest import build_tiny

from tunelab.config import build_config, parse_set
from tunelab.errors import ConfigError
from tunelab.methods import get_method
from tunelab.methods.base import disabled

METHOD = get_method("bitfit")
# Llama has no biases at all: it needs include_norms (its RMSNorm weights train, as deltas).
OPTIONS = {"llama": METHOD.Options(include_norms=True), "gpt2": METHOD.Options(), "bert": METHOD.Options()}


@pytest.mark.parametrize("check", ALL_CHECKS + (check_merge,), ids=lambda c: c.__name__)
@pytest.mark.parametrize("kind", KINDS)
def test_matrix(kind, check, tokenizer):
    check(kind, tokenizer, "bitfit", OPTIONS[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_base(kind, tokenizer):
    check_bf16_base(kind, tokenizer, "bitfit", OPTIONS[kind])


def test_llama_without_biases_says_how(tiny_llama):
    with pytest.raises(ConfigError, match=r"no bias terms.*--set include_norms=true"):
        METHOD.inject(tiny_llama, METHOD.Options(), "default")


def test_llama_include_norms_trains_norm_weights(tiny_llama):
    touched = METHOD.inject(tiny_llama, METHOD.Options(include_norms=True), "default")
    assert touched == ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                       "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm"]
    assert set(METHOD.state_dict(tiny_llama, "default")) == {f"base_model.model.{p}.bitfit_weight" for p in touched}


def test_gpt2_trains_every_bias_but_the_head(tiny_gpt2):
    """Every Conv1D and LayerNorm bias gets a zero delta of the bias's shape; the LM head has no bias."""
    METHOD.inject(tiny_gpt2, METHOD.Options(), "default")
    params = METHOD.parameters(tiny_gpt2, "default")
    biases = {n: p for n, p in tiny_gpt2.named_parameters() if n.endswith(".bias") and "bitfit" not in n}
    assert {n.removesuffix(".bitfit_bias.default") + ".bias" for n in params} == set(biases)
    assert all(torch.equal(p, torch.zeros_like(biases[n.removesuffix(".bitfit_bias.default") + ".bias"]))
               for n, p in params.items())


def test_bert_trains_the_classifier_as_a_head_copy(tiny_bert):
    """The classifier trains in full through its per-adapter copy (PEFT's modules_to_save), not as a bias delta."""
    touched = METHOD.inject(tiny_bert, METHOD.Options(), "default")
    assert {"classifier", "bert.pooler.dense", "bert.embeddings.LayerNorm"} <= set(touched)
    params = METHOD.parameters(tiny_bert, "default")
    assert {"classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias"} <= set(params)
    assert not [n for n in params if n.startswith("classifier.bitfit")]


def test_include_norms_adds_norm_weights_on_gpt2(tokenizer):
    plain, norms = build_tiny("gpt2", tokenizer), build_tiny("gpt2", tokenizer)
    METHOD.inject(plain, METHOD.Options(), "default")
    METHOD.inject(norms, METHOD.Options(include_norms=True), "default")
    extra = set(METHOD.state_dict(norms, "default")) - set(METHOD.state_dict(plain, "default"))
    assert extra and all(k.endswith(("ln_1.bitfit_weight", "ln_2.bitfit_weight", "ln_f.bitfit_weight")) for k in extra)
    assert len(extra) == 5


def test_merge_writes_trained_biases_into_base(tiny_gpt2, tokenizer):
    """After merge the base bias equals base + delta: the trained bias replaces the base one."""
    before = tiny_gpt2.transformer.h[0].mlp.c_fc.bias.detach().clone()
    METHOD.inject(tiny_gpt2, METHOD.Options(), "default")
    perturb(METHOD, tiny_gpt2, "default", seed=1)
    delta = tiny_gpt2.transformer.h[0].mlp.c_fc.bitfit_bias["default"].detach().clone()
    METHOD.merge(tiny_gpt2, "default")
    assert torch.allclose(tiny_gpt2.transformer.h[0].mlp.c_fc.bias, before + delta)


def test_target_modules_filter(tiny_bert, tokenizer):
    touched = METHOD.inject(tiny_bert, METHOD.Options(target_modules=["query", "value"]), "default")
    assert len(touched) == 5 and all(p.endswith((".query", ".value")) for p in touched[:4])
    head = 3 * 32 + 3  # the classifier copy: (3, 32) weight and (3,) bias
    only_query = METHOD.Options(target_modules=["query"])
    assert METHOD.expected_trainable(build_tiny("bert", tokenizer), only_query) == 64 + head
    batch = labelled_batch(tokenizer, "bert")
    perturb(METHOD, tiny_bert, "default", seed=2)
    with disabled(tiny_bert):
        base = outputs(tiny_bert, batch)
    assert not torch.allclose(outputs(tiny_bert, batch), base, atol=1e-4)


def test_target_modules_matching_nothing(tiny_gpt2):
    with pytest.raises(ConfigError, match=r"target_modules \['nope'\] matched no linear or norm layer.*c_attn"):
        METHOD.inject(tiny_gpt2, METHOD.Options(target_modules=["nope"]), "default")


def test_set_options_select_bitfit():
    cfg = build_config({}, {"method": "bitfit", "method_options": parse_set(["include_norms=true"])})
    assert cfg.method_opts().include_norms is True


@pytest.mark.parametrize("pairs, needle", [
    (["include_norm=true"], "include_norms"),  # unknown key suggests the closest one
    (["include_norms=maybe"], "include_norms"),
])
def test_bad_options(pairs, needle):
    with pytest.raises(ConfigError, match=needle):
        build_config({}, {"method": "bitfit", "method_options": parse_set(pairs)})


def test_adapter_config_is_not_peft(tiny_gpt2):
    METHOD.inject(tiny_gpt2, METHOD.Options(include_norms=True), "default")
    cfg = METHOD.adapter_config(tiny_gpt2, METHOD.Options(include_norms=True), "default")
    assert cfg["peft_type"] == "BITFIT" and cfg["include_norms"] is True
    assert METHOD.options_from_config(cfg) == METHOD.Options(include_norms=True)
    assert METHOD.peft_loadable is False


def test_load_missing_keys_and_wrong_shapes(tiny_bert):
    METHOD.inject(tiny_bert, METHOD.Options(), "default")
    check_load_errors(METHOD, tiny_bert, "base_model.model.bert.encoder.layer.1.intermediate.dense.bitfit_bias", (32,))
