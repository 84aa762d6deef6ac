"""lora options: LoRA+ (`loraplus_lr_ratio`: B matrices in their own optimizer group) and the base-derived inits
PiSSA (`init=pissa`, `pissa_niter_K`) and OLoRA (`init=olora`): parity of the init with PEFT, the frozen residual,
the original base while the adapter is off, and artifacts converted to a rank-2r plain LoRA that loads on the
original base in tunelab and in PEFT."""

from __future__ import annotations

import json
import re

import pytest
import torch
from _matrix import (
    adam_steps, labelled_batch, logits, perturb, run_cli, same_bits, snapshot,
)
from conftest import build_tiny

from tunelab.artifacts import load_adapter, save_artifact
from tunelab.config import RunConfig
from tunelab.errors import ConfigError
from tunelab.methods import get_method
from tunelab.methods.base import adapter_state, disabled, set_active
from tunelab.validation import parse_model

LORA = get_method("lora")
Options = LORA.Options


def pissa_model(kind, tokenizer, init="pissa", **options):
    model = build_tiny(kind, tokenizer)
    LORA.inject(model, Options(r=4, init=init, **options), "default")
    return model


def layers(model):
    """(path, module) of every LoRA-adapted module."""
    return [(p, m) for p, m in model.named_modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)]


def weight_oi(module) -> torch.Tensor:
    w = module.weight.detach()
    return w if isinstance(module, torch.nn.Linear) else w.T  # Conv1D stores (in, out)


# --- LoRA+ ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_loraplus_puts_B_in_its_own_group(kind, tokenizer):
    model = build_tiny(kind, tokenizer)
    LORA.inject(model, Options(r=4, loraplus_lr_ratio=16), "default")
    groups = LORA.param_groups(model, "default", lr=1e-3, weight_decay=0.1)
    params = LORA.parameters(model, "default")
    names = {id(p): n for n, p in params.items()}
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1.6e-2)]
    assert all(g["weight_decay"] == 0.1 for g in groups)
    rest, b = ([names[id(p)] for p in g["params"]] for g in groups)
    assert b and all(".lora_B.default." in n for n in b)
    assert rest and not any(".lora_B." in n for n in rest)
    assert sorted(rest + b) == sorted(params)  # every trainable parameter exactly once (the head copy too)
    assert any(".modules_to_save." in n for n in rest) == (kind == "bert")
    LORA.inject(model, Options(r=4), "plain")  # without the option: one group
    assert len(LORA.param_groups(model, "plain", lr=1e-3, weight_decay=0.0)) == 1


def test_training_builds_its_optimizer_from_the_loraplus_groups(tiny_dirs, instruction_jsonl, tmp_path):
    from tunelab.train.setup import build_run

    cfg = RunConfig(model=str(tiny_dirs["llama"]), data=str(instruction_jsonl), output=str(tmp_path / "run"),
                    method="lora", method_options={"loraplus_lr_ratio": 16}, lr=1e-3, max_steps=3)
    run = build_run(cfg)
    groups = run.optimizer.param_groups
    assert [g["initial_lr"] for g in groups] == [1e-3, pytest.approx(1.6e-2)]
    b_params = {id(p) for n, p in LORA.parameters(run.model, "default").items() if ".lora_B." in n}
    assert {id(p) for p in groups[1]["params"]} == b_params


def test_cli_lora_loraplus(tiny_dirs, instruction_jsonl, tmp_path):
    summary = run_cli(tiny_dirs, instruction_jsonl, tmp_path / "run", "lora", "loraplus_lr_ratio=16")
    assert summary["config"]["method_options"] == {"loraplus_lr_ratio": 16}
    assert summary["final_train_loss"] is not None


# --- PiSSA / OLoRA: the init ----------------------------------------------------------------------------------

def peft_init(kind, tokenizer, init, seed=7):
    """PEFT's adapter with `init_lora_weights=init` on a fresh tiny base: {path: (A, B, weight (out, in))}."""
    from peft import LoraConfig, get_peft_model

    base = build_tiny(kind, tokenizer)
    torch.manual_seed(seed)
    targets = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}[kind]
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, init_lora_weights=init, target_modules=targets))
    out = {}
    for path, m in peft_model.base_model.model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            w = m.base_layer.weight.detach()
            out[path] = (m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach(),
                         w.T if kind == "gpt2" else w)
    return out


@pytest.mark.parametrize("kind, init", [("llama", "pissa"), ("gpt2", "pissa"), ("llama", "olora"),
                                        ("llama", "pissa_niter_3"), ("gpt2", "pissa_niter_3")])
def test_base_init_matches_peft(kind, init, tokenizer):
    """Same A, B and residual as PEFT (singular vectors up to sign; svd_lowrank draws the same numbers)."""
    theirs = peft_init(kind, tokenizer, init)
    model = build_tiny(kind, tokenizer)
    torch.manual_seed(7)
    LORA.inject(model, Options(r=4, alpha=16, init=init), "default")
    ours = layers(model)
    assert sorted(p for p, _ in ours) == sorted(theirs)
    for path, m in ours:
        a, b, w = theirs[path]
        sign = torch.sign((m.lora_A["default"].weight * a).sum(dim=1))  # (r,): +1 or -1 per singular vector
        assert torch.allclose(m.lora_A["default"].weight * sign[:, None], a, atol=1e-5)
        assert torch.allclose(m.lora_B["default"].weight * sign, b, atol=1e-5)
        assert torch.allclose(weight_oi(m), w, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_pissa_takes_the_principal_part_out_of_the_base(kind, tokenizer):
    original = build_tiny(kind, tokenizer)
    model = pissa_model(kind, tokenizer, alpha=8)
    for path, m in layers(model):
        w = weight_oi(original.get_submodule(path))
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        principal = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]  # (out, in): the rank-4 principal part
        a, b, scaling = m.lora_A["default"].weight, m.lora_B["default"].weight, m.lora_scaling["default"]
        assert scaling == 2.0
        assert torch.allclose(scaling * b @ a, principal, atol=1e-5), path
        assert torch.allclose(weight_oi(m), w - principal, atol=1e-5), path  # the frozen base is the residual
        assert torch.equal(m.lora_initial["default"].lora_A, a)


# --- PiSSA / OLoRA: training, off, saving, loading -----------------------------------------------------------

@pytest.mark.parametrize("kind, init", [("llama", "pissa"), ("gpt2", "pissa"), ("llama", "olora"),
                                        ("gpt2", "olora")])
def test_trained_adapter_loads_on_the_original_base(kind, init, tokenizer, tmp_path):
    from peft import PeftModel

    batch = labelled_batch(tokenizer, kind)
    base = logits(build_tiny(kind, tokenizer), batch)
    model = pissa_model(kind, tokenizer, init=init, alpha=8)
    assert torch.allclose(logits(model, batch), base, atol=1e-5)  # A0, B0 reproduce what they took out
    residual = snapshot(model)
    losses = adam_steps(model, LORA, "default", batch)
    assert losses[-1] < losses[0]
    params = dict(model.named_parameters())
    trainable = set(LORA.parameters(model, "default"))
    assert all(same_bits(params[n], w) for n, w in residual.items() if n not in trainable)  # residual frozen
    want = logits(model, batch)
    with disabled(model):  # off: the original base, not the residual
        assert torch.allclose(logits(model, batch), base, atol=1e-5)

    save_artifact(model, tokenizer, "default", tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    fresh = build_tiny(kind, tokenizer)
    load_adapter(fresh, tmp_path / "a")
    assert adapter_state(fresh).methods == {"default": "lora"}  # a plain rank-2r LoRA on the original base
    assert torch.allclose(logits(fresh, batch), want, atol=1e-5)
    peft_model = PeftModel.from_pretrained(build_tiny(kind, tokenizer), tmp_path / "a").eval()
    assert torch.allclose(logits(peft_model, batch), want, atol=1e-5)


def test_state_dict_round_trip_is_exact_and_rescales_to_new_initial_factors(tokenizer):
    batch = labelled_batch(tokenizer, "llama")
    model = pissa_model("llama", tokenizer, init="pissa_niter_2")
    perturb(LORA, model, "default", seed=1)
    sd, want = LORA.state_dict(model, "default"), logits(model, batch)
    assert {tuple(t.shape) for k, t in sd.items() if "q_proj.lora_A" in k} == {(8, 32)}  # [A; A0]
    other = build_tiny("llama", tokenizer)
    torch.manual_seed(123)  # another random SVD: other A0, B0 and residual
    LORA.inject(other, Options(r=4, init="pissa_niter_2"), "default")
    a0 = [m.model.layers[0].self_attn.q_proj.lora_initial["default"].lora_A for m in (model, other)]
    assert not torch.equal(*a0)
    LORA.load_state_dict(other, sd, "default")  # the residual follows the loaded A0, B0
    assert torch.allclose(logits(other, batch), want, atol=1e-5)
    same = pissa_model("llama", tokenizer)
    first = pissa_model("llama", tokenizer)
    perturb(LORA, first, "default", seed=2)
    before = snapshot(same)
    LORA.load_state_dict(same, LORA.state_dict(first, "default"), "default")  # same init: bit-exact
    assert torch.equal(logits(same, batch), logits(first, batch))
    trained = set(LORA.parameters(same, "default"))
    assert all(same_bits(dict(same.named_parameters())[n], w) for n, w in before.items() if n not in trained)


def test_peft_unconverted_pissa_adapter_loads(tokenizer, tmp_path):
    """PEFT saved without conversion (rank r, init 'pissa'): tunelab recomputes the residual from the base."""
    from peft import LoraConfig, get_peft_model

    batch = labelled_batch(tokenizer, "llama")
    peft_model = get_peft_model(build_tiny("llama", tokenizer),
                                LoraConfig(r=4, init_lora_weights="pissa", target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    want = logits(peft_model.eval(), batch)
    peft_model.save_pretrained(tmp_path / "peft")
    model = build_tiny("llama", tokenizer)
    load_adapter(model, tmp_path / "peft")
    assert adapter_state(model).options["default"].init == "pissa"
    assert torch.allclose(logits(model, batch), want, atol=1e-5)


def test_merge_and_remove(tokenizer):
    batch = labelled_batch(tokenizer, "gpt2")
    original = snapshot(build_tiny("gpt2", tokenizer))
    model = pissa_model("gpt2", tokenizer)
    perturb(LORA, model, "default", seed=3)
    want = logits(model, batch)
    LORA.merge(model, "default")
    set_active(model, [])  # merged: the trained layer is in the weight, nothing is added back
    assert torch.allclose(logits(model, batch), want, atol=1e-5)
    LORA.unmerge(model, "default")
    assert torch.allclose(logits(model, batch), want, atol=1e-5)
    LORA.remove(model, "default")  # unmerged: the principal part goes back into the weight
    params = dict(model.named_parameters())
    assert set(params) == set(original)
    assert all(torch.allclose(params[n], w, atol=1e-6) for n, w in original.items())


# --- option checks ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, values, needle", [
    ("lora", {"init": "svd"}, "pissa_niter_<K>"), ("lora", {"init": "pissa_niter_0"}, "init"),
    ("lora", {"loraplus_lr_ratio": 0}, "loraplus_lr_ratio"),
    ("dora", {"init": "pissa"}, "method 'dora': key 'init'"),
    ("qlora", {"init": "olora"}, "method 'qlora': key 'init'")])
def test_bad_options_are_config_errors(method, values, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)) as err:
        parse_model(get_method(method).Options, values, where=f"--set for method '{method}'")
    assert "\n" not in str(err.value)
    if values.get("init") in ("pissa", "olora"):
        assert "expected default or gaussian" in str(err.value)


def test_base_inits_refuse_what_they_cannot_do(tokenizer):
    model = build_tiny("llama", tokenizer)
    with pytest.raises(ConfigError, match=r"k_proj: init=pissa needs r <= 16"):  # k_proj is (16, 32)
        LORA.inject(model, Options(r=20, init="pissa", target_modules=["k_proj"]), "big")
    LORA.inject(model, Options(r=4), "plain")
    with pytest.raises(ConfigError, match=r"q_proj: init=olora rewrites its base weight.*'plain'"):
        LORA.inject(model, Options(r=4, init="olora"), "o")
    LORA.inject(model, Options(r=4, init="olora", target_modules=["o_proj"]), "o")
    with pytest.raises(ConfigError, match=r"o_proj: adapter 'o' \(pissa/olora init\)"):
        LORA.inject(model, Options(r=4, target_modules="all-linear"), "late")
    assert sorted(adapter_state(model).methods) == ["o", "plain"]  # refusals left nothing behind


def test_options_from_peft_inits():
    for value, init in [(True, "default"), (False, "default"), ("pissa", "pissa"), ("pissa_niter_16",
                        "pissa_niter_16"), ("olora", "olora"), ("gaussian", "gaussian")]:
        opts = LORA.options_from_config({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"],
                                         "init_lora_weights": value})
        assert opts.init == init


# --- end to end through the CLI --------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_cli_lora_base_init(init, tiny_dirs, instruction_jsonl, tmp_path, tokenizer):
    summary = run_cli(tiny_dirs, instruction_jsonl, tmp_path / "run", "lora", f"init={init}", "r=4")
    assert summary["config"]["method_options"] == {"init": init, "r": 4}
    config = json.loads((tmp_path / "run" / "artifact" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True  # converted for the original base
    assert summary["params_trainable"] == LORA.expected_trainable(build_tiny("llama", tokenizer), Options(r=4))


# --- PEFT's selection options: rank_pattern, alpha_pattern, layers_to_transform, exclude_modules -----------------
# (parity with PEFT both ways: tests/artifacts/test_peft_parity.py, cases llama-rank-alpha-pattern ... bert-exclude-layers)

SELECTION = {"target_modules": "all-linear", "rank_pattern": {"q_proj": 2, "down_proj": 6},
             "alpha_pattern": {"q_proj": 4}, "layers_to_transform": [1], "exclude_modules": ["k_proj"]}


def test_selection_options_pick_modules_ranks_and_scaling(tokenizer):
    model = build_tiny("llama", tokenizer)
    touched = LORA.inject(model, Options(r=4, alpha=8, **SELECTION), "default")
    assert [t.removeprefix("model.layers.1.") for t in touched] == [
        "self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    got = {p.rsplit(".", 1)[-1]: (m.lora_A["default"].out_features, m.lora_scaling["default"]) for p, m in layers(model)}
    assert got == {"q_proj": (2, 2.0), "v_proj": (4, 2.0), "o_proj": (4, 2.0), "gate_proj": (4, 2.0),
                   "up_proj": (4, 2.0), "down_proj": (6, 8 / 6)}
    real = sum(p.numel() for p in LORA.parameters(model, "default").values())
    assert LORA.expected_trainable(build_tiny("llama", tokenizer), Options(r=4, alpha=8, **SELECTION)) == real


def test_planner_counts_follow_the_selection_options(tiny_dirs, tokenizer):
    from tunelab.measure.plan import plan

    model = build_tiny("llama", tokenizer)
    LORA.inject(model, Options(**SELECTION), "default")
    real = sum(p.numel() for p in LORA.parameters(model, "default").values())
    planned = plan(tiny_dirs["llama"], batch_size=1, seq_len=8, methods=["lora"], method_options=SELECTION)
    assert planned.strategies[0].params_trainable == real


def test_all_linear_with_layers_is_written_for_peft(tokenizer, tmp_path):
    """PEFT refuses layers_to_transform with a string target_modules; tunelab writes the names instead."""
    from peft import PeftModel

    model = build_tiny("llama", tokenizer)
    LORA.inject(model, Options(r=4, **SELECTION), "default")
    perturb(LORA, model, "default", seed=3)
    batch = labelled_batch(tokenizer, "llama")
    save_artifact(model, tokenizer, "default", tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], list) and config["layers_to_transform"] == [1]
    peft_model = PeftModel.from_pretrained(build_tiny("llama", tokenizer), tmp_path / "a").eval()
    assert torch.allclose(logits(peft_model, batch), logits(model, batch), atol=1e-5)


@pytest.mark.parametrize("options, expect", [
    ({"layers_pattern": "layers"}, "layers_pattern applies only together with layers_to_transform"),
    ({"target_modules": r".*q_proj", "layers_to_transform": [0]}, "not to a regex target_modules"),
    ({"rank_pattern": {"q_proj": 0}}, "pattern 'q_proj': expected a positive value, found 0"),
    ({"rank_pattern": {"(": 2}}, r"pattern '\(' is not a valid regex"),
    ({"alpha_pattern": {"q_proj": 2}, "init": "pissa"}, "not supported with init=pissa"),
    ({"layers_to_transform": [-1]}, "expected layer indices >= 0"),
])
def test_selection_option_errors(options, expect):
    with pytest.raises(ConfigError, match=expect):
        parse_model(Options, options, where="lora options")


def test_selection_that_leaves_nothing_names_the_options(tokenizer):
    model = build_tiny("llama", tokenizer)
    with pytest.raises(ConfigError, match=r"layers_to_transform=\[5\].*leave none; first matched: model.layers.0"):
        LORA.inject(model, Options(layers_to_transform=[5]), "default")
    assert not adapter_state(model).methods


@pytest.mark.parametrize("method, targets, init, why", [
    ("dora", ["q_proj", "embed_tokens"], "default", "method 'dora' \\(only lora's\\)"),
    ("qlora", r".*embed_tokens", "default", "method 'qlora' \\(only lora's\\)"),
    ("lora", ["embed_tokens"], "pissa", "init=pissa")])
def test_lora_on_embedding_layers_is_refused_in_words_where_unsupported(method, targets, init, why, tokenizer):
    model = build_tiny("llama", tokenizer)
    m = get_method(method)
    with pytest.raises(ConfigError, match="model.embed_tokens, an embedding layer: LoRA on embedding layers is not "
                                          f"supported with {why}"):
        m.inject(model, m.Options(target_modules=targets, init=init), "default")
    assert not adapter_state(model).methods
