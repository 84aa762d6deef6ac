"""`modules_to_save` (PEFT's option): whole modules such as `lm_head` / `embed_tokens` trained and saved with an
adapter of the LoRA family or IA3, in PEFT's key layout; PEFT parity both ways (lora's cases are in
tests/artifacts/test_peft_parity.py); tied embeddings train apart, as PEFT, and refuse to merge."""

from __future__ import annotations

import json

import pytest
import torch
from builders import build_tiny, sample_batch
from safetensors.torch import load_file

from tunelab.artifacts import load_adapter, save_artifact
from tunelab.errors import ConfigError
from tunelab.methods import get_method
from tunelab.methods.base import adapter_state
from tunelab.models import load_model

PEFT_CONFIGS = {  # method -> (tunelab options, the same adapter as PEFT's config class and fields)
    "dora": ({"r": 4, "target_modules": ["q_proj", "v_proj"]},
             ("LoraConfig", {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "use_dora": True})),
    "ia3": ({}, ("IA3Config", {"target_modules": ["k_proj", "v_proj", "down_proj"],
                               "feedforward_modules": ["down_proj"]})),
}


def logits(model, tokenizer) -> torch.Tensor:
    batch = sample_batch(tokenizer)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def randomize(params: dict, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)  # IA3's vectors start at one, LoRA's B at zero


def adapted(method: str, kind: str, tokenizer, modules, seed=1, **options):
    model = build_tiny(kind, tokenizer)
    m = get_method(method)
    m.inject(model, m.Options(**{**PEFT_CONFIGS.get(method, ({}, None))[0], **options}, modules_to_save=modules),
             "default")
    randomize(m.parameters(model, "default"), seed)
    return model


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_tunelab_artifact_loads_in_peft(method, tokenizer, tmp_path):
    from peft import PeftModel

    model = adapted(method, "llama", tokenizer, ["lm_head", "embed_tokens"])
    want = logits(model, tokenizer)
    save_artifact(model, tokenizer, "default", tmp_path / "a")
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"} <= keys
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head", "embed_tokens"]
    theirs = PeftModel.from_pretrained(build_tiny("llama", tokenizer), tmp_path / "a").eval()
    assert torch.allclose(logits(theirs, tokenizer), want, atol=1e-5)


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_peft_adapter_loads_in_tunelab(method, tokenizer, tmp_path):
    import peft

    config_class, fields = PEFT_CONFIGS[method][1]
    config = getattr(peft, config_class)(**fields, modules_to_save=["lm_head", "embed_tokens"])
    peft_model = peft.get_peft_model(build_tiny("llama", tokenizer), config)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any(".modules_to_save.default." in n for n in trainable)
    randomize(trainable, seed=2)
    peft_model.eval()
    want = logits(peft_model, tokenizer)
    peft_model.save_pretrained(tmp_path / "peft")
    model = build_tiny("llama", tokenizer)
    load_adapter(model, tmp_path / "peft")
    ours = get_method(method).parameters(model, "default")
    assert sum(p.numel() for p in ours.values()) == sum(p.numel() for p in trainable.values())
    assert torch.allclose(logits(model, tokenizer), want, atol=1e-5)


def test_copies_train_the_base_stays_and_counts_match(tokenizer):
    model = build_tiny("llama", tokenizer)
    lora = get_method("lora")
    options = lora.Options(r=2, modules_to_save=["lm_head", "embed_tokens"])
    expected = lora.expected_trainable(model, options)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    touched = lora.inject(model, options, "default")
    assert touched[-2:] == ["model.embed_tokens", "lm_head"]
    params = lora.parameters(model, "default")
    assert sum(p.numel() for p in params.values()) == expected
    assert {p for p in model.parameters() if p.requires_grad} == set(params.values())
    batch = sample_batch(tokenizer)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    for _ in range(3):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    copy = model.lm_head.modules_to_save["default"].weight
    assert not torch.equal(copy, base["lm_head.weight"])  # the copy trained
    assert not torch.equal(model.model.embed_tokens.modules_to_save["default"].weight,
                           base["model.embed_tokens.weight"])
    for key, value in base.items():  # the base modules' own weights did not
        assert torch.equal(model.state_dict()[key], value), key


def test_merge_writes_the_copies_into_an_untied_base(tokenizer):
    lora = get_method("lora")
    model = adapted("lora", "llama", tokenizer, ["lm_head"])
    want = logits(model, tokenizer)
    trained = model.lm_head.modules_to_save["default"].weight.detach().clone()
    lora.merge(model, "default")
    lora.remove(model, "default")
    assert not hasattr(model.lm_head, "modules_to_save")
    assert torch.equal(model.lm_head.weight, trained)
    assert torch.allclose(logits(model, tokenizer), want, atol=1e-5)


def test_tied_embeddings_train_apart_and_refuse_to_merge(tokenizer):
    lora = get_method("lora")
    model = adapted("lora", "gpt2", tokenizer, ["lm_head"])
    assert model.lm_head.weight is model.transformer.wte.weight  # the base stays tied
    assert model.lm_head.modules_to_save["default"].weight is not model.transformer.wte.weight
    want = logits(model, tokenizer)
    with pytest.raises(ConfigError, match=r"module lm_head: .*tied to transformer\.wte\.weight .*unmerged"):
        lora.merge(model, "default")
    assert not adapter_state(model).merged  # refused before anything changed
    assert torch.equal(logits(model, tokenizer), want)


def test_modules_to_save_errors(tokenizer):
    lora = get_method("lora")
    model = build_tiny("llama", tokenizer)
    with pytest.raises(ConfigError, match=r"modules_to_save: 'lm_haed' matches no module; .*lm_head"):
        lora.inject(model, lora.Options(modules_to_save=["lm_haed"]), "default")
    assert not adapter_state(model).methods and not any("lora_A" in n for n, _ in model.named_modules())
    for targets, saved in ((["q_proj", "lm_head"], ["lm_head"]), (["q_proj", "embed_tokens"], ["embed_tokens"])):
        with pytest.raises(ConfigError, match="leave it out of target_modules"):
            lora.inject(model, lora.Options(target_modules=targets, modules_to_save=saved), "x")
        assert not adapter_state(model).methods
    ia3 = get_method("ia3")
    with pytest.raises(ConfigError, match="model.layers.0.mlp.down_proj: .*leave it out of target_modules"):
        ia3.inject(model, ia3.Options(modules_to_save=["down_proj"]), "x")
    with pytest.raises(ConfigError, match="modules_to_save"):  # prompt learning has no such option in PEFT
        get_method("prompt").options_from_config({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2,
                                                  "modules_to_save": ["lm_head"]})


def test_cli_option_trains_and_saves_the_lm_head(tiny_dirs, instruction_jsonl, tmp_path):
    from tunelab.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_dirs["llama"]), "--data", str(instruction_jsonl), "--max-steps", "2",
                 "--set", "modules_to_save=[lm_head]", "--output", str(out), "--quiet"]) == 0
    keys = set(load_file(out / "artifact" / "adapter_model.safetensors"))
    assert "base_model.model.lm_head.weight" in keys
    summary = json.loads((out / "run.json").read_text())
    lora, base = get_method("lora"), load_model(str(tiny_dirs["llama"]), dtype="float32", device="cpu").model
    assert summary["params_trainable"] == lora.expected_trainable(base, lora.Options(modules_to_save=["lm_head"]))
