"""Parity with HF PEFT both ways: tunelab LoRA artifacts load in `PeftModel.from_pretrained` with the same logits,
and LoRA adapters saved by PEFT load in tunelab with the same logits (Llama, GPT-2's Conv1D, BERT with its head)."""

from __future__ import annotations

import json

import pytest
import torch
from builders import build_tiny
from test_artifacts import LORA, logits, lora_model, randomize

from tunelab.artifacts import load_adapter, save_artifact

# (kind, tunelab options, the same adapter as a PEFT LoraConfig)
CASES = [
    pytest.param("llama", {}, {}, id="llama-default"),
    pytest.param("llama", {"rslora": True, "r": 4, "alpha": 8}, {"use_rslora": True, "r": 4, "lora_alpha": 8},
                 id="llama-rslora"),
    pytest.param("llama", {"target_modules": "all-linear"}, {"target_modules": "all-linear"}, id="llama-all-linear"),
    pytest.param("llama", {"target_modules": r".*layers\.1\.mlp\.(up|down)_proj"},
                 {"target_modules": r".*layers\.1\.mlp\.(up|down)_proj"}, id="llama-regex"),
    pytest.param("gpt2", {}, {}, id="gpt2-conv1d"),
    pytest.param("gpt2", {"rslora": True}, {"use_rslora": True}, id="gpt2-rslora"),
    pytest.param("bert", {}, {"task_type": "SEQ_CLS"}, id="bert-classification"),
    pytest.param("bert", {"rslora": True, "target_modules": "all-linear"},
                 {"task_type": "SEQ_CLS", "use_rslora": True, "target_modules": "all-linear"}, id="bert-all-linear"),
    # the PEFT options of issue 17: each module's rank and alpha, the blocks adapted, the modules left out
    *[pytest.param(kind, options, {**extra, **options}, id=name) for name, kind, extra, options in [
        ("llama-rank-alpha-pattern", "llama", {}, {
            "r": 4, "alpha": 8, "target_modules": "all-linear",
            "rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6, "mlp.up_proj": 3},
            "alpha_pattern": {"v_proj": 4, r"layers\.0\.mlp\..*_proj": 32}}),  # patterns must not overlap:
        # the first match wins, and JSON writers (PEFT's and tunelab's) may reorder the keys
        ("llama-rank-pattern-rslora", "llama", {}, {"rank_pattern": {"v_proj": 2}, "rslora": True}),
        ("gpt2-rank-pattern", "gpt2", {}, {"target_modules": ["c_attn", "c_fc"], "rank_pattern": {"c_fc": 2},
                                           "alpha_pattern": {r"h\.1\.attn\.c_attn": 2}}),
        ("bert-rank-pattern", "bert", {"task_type": "SEQ_CLS"}, {"rank_pattern": {"query": 2}}),
        ("llama-layers", "llama", {}, {"target_modules": ["q_proj", "o_proj", "up_proj"], "layers_to_transform": [1]}),
        ("llama-layers-pattern", "llama", {}, {"layers_to_transform": 0, "layers_pattern": "layers"}),
        ("gpt2-layers-pattern", "gpt2", {}, {"target_modules": ["c_attn", "c_proj"], "layers_to_transform": [1],
                                             "layers_pattern": ["h"]}),
        ("llama-exclude-list", "llama", {}, {"target_modules": "all-linear",
                                             "exclude_modules": ["down_proj", "layers.0.self_attn.q_proj"]}),
        ("llama-exclude-regex", "llama", {}, {"target_modules": "all-linear", "exclude_modules": r".*\.mlp\..*"}),
        ("bert-exclude-layers", "bert", {"task_type": "SEQ_CLS"}, {
            "target_modules": ["query", "key", "value"], "exclude_modules": ["key"], "layers_to_transform": [0]}),
        # whole modules trained and saved with the adapter; gpt2 ties lm_head to wte (each copy trains apart)
        ("llama-modules-to-save", "llama", {}, {"modules_to_save": ["lm_head", "embed_tokens"]}),
        ("gpt2-tied-lm-head", "gpt2", {}, {"modules_to_save": ["lm_head"]}),
        ("gpt2-tied-both", "gpt2", {}, {"modules_to_save": ["wte", "lm_head"], "target_modules": "all-linear"}),
        ("bert-modules-to-save", "bert", {"task_type": "SEQ_CLS"}, {"modules_to_save": ["word_embeddings"]}),
        # LoRA on embedding layers (PEFT's lora_embedding_A/B); gpt2's wte is tied to its lm_head
        ("llama-embedding", "llama", {}, {"target_modules": ["q_proj", "embed_tokens"]}),
        ("llama-embedding-patterns", "llama", {}, {"target_modules": ["embed_tokens", "v_proj"], "rslora": True,
                                                   "rank_pattern": {"embed_tokens": 2}, "alpha_pattern": {
                                                       "embed_tokens": 4}}),
        ("gpt2-embedding-tied", "gpt2", {}, {"target_modules": ["c_attn", "wte"]}),
        ("bert-embedding", "bert", {"task_type": "SEQ_CLS"}, {"target_modules": r".*(word_embeddings|query)"}),
    ]],
]


def to_peft(options: dict) -> dict:
    """tunelab's option names as PEFT's LoraConfig names them."""
    names = {"alpha": "lora_alpha", "rslora": "use_rslora", "dropout": "lora_dropout"}
    return {names.get(k, k): v for k, v in options.items()}


def peft_default_targets(kind):
    return {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}[kind]


@pytest.mark.parametrize("kind, ours, _", CASES)
def test_tunelab_artifact_loads_in_peft(kind, ours, _, tokenizer, tmp_path):
    from peft import PeftModel

    model = lora_model(kind, tokenizer, seed=1, **ours)
    want = logits(model, tokenizer=tokenizer)
    save_artifact(model, tokenizer, "default", tmp_path / "a")
    peft_model = PeftModel.from_pretrained(build_tiny(kind, tokenizer), tmp_path / "a").eval()
    theirs = {n for n, _ in peft_model.named_parameters() if ".lora_A." in n or ".lora_embedding_A." in n}
    assert len(theirs) == len([k for k in LORA.state_dict(model, "default") if ".lora_A." in k or "embedding_A" in k])
    assert torch.allclose(logits(peft_model, tokenizer=tokenizer), want, atol=1e-5)


@pytest.mark.parametrize("kind, _, peft_options", CASES)
def test_peft_adapter_loads_in_tunelab(kind, _, peft_options, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    options = {"target_modules": peft_default_targets(kind), **to_peft(peft_options)}
    peft_model = get_peft_model(build_tiny(kind, tokenizer), LoraConfig(**options))
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}  # lora A/B (+ the head copy)
    randomize(trainable, seed=2)
    peft_model.eval()
    want = logits(peft_model, tokenizer=tokenizer)
    peft_model.save_pretrained(tmp_path / "peft")
    model = build_tiny(kind, tokenizer)
    load_adapter(model, tmp_path / "peft")
    ours = LORA.parameters(model, "default")
    assert sum(p.numel() for p in ours.values()) == sum(p.numel() for p in trainable.values())
    assert torch.allclose(logits(model, tokenizer=tokenizer), want, atol=1e-5)


def test_peft_classification_head_is_loaded_not_the_base_head(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(build_tiny("bert", tokenizer), LoraConfig(task_type="SEQ_CLS",
                                                                          target_modules=["query"]))
    head = peft_model.base_model.model.classifier.modules_to_save["default"]
    randomize(dict(head.named_parameters()), seed=3, std=1.0)
    peft_model.save_pretrained(tmp_path / "peft")
    model = build_tiny("bert", tokenizer)
    base_head = model.classifier.weight.detach().clone()
    load_adapter(model, tmp_path / "peft")
    assert torch.equal(model.classifier.modules_to_save["default"].weight, head.weight.detach())
    assert torch.equal(model.classifier.weight, base_head)  # the base head is untouched


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_loaded_adapter_follows_the_model_mode(mode, tokenizer, tmp_path):
    """A PEFT LoRA with dropout loads into a model in eval mode with its dropout off (and on in train mode)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(build_tiny("llama", tokenizer), LoraConfig(lora_dropout=0.05, r=4,
                                                                           target_modules="all-linear"))
    randomize({n: p for n, p in peft_model.named_parameters() if p.requires_grad}, seed=4, std=0.5)
    want = logits(peft_model.eval(), tokenizer=tokenizer)
    peft_model.save_pretrained(tmp_path / "peft")
    model = getattr(build_tiny("llama", tokenizer), mode)()
    load_adapter(model, tmp_path / "peft")
    dropouts = [m for n, m in model.named_modules() if ".lora_dropout." in n]
    assert dropouts and all(m.training == (mode == "train") for m in dropouts)
    assert torch.allclose(logits(model.eval(), tokenizer=tokenizer), want, atol=1e-5)


def test_inject_follows_the_model_mode(tokenizer):
    model = build_tiny("llama", tokenizer).eval()
    LORA.inject(model, LORA.Options(dropout=0.1), "default")
    assert not any(m.training for m in model.modules())
    model.train()
    LORA.inject(model, LORA.Options(dropout=0.1), "second")
    assert all(m.training for m in model.modules())


def test_artifact_opens_with_peft_auto_class_offline(tiny_dirs, tokenizer, tmp_path, monkeypatch):
    """`base_model_name_or_path` is the alias's local dir (PEFT would look an alias up on the hub); the sidecar
    keeps the alias, and `inspect` reports it."""
    import tunelab.artifacts.peft_format as peft_format
    from peft import AutoPeftModelForCausalLM

    from tunelab.artifacts import inspect

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(peft_format, "MODEL_ALIASES", {"tiny-llama": None})
    monkeypatch.setattr(peft_format, "resolve_alias", lambda name: tiny_dirs["llama"])
    model = lora_model("llama", tokenizer, seed=5, r=4)
    save_artifact(model, tokenizer, "default", tmp_path / "a", base_model="tiny-llama")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_dirs["llama"].resolve())
    assert json.loads((tmp_path / "a" / "tunelab.json").read_text())["base_model"] == "tiny-llama"
    assert inspect(tmp_path / "a").base_model == "tiny-llama"
    peft_model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    assert torch.allclose(logits(peft_model, tokenizer=tokenizer), logits(model, tokenizer=tokenizer), atol=1e-5)


def test_relative_base_dir_is_written_absolute(tiny_dirs, tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_dirs["llama"].parent)
    model = build_tiny("llama", tokenizer)
    LORA.inject(model, LORA.Options(r=4), "default")
    save_artifact(model, tokenizer, "default", tmp_path / "a", base_model=tiny_dirs["llama"].name)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_dirs["llama"].resolve())
