"""LoRA on embedding layers (`target_modules` naming an `nn.Embedding`), PEFT's lora_embedding_A/B layout: the
contract matrix on those targets, PEFT's init, merging (refused on tied embeddings), and a CLI run. PEFT parity
both ways is in tests/artifacts/test_peft_parity.py (the `*-embedding*` cases); `modules_to_save` shares the
matrix here."""

from __future__ import annotations

import pytest
import torch
from _matrix import ALL_CHECKS, check_bf16_base, check_merge, logits, perturb, run_cli
from builders import build_tiny, sample_batch
from safetensors.torch import load_file

from tunelab.errors import ConfigError
from tunelab.methods import get_method
from tunelab.methods.base import adapter_state

LORA = get_method("lora")
EMBEDDINGS = {"llama": "embed_tokens", "gpt2": "wte", "bert": "word_embeddings"}
PARTNER = {"llama": "q_proj", "gpt2": "c_attn", "bert": "query"}

MATRIX = [pytest.param("lora", kind, {"target_modules": [PARTNER[kind], EMBEDDINGS[kind]], "r": 4},
                       id=f"lora-embedding-{kind}") for kind in EMBEDDINGS]
MATRIX += [pytest.param(method, kind, {"modules_to_save": [EMBEDDINGS[kind]] + (["lm_head"] if kind != "bert" else [])},
                        id=f"{method}-modules-to-save-{kind}") for method in ("lora", "ia3") for kind in EMBEDDINGS]


@pytest.mark.parametrize("check", ALL_CHECKS + (check_bf16_base,), ids=lambda c: c.__name__)
@pytest.mark.parametrize("method_name, kind, options", MATRIX)
def test_contract_matrix(check, method_name, kind, options, tokenizer):
    check(kind, tokenizer, method_name, get_method(method_name).Options(**options))


@pytest.mark.parametrize("method_name, kind, options", [p for p in MATRIX if "gpt2" not in p.id])  # gpt2 is tied
def test_merge_equals_unmerged(method_name, kind, options, tokenizer):
    check_merge(kind, tokenizer, method_name, get_method(method_name).Options(**options))


def test_init_is_peft_s_zero_a_normal_b(tokenizer):
    model = build_tiny("llama", tokenizer)
    torch.manual_seed(0)
    LORA.inject(model, LORA.Options(r=4, target_modules=["embed_tokens"], dropout=0.2), "default")
    emb = model.model.embed_tokens
    a, b = emb.lora_embedding_A["default"], emb.lora_embedding_B["default"]
    assert a.shape == (4, emb.num_embeddings) and b.shape == (emb.embedding_dim, 4)
    assert torch.equal(a.detach(), torch.zeros_like(a)) and 0.5 < float(b.detach().std()) < 1.5
    assert a.dtype == b.dtype == torch.float32
    LORA.remove(model, "default")
    assert not hasattr(emb, "lora_embedding_A") and not emb._forward_hooks


def test_padding_index_gets_no_gradient(tokenizer):
    """As the embedding's own padding row, A's padding column (looked up like it) never trains."""
    model = build_tiny("llama", tokenizer)
    emb = model.model.embed_tokens
    emb.padding_idx = pad = tokenizer.pad_token_id
    LORA.inject(model, LORA.Options(target_modules=["embed_tokens"]), "default")
    perturb(LORA, model, "default", seed=3)
    emb(torch.tensor([[pad, 5, pad]])).sum().backward()
    grad = emb.lora_embedding_A["default"].grad  # (r, num_embeddings)
    assert torch.equal(grad[:, pad], torch.zeros_like(grad[:, pad])) and grad[:, 5].abs().sum() > 0


def test_tied_embedding_refuses_to_merge(tokenizer):
    model = build_tiny("gpt2", tokenizer)
    LORA.inject(model, LORA.Options(target_modules=["c_attn", "wte"]), "default")
    perturb(LORA, model, "default", seed=4)
    want = logits(model, sample_batch(tokenizer))
    with pytest.raises(ConfigError, match=r"module transformer\.wte: its weight is tied to lm_head\.weight"):
        LORA.merge(model, "default")
    assert not adapter_state(model).merged and not model.transformer.h[0].attn.c_attn.lora_merged
    assert torch.equal(logits(model, sample_batch(tokenizer)), want)


def test_cli_trains_an_embedding_lora(tiny_dirs, instruction_jsonl, tmp_path):
    run_cli(tiny_dirs, instruction_jsonl, tmp_path / "run", "lora", "target_modules=[q_proj,embed_tokens]")
    keys = set(load_file(tmp_path / "run" / "artifact" / "adapter_model.safetensors"))
    assert {"base_model.model.model.embed_tokens.lora_embedding_A",
            "base_model.model.model.embed_tokens.lora_embedding_B"} <= keys


def test_peft_saved_embedding_weights_must_be_the_base_s(tokenizer):
    """PEFT saves the embedding beside an embedding LoRA (`base_layer.weight`): the base's is accepted, another
    (a resized or trained vocabulary) refused in words, before anything changes."""
    from tunelab.errors import ArtifactError

    model = build_tiny("llama", tokenizer)
    LORA.inject(model, LORA.Options(target_modules=["embed_tokens"]), "default")
    perturb(LORA, model, "default", seed=5)
    sd = LORA.state_dict(model, "default")
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    LORA.load_state_dict(model, {**sd, key: model.model.embed_tokens.weight.detach().clone()}, "default")
    with pytest.raises(ArtifactError, match=f"{key}: the adapter carries embedding weights .* differ"):
        LORA.load_state_dict(model, {**{k: v + 1 for k, v in sd.items()},
                                     key: model.model.embed_tokens.weight.detach() + 1}, "default")
    assert all(torch.equal(v, sd[k]) for k, v in LORA.state_dict(model, "default").items())


@pytest.mark.parametrize("method, options", [
    ("lora", {"target_modules": ["q_proj", "embed_tokens"], "rank_pattern": {"embed_tokens": 2}}),
    ("lora", {"target_modules": ["embed_tokens"], "modules_to_save": ["lm_head"]}),
    ("ia3", {"modules_to_save": ["embed_tokens", "lm_head"]})])
def test_planner_counts_embedding_lora_and_saved_modules(method, options, tiny_dirs, tokenizer):
    from tunelab.measure.plan import plan

    m = get_method(method)
    model = build_tiny("llama", tokenizer)
    m.inject(model, m.Options(**options), "default")
    real = sum(p.numel() for p in m.parameters(model, "default").values())
    planned = plan(tiny_dirs["llama"], batch_size=1, seq_len=8, methods=[method], method_options=options)
    assert planned.strategies[0].params_trainable == real
