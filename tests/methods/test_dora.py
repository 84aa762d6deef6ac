"""dora: the magnitude/direction decomposition by hand (Linear and GPT-2's Conv1D), the detached norm, dropout,
merge/unmerge, mixed-adapter batches, and parity with HF PEFT `use_dora=True` both ways."""

from __future__ import annotations

import json

import pytest
import torch
from _matrix import labelled_batch, logits, perturb, run_cli, snapshot
from conftest import build_tiny
from torch import nn

from tunelab.artifacts import load_adapter, save_artifact
from tunelab.artifacts.peft_format import method_for_config
from tunelab.errors import ConfigError
from tunelab.methods import get_method
from tunelab.methods.base import adapter_state, set_active

DORA = get_method("dora")
LORA = get_method("lora")
Options = DORA.Options
LAYER = {"llama": "model.layers.0.self_attn.q_proj", "gpt2": "transformer.h.0.attn.c_attn"}


def dora_model(kind, tokenizer, seed=0, **options):
    model = build_tiny(kind, tokenizer)
    DORA.inject(model, Options(r=4, **options), "default")
    perturb(DORA, model, "default", seed=seed)  # non-trivial B and m
    return model


def weight_oi(module) -> torch.Tensor:
    w = module.weight.detach()
    return w if isinstance(module, nn.Linear) else w.T  # Conv1D stores (in, out)


def by_hand(module, x, name="default"):
    """m / ||W + s B A||_c * (W + s B A) x + bias, from the definitions."""
    a, b = module.lora_A[name].weight, module.lora_B[name].weight
    adapted = weight_oi(module) + module.lora_scaling[name] * b @ a  # (out, in)
    direction = adapted / adapted.norm(dim=1, keepdim=True)
    out = x @ (module.lora_magnitude_vector[name][:, None] * direction).T
    return out if module.bias is None else out + module.bias


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_magnitude_starts_at_the_column_norm_and_output_is_decomposed(kind, tokenizer):
    model = build_tiny(kind, tokenizer)
    DORA.inject(model, Options(r=4), "default")
    layer = model.get_submodule(LAYER[kind])
    m = layer.lora_magnitude_vector["default"]
    assert m.shape == (weight_oi(layer).shape[0],) and m.requires_grad
    assert torch.allclose(m, weight_oi(layer).norm(dim=1))  # ||W||_c per output feature (B = 0)
    perturb(DORA, model, "default", seed=1)
    x = torch.randn(2, 5, weight_oi(layer).shape[1])  # (batch, seq, in)
    with torch.no_grad():
        assert torch.allclose(layer(x), by_hand(layer, x), atol=1e-5)


def test_norm_is_detached_from_the_gradient(tokenizer):
    """Gradients of A, B and m equal those of the formula with ||W + sBA||_c as a constant (DoRA Sec. 4.3)."""
    model = dora_model("llama", tokenizer)
    layer = model.get_submodule(LAYER["llama"])
    a, b, m = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"]
    x = torch.randn(3, 32)
    layer(x).pow(2).sum().backward()
    ours = [t.grad.clone() for t in (a, b, m)]
    for t in (a, b, m):
        t.grad = None

    def reference(detach: bool) -> torch.Tensor:
        adapted = layer.weight + layer.lora_scaling["default"] * b @ a  # (out, in)
        norm = adapted.norm(dim=1)
        return (x @ ((m / (norm.detach() if detach else norm))[:, None] * adapted).T).pow(2).sum()

    reference(detach=True).backward()
    assert all(torch.allclose(o, t.grad, atol=1e-5) for o, t in zip(ours, (a, b, m)))
    for t in (a, b, m):
        t.grad = None
    reference(detach=False).backward()
    assert not torch.allclose(ours[1], b.grad, atol=1e-5)  # ... would give other gradients


class FixedMask(nn.Module):
    """A dropout stand-in with a known mask."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def test_dropout_in_training_recomputes_the_base_on_the_dropped_input(tokenizer):
    model = dora_model("llama", tokenizer, dropout=0.5)
    layer = model.get_submodule(LAYER["llama"])
    mask = (torch.rand(32) > 0.5).float() * 2
    layer.lora_dropout["default"] = FixedMask(mask)
    x = torch.randn(2, 32)
    model.train()
    with torch.no_grad():
        # (m/n - 1) W drop(x) + m/n s B A drop(x), added to the base output W x + b (as PEFT)
        want = x @ layer.weight.T + by_hand(layer, x * mask) - x * mask @ layer.weight.T
        assert torch.allclose(layer(x), want, atol=1e-5)
        model.eval()  # dropout off in eval: the plain decomposition
        assert torch.allclose(layer(x), by_hand(layer, x), atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_writes_the_decomposed_weight_and_unmerge_restores(kind, tokenizer):
    model = dora_model(kind, tokenizer, seed=2)
    batch = labelled_batch(tokenizer, kind)
    snap, want = snapshot(model), logits(model, batch)
    layer = model.get_submodule(LAYER[kind])
    eye = torch.eye(weight_oi(layer).shape[1])
    expected = (by_hand(layer, eye) - (0 if layer.bias is None else layer.bias)).T.detach()  # (out, in)
    DORA.merge(model, "default")
    assert torch.allclose(weight_oi(layer), expected, atol=1e-6)
    assert adapter_state(model).active == () and torch.allclose(logits(model, batch), want, atol=1e-5)
    LORA.inject(model, LORA.Options(r=2), "plain")
    with pytest.raises(ConfigError, match=rf"module {LAYER[kind]}: adapter 'default' is merged"):
        LORA.merge(model, "plain")  # nothing stacks on a DoRA merge
    LORA.remove(model, "plain")
    DORA.unmerge(model, "default")
    params = dict(model.named_parameters())
    assert all(torch.allclose(params[n], w, atol=1e-6) for n, w in snap.items())
    assert torch.allclose(logits(model, batch), want, atol=1e-5)


def test_mixed_rows_match_per_row_forwards(tokenizer):
    texts = ("the quick brown fox", "hello, how are you today? i am fine", "a language model predicts")
    batch = dict(tokenizer(list(texts), return_tensors="pt", padding=True))
    model = build_tiny("llama", tokenizer)
    DORA.inject(model, Options(r=4), "a")
    DORA.inject(model, Options(r=2, target_modules="all-linear"), "b")
    perturb(DORA, model, "a", seed=4)
    perturb(DORA, model, "b", seed=5)
    rows = ["b", None, "a"]
    adapter_state(model).row_adapters = rows
    mixed = logits(model, batch)
    adapter_state(model).row_adapters = None
    for i, name in enumerate(rows):
        set_active(model, [name] if name else [])
        alone = logits(model, {k: v[i:i + 1] for k, v in batch.items()})
        keep = batch["attention_mask"][i].bool()
        assert torch.allclose(mixed[i][keep], alone[0][keep], atol=1e-5), (i, name)


# --- parity with HF PEFT ---------------------------------------------------------------------------------------

PEFT_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_tunelab_dora_artifact_loads_in_peft(kind, tokenizer, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

    model = dora_model(kind, tokenizer, seed=6)
    batch = labelled_batch(tokenizer, kind)
    want = logits(model, batch)
    save_artifact(model, tokenizer, "default", tmp_path / "a", label_names=["a", "b", "c"] if kind == "bert" else None)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    task = {"task_type": "SEQ_CLS"} if kind == "bert" else {}
    reference = get_peft_model(build_tiny(kind, tokenizer), LoraConfig(r=4, use_dora=True,
                                                                      target_modules=PEFT_TARGETS[kind], **task))
    ours = DORA.state_dict(model, "default")
    theirs = get_peft_model_state_dict(reference)
    assert set(ours) == set(theirs) and any(k.endswith(".lora_magnitude_vector") for k in ours)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    peft_model = PeftModel.from_pretrained(build_tiny(kind, tokenizer), tmp_path / "a").eval()
    assert torch.allclose(logits(peft_model, batch), want, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_peft_dora_adapter_loads_in_tunelab(kind, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    task = {"task_type": "SEQ_CLS"} if kind == "bert" else {}
    peft_model = get_peft_model(build_tiny(kind, tokenizer), LoraConfig(r=4, use_dora=True,
                                                                        target_modules=PEFT_TARGETS[kind], **task))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-trivial B and magnitude (and head)
        for n, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    batch = labelled_batch(tokenizer, kind)
    want = logits(peft_model.eval(), batch)
    peft_model.save_pretrained(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert method_for_config(config).name == "dora"  # no sidecar: chosen by use_dora
    model = build_tiny(kind, tokenizer)
    load_adapter(model, tmp_path / "peft")
    assert adapter_state(model).methods == {"default": "dora"}
    assert torch.allclose(logits(model, batch), want, atol=1e-5)


def test_loader_picks_the_method_by_sidecar_then_config():
    plain = {"peft_type": "LORA", "r": 4, "use_dora": False}
    assert method_for_config(plain).name == "lora"
    assert method_for_config({**plain, "use_dora": True}).name == "dora"
    assert method_for_config(plain, written_by="qlora").name == "qlora"  # tunelab's sidecar names it
    assert method_for_config({**plain, "use_dora": True}, written_by="dora").name == "dora"


def test_lora_refuses_a_dora_config_and_dora_options_check():
    with pytest.raises(ConfigError, match="use_dora"):
        LORA.options_from_config({"peft_type": "LORA", "r": 4, "use_dora": True})
    opts = DORA.options_from_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True,
                                     "target_modules": ["q_proj"]})
    assert (opts.r, opts.alpha, opts.target_modules) == (4, 8, ["q_proj"])
    with pytest.raises(ConfigError, match="dora options: key 'init'.*expected default or gaussian"):
        DORA.options_from_config({"peft_type": "LORA", "use_dora": True, "init_lora_weights": "pissa"})


def test_cli_dora(tiny_dirs, instruction_jsonl, tmp_path, tokenizer):
    summary = run_cli(tiny_dirs, instruction_jsonl, tmp_path / "run", "dora", "r=4")
    assert summary["params_trainable"] == DORA.expected_trainable(build_tiny("llama", tokenizer), Options(r=4))
    config = json.loads((tmp_path / "run" / "artifact" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == 4
