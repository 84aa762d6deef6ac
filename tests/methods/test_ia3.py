"""ia3: the method matrix on tiny Llama, GPT-2 and BERT, parity with HF PEFT's IA3 both ways, and errors."""

from __future__ import annotations

import json

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
from safetensors.torch import load_file, save_file

from tunelab.config import build_config, parse_set
from tunelab.errors import ConfigError
from tunelab.methods import get_method
from tunelab.methods.base import set_active

peft = pytest.importorskip("peft")  # the reference implementation (a test dependency)
METHOD = get_method("ia3")
DEFAULT = METHOD.Options()

# Module paths ia3 touches by default in the tiny models (layer 0), with the vector shape PEFT uses.
EXPECTED_LAYER0 = {
    "llama": {"model.layers.0.self_attn.k_proj": (16, 1), "model.layers.0.self_attn.v_proj": (16, 1),
              "model.layers.0.mlp.down_proj": (1, 64)},
    "gpt2": {"transformer.h.0.attn.c_attn": (96, 1), "transformer.h.0.mlp.c_proj": (1, 128)},
    "bert": {"bert.encoder.layer.0.attention.self.key": (32, 1), "bert.encoder.layer.0.attention.self.value": (32, 1),
             "bert.encoder.layer.0.attention.output.dense": (1, 32), "bert.encoder.layer.0.output.dense": (1, 64)},
}


@pytest.mark.parametrize("check", ALL_CHECKS + (check_merge,), ids=lambda c: c.__name__)
@pytest.mark.parametrize("kind", KINDS)
def test_matrix(kind, check, tokenizer):
    check(kind, tokenizer, "ia3", DEFAULT)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_base(kind, tokenizer):
    check_bf16_base(kind, tokenizer, "ia3", DEFAULT)


@pytest.mark.parametrize("kind", KINDS)
def test_default_targets_and_shapes(kind, tokenizer):
    model = build_tiny(kind, tokenizer)
    touched = METHOD.inject(model, DEFAULT, "default")
    assert len(touched) == 2 * len(EXPECTED_LAYER0[kind]) + (kind == "bert")  # BERT: + its classifier head
    vectors = {k.removesuffix(".ia3_l.default"): p for k, p in METHOD.parameters(model, "default").items()
               if ".ia3_l." in k}
    assert {k: tuple(v.shape) for k, v in vectors.items() if ".0." in k} == EXPECTED_LAYER0[kind]
    assert all(torch.equal(p, torch.ones_like(p)) for p in vectors.values())


def _peft_model(kind, tokenizer, seed=None):
    """PEFT's IA3 with its defaults (and, for BERT, the classifier in modules_to_save); seeded random weights."""
    task_type = "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"
    peft_model = peft.get_peft_model(build_tiny(kind, tokenizer), peft.IA3Config(task_type=task_type))
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "ia3_l" in n:
                    p.copy_(0.5 + torch.rand(p.shape, generator=gen))  # in [0.5, 1.5): non-trivial scalings
                elif "modules_to_save" in n:
                    p.add_(0.2 * torch.randn(p.shape, generator=gen))  # a trained classification head
    return peft_model.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_peft_to_tunelab(kind, tokenizer):
    """An adapter made and saved by PEFT loads into tunelab (options from its config) with the same logits."""
    batch = labelled_batch(tokenizer, kind)
    peft_model = _peft_model(kind, tokenizer, seed=7)
    want = outputs(peft_model, batch)
    sd = peft.get_peft_model_state_dict(peft_model)
    config = peft_model.peft_config["default"].to_dict()

    model = build_tiny(kind, tokenizer)
    METHOD.inject(model, METHOD.options_from_config(config), "default")
    assert set(METHOD.state_dict(model, "default")) == set(sd)
    METHOD.load_state_dict(model, sd, "default")
    set_active(model, ["default"])
    assert torch.allclose(outputs(model, batch), want, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_tunelab_to_peft(kind, tokenizer, tmp_path):
    """An adapter saved by tunelab (config + safetensors) loads in `PeftModel.from_pretrained` with the same logits."""
    batch = labelled_batch(tokenizer, kind)
    model = build_tiny(kind, tokenizer)
    METHOD.inject(model, DEFAULT, "default")
    perturb(METHOD, model, "default", seed=8, scale=0.3)
    set_active(model, ["default"])
    want = outputs(model, batch)
    save_file(METHOD.state_dict(model, "default"), tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(METHOD.adapter_config(model, DEFAULT, "default")))

    loaded = peft.PeftModel.from_pretrained(build_tiny(kind, tokenizer), tmp_path).eval()
    assert torch.allclose(outputs(loaded, batch), want, atol=1e-5)
    head = {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} if kind == "bert" else set()
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys - head and all(k.endswith(".ia3_l") for k in keys - head) and head <= keys


@pytest.mark.parametrize("kind", KINDS)
def test_merge_matches_peft_merge(kind, tokenizer):
    """tunelab's merge folds the vectors into the same weights as PEFT's merge_and_unload."""
    peft_model = _peft_model(kind, tokenizer, seed=9)
    sd = peft.get_peft_model_state_dict(peft_model)
    merged_peft = peft_model.merge_and_unload()
    model = build_tiny(kind, tokenizer)
    METHOD.inject(model, DEFAULT, "default")
    METHOD.load_state_dict(model, sd, "default")
    METHOD.merge(model, "default")
    METHOD.remove(model, "default")
    theirs = merged_peft.state_dict()
    for key, value in model.state_dict().items():
        assert torch.allclose(value, theirs[key], atol=1e-6), key


def test_set_options_select_ia3():
    cfg = build_config({}, {"method": "ia3", "method_options": parse_set(
        ["target_modules=[k_proj,down_proj]", "feedforward_modules=[down_proj]"])})
    opts = cfg.method_opts()
    assert opts.target_modules == ["k_proj", "down_proj"] and opts.feedforward_modules == ["down_proj"]


@pytest.mark.parametrize("pairs, needle", [
    (["target_module=[k_proj]"], "target_modules"),  # unknown key suggests the closest one
    (["target_modules=[k_proj]", "feedforward_modules=[down_proj]"], "subset"),
    (["feedforward_modules=3"], "feedforward_modules"),
])
def test_bad_options(pairs, needle):
    with pytest.raises(ConfigError, match=needle):
        build_config({}, {"method": "ia3", "method_options": parse_set(pairs)})


def test_targets_matching_nothing(tiny_llama):
    with pytest.raises(ConfigError, match=r"nope.*matched no module.*k_proj"):
        METHOD.inject(tiny_llama, METHOD.Options(target_modules=["nope"], feedforward_modules=[]), "default")


def test_unknown_architecture_needs_targets(tiny_llama):
    tiny_llama.config.model_type = "mystery"
    with pytest.raises(ConfigError, match="no default target_modules for model type 'mystery'"):
        METHOD.inject(tiny_llama, DEFAULT, "default")


def test_duplicate_name_and_unknown_adapter(tiny_llama):
    METHOD.inject(tiny_llama, DEFAULT, "default")
    with pytest.raises(ConfigError, match="already exists"):
        METHOD.inject(tiny_llama, DEFAULT, "default")
    with pytest.raises(ConfigError, match="no ia3 adapter named 'other'"):
        METHOD.merge(tiny_llama, "other")


def test_load_missing_keys_and_wrong_shapes(tiny_gpt2):
    METHOD.inject(tiny_gpt2, DEFAULT, "default")
    check_load_errors(METHOD, tiny_gpt2, "base_model.model.transformer.h.1.attn.c_attn.ia3_l", (1, 96))


def test_merge_twice_and_unmerge_unmerged(tiny_llama):
    METHOD.inject(tiny_llama, DEFAULT, "default")
    with pytest.raises(ConfigError, match="not merged"):
        METHOD.unmerge(tiny_llama, "default")
    METHOD.merge(tiny_llama, "default")
    with pytest.raises(ConfigError, match="already merged"):
        METHOD.merge(tiny_llama, "default")
