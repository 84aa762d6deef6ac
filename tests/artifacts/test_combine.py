"""`tunelab combine` against HF PEFT's `add_weighted_adapter`, both ways: the combined adapter tunelab writes loads
in PEFT with the update and logits of PEFT's own combination, and PEFT's combination loads in tunelab with the same
logits. DARE's random drop is checked with PEFT's draws seeded like tunelab's, and against the math written out
here. Mismatched adapters are refused in one line naming the adapter and the field."""

from __future__ import annotations

import json
import math

import pytest
import torch
from builders import build_tiny
from test_artifacts import logits, lora_model

from tunelab.artifacts import load_adapter, save_artifact
from tunelab.artifacts.combine import combine, read_lora
from tunelab.artifacts.combine_math import elect_sign, prune
from tunelab.cli import main
from tunelab.errors import ConfigError

BASE = "base/dir"


def make_adapters(tokenizer, tmp_path, ranks=(4, 4), alphas=(8, 16), rslora=False, targets=("q_proj", "v_proj")):
    """LoRA adapter dirs written by tunelab, seeded differently, on one tiny Llama base."""
    dirs = []
    for i, (r, alpha) in enumerate(zip(ranks, alphas)):
        model = lora_model("llama", tokenizer, seed=10 + i, r=r, alpha=alpha, rslora=rslora,
                           target_modules=list(targets))
        save_artifact(model, tokenizer, "default", tmp_path / f"a{i}", base_model=BASE)
        dirs.append(tmp_path / f"a{i}")
    return dirs


def peft_model_of(dirs, tokenizer):
    from peft import PeftModel

    model = PeftModel.from_pretrained(build_tiny("llama", tokenizer), dirs[0], adapter_name="a0")
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"a{i}")
    return model


def peft_combined(dirs, tokenizer, weights, **kw):
    model = peft_model_of(dirs, tokenizer)
    model.add_weighted_adapter([f"a{i}" for i in range(len(dirs))], weights, "mix", **kw)
    model.set_adapter("mix")
    return model.eval()


def deltas(peft_model, name):
    """Module path -> PEFT's scaling * B A of adapter `name` (out, in)."""
    from peft.tuners.lora import LoraLayer

    return {path.removeprefix("base_model.model."): m.get_delta_weight(name).detach()
            for path, m in peft_model.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A}


def loaded_in_peft(adapter_dir, tokenizer):
    from peft import PeftModel

    return PeftModel.from_pretrained(build_tiny("llama", tokenizer), adapter_dir, adapter_name="ours").eval()


def assert_same_deltas(ours: dict, theirs: dict, atol=1e-5):
    assert ours.keys() == theirs.keys() and ours
    for path in ours:
        assert torch.allclose(ours[path], theirs[path], atol=atol), path


CASES = [  # (tunelab method, PEFT combination_type, weights, ranks, extra options)
    ("linear", "linear", [0.7, 0.3], (4, 4), {}),
    ("linear", "linear", [1.0, -0.5], (4, 4), {}),
    ("cat", "cat", [0.6, 0.9], (4, 2), {}),
    ("svd", "svd", [0.5, 1.5], (4, 2), {"rank": 3}),
    ("svd", "svd", [1.0, 1.0], (4, 2), {}),
    ("ties", "ties", [0.8, 0.5], (4, 4), {"density": 0.5}),
    ("ties", "ties", [0.8, -0.5], (4, 4), {"density": 0.7, "majority_sign": "frequency"}),
    ("magnitude_prune", "magnitude_prune", [0.5, 0.5], (4, 4), {"density": 0.4}),
    ("ties_svd", "ties_svd", [1.0, 0.7], (4, 2), {"density": 0.5, "rank": 4}),
    ("magnitude_prune_svd", "magnitude_prune_svd", [1.0, 0.7], (4, 4), {"density": 0.5}),
    ("svd", "svd", [1.0, 1.0], (4, 4), {"svd_clamp": 0.9}),
]


def peft_kwargs(options: dict) -> dict:
    names = {"rank": "svd_rank", "majority_sign": "majority_sign_method", "svd_clamp": "svd_clamp"}
    return {names.get(k, k): v for k, v in options.items()}


@pytest.mark.parametrize("ours, theirs, weights, ranks, options", CASES)
def test_combination_equals_peft_add_weighted_adapter(ours, theirs, weights, ranks, options, tokenizer, tmp_path):
    dirs = make_adapters(tokenizer, tmp_path, ranks=ranks)
    combine(dirs, tmp_path / "mix", ours, weights=weights, **options)
    reference = peft_combined(dirs, tokenizer, weights, combination_type=theirs, **peft_kwargs(options))
    mine = loaded_in_peft(tmp_path / "mix", tokenizer)  # tunelab's file loads in PEFT ...
    assert_same_deltas(deltas(mine, "ours"), deltas(reference, "mix"))
    assert torch.allclose(logits(mine, tokenizer=tokenizer), logits(reference, tokenizer=tokenizer), atol=1e-5)
    reference.save_pretrained(tmp_path / "peft", selected_adapters=["mix"])  # ... and PEFT's loads in tunelab
    model = build_tiny("llama", tokenizer)
    load_adapter(model, tmp_path / "peft" / "mix")
    assert torch.allclose(logits(model, tokenizer=tokenizer), logits(reference, tokenizer=tokenizer), atol=1e-5)
    config = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "mix" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == peft_config["r"]


def test_peft_written_adapters_combine_in_tunelab(tokenizer, tmp_path):
    """The other direction on the inputs: adapters saved by PEFT itself, combined by tunelab."""
    from peft import LoraConfig, get_peft_model

    dirs = []
    for i in range(2):
        peft_model = get_peft_model(build_tiny("llama", tokenizer), LoraConfig(r=4, lora_alpha=8, use_rslora=i == 1,
                                                                               target_modules=["q_proj", "v_proj"]))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        peft_model.save_pretrained(tmp_path / f"p{i}")
        dirs.append(tmp_path / f"p{i}")
    combine(dirs, tmp_path / "mix", "linear", weights=[0.5, 0.5])
    reference = peft_combined(dirs, tokenizer, [0.5, 0.5], combination_type="linear")
    assert_same_deltas(deltas(loaded_in_peft(tmp_path / "mix", tokenizer), "ours"), deltas(reference, "mix"))


@pytest.mark.parametrize("ours, theirs", [("dare", "dare_linear"), ("dare_ties", "dare_ties"),
                                          ("dare_linear_svd", "dare_linear_svd")])
def test_dare_with_peft_draws_seeded_like_tunelab(ours, theirs, tokenizer, tmp_path, monkeypatch):
    """PEFT draws DARE's masks from the global RNG, after initialising the new adapter: seeding that RNG at PEFT's
    first draw makes its masks tunelab's (the same Bernoulli stream, modules in model order, A before B)."""
    from peft.utils import merge_utils

    seed, first = 7, []
    real = merge_utils.random_pruning

    def seeded(*args, **kwargs):
        if not first:
            first.append(True)
            torch.manual_seed(seed)
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_utils, "random_pruning", seeded)
    dirs = make_adapters(tokenizer, tmp_path)
    combine(dirs, tmp_path / "mix", ours, weights=[0.6, 0.8], density=0.5, seed=seed)
    reference = peft_combined(dirs, tokenizer, [0.6, 0.8], combination_type=theirs, density=0.5)
    assert_same_deltas(deltas(loaded_in_peft(tmp_path / "mix", tokenizer), "ours"), deltas(reference, "mix"))


def test_dare_math(tokenizer, tmp_path):
    """dare_linear written out: each factor keeps entries drawn Bernoulli(density) (one generator seeded with
    `seed`, modules in order, A factors then B factors), divides them by density, and sums them weighted by
    sqrt(w * scaling); density 1 is plain linear."""
    dirs = make_adapters(tokenizer, tmp_path, alphas=(8, 8))
    weights, density, seed = [0.5, 2.0], 0.3, 3
    combine(dirs, tmp_path / "dare", "dare_linear", weights=weights, density=density, seed=seed)
    combine(dirs, tmp_path / "full", "dare_linear", weights=weights, density=1.0)
    combine(dirs, tmp_path / "lin", "linear", weights=weights)
    parts = [read_lora(d).modules for d in dirs]
    got = read_lora(tmp_path / "dare").modules
    gen = torch.Generator().manual_seed(seed)
    for path in sorted(parts[0], key=lambda p: (int(p.split(".")[2]), p)):
        scale = [math.sqrt(w * parts[i][path][2]) for i, w in enumerate(weights)]
        for k, factor in ((0, "A"), (1, "B")):
            want = sum(scale[i] * parts[i][path][k] * torch.bernoulli(torch.full_like(parts[i][path][k], density),
                                                                    generator=gen) / density for i in range(2))
            assert torch.allclose(got[path][k], want, atol=1e-6), (path, factor)
    full, lin = read_lora(tmp_path / "full").modules, read_lora(tmp_path / "lin").modules
    assert all(torch.equal(full[p][0], lin[p][0]) and torch.equal(full[p][1], lin[p][1]) for p in lin)


def test_ties_math_on_one_tensor():
    """TIES written out: keep the top-density magnitudes of each task, elect the sign of the summed values,
    average the weighted entries that agree with it."""
    t1, t2 = torch.tensor([3.0, -1.0, 0.5, -4.0]), torch.tensor([-2.0, 2.0, 0.1, -1.0])
    assert torch.equal(prune(t1, 0.5, "magnitude", None), torch.tensor([3.0, 0.0, 0.0, -4.0]))
    kept = torch.stack([torch.tensor([3.0, 0.0, 0.0, -4.0]), torch.tensor([-2.0, 2.0, 0.0, 0.0])])
    assert torch.equal(elect_sign(kept, "total"), torch.tensor([[True, False, False, True], [False, True, False, False]]))  # a pruned 0 agrees with no sign
    from tunelab.artifacts.combine_math import Recipe, merge_tasks

    merged = merge_tasks([t1, t2], [1.0, 1.0], Recipe("ties", density=0.5))
    assert torch.equal(merged, torch.tensor([3.0, 2.0, 0.0, -4.0]))  # entry 2: no task agrees, mean of none is 0


def test_cat_is_exact_sum_of_weighted_updates(tokenizer, tmp_path):
    dirs = make_adapters(tokenizer, tmp_path, ranks=(4, 2), alphas=(8, 3))
    combine(dirs, tmp_path / "cat", "cat", weights=[0.25, -1.0])
    parts = [read_lora(d).modules for d in dirs]
    got = read_lora(tmp_path / "cat").modules
    for path, (a, b, scale) in got.items():
        want = sum(w * parts[i][path][2] * parts[i][path][1] @ parts[i][path][0] for i, w in enumerate([0.25, -1.0]))
        assert a.shape[0] == 6 and scale == 1.0
        assert torch.allclose(b @ a, want, atol=1e-6)


def test_combined_adapter_loads_in_tunelab_with_its_update(tokenizer, tmp_path):
    dirs = make_adapters(tokenizer, tmp_path)
    combine(dirs, tmp_path / "mix", "linear", weights=[1.0, 1.0])
    model = build_tiny("llama", tokenizer)
    load_adapter(model, tmp_path / "mix")
    side = json.loads((tmp_path / "mix" / "tunelab.json").read_text())
    assert side["method"] == "lora" and side["combined"]["method"] == "linear"
    assert side["combined"]["adapters"] == [str(d) for d in dirs]
    reference = peft_combined(dirs, tokenizer, [1.0, 1.0], combination_type="linear")
    assert torch.allclose(logits(model, tokenizer=tokenizer), logits(reference, tokenizer=tokenizer), atol=1e-5)


def test_mismatched_rank_is_refused_naming_adapter_and_field(tokenizer, tmp_path):
    dirs = make_adapters(tokenizer, tmp_path, ranks=(4, 2))
    with pytest.raises(ConfigError, match=rf"adapter {dirs[1]}: field r: rank 2 .* needs one rank"):
        combine(dirs, tmp_path / "mix", "ties", density=0.5)
    assert not (tmp_path / "mix").exists()


def test_mismatched_targets_refused(tokenizer, tmp_path):
    a = make_adapters(tokenizer, tmp_path / "x", targets=("q_proj", "v_proj"))[0]
    b = make_adapters(tokenizer, tmp_path / "y", targets=("q_proj", "k_proj"))[0]
    with pytest.raises(ConfigError, match=rf"adapter {b}: field target_modules: module .*k_proj is adapted only"):
        combine([a, b], tmp_path / "mix")


def test_mismatched_base_refused_by_cli_in_one_line(tokenizer, tmp_path, capsys):
    dirs = make_adapters(tokenizer, tmp_path)
    config = json.loads((dirs[1] / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "other/base"
    (dirs[1] / "adapter_config.json").write_text(json.dumps(config))
    code = main(["combine", "--adapter", str(dirs[0]), "--adapter", str(dirs[1]), "--output", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"adapter {dirs[1]}: field base_model_name_or_path is 'other/base'" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("argv, message", [
    (["--method", "tie"], "did you mean 'ties'"),
    (["--method", "ties"], "--density None: 'ties' needs a density"),
    (["--weights", "1,x"], "--weights '1,x': expected comma-separated numbers"),
    (["--weights", "1"], "expected 2 finite numbers"),
])
def test_bad_options_exit_2_before_reading(argv, message, tmp_path, capsys):
    code = main(["combine", "--adapter", str(tmp_path / "none1"), "--adapter", str(tmp_path / "none2"),
                 "--output", str(tmp_path / "m"), *argv])
    assert code == 2 and message in capsys.readouterr().err


def test_cli_combines_and_reports(tokenizer, tmp_path, capsys):
    dirs = make_adapters(tokenizer, tmp_path)
    code = main(["combine", "--adapter", str(dirs[0]), "--adapter", str(dirs[1]), "--method", "svd", "--rank", "2",
                 "--weights", "0.5,0.5", "--output", str(tmp_path / "m")])
    assert code == 0 and "combined adapter written to" in capsys.readouterr().out
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["r"] == 2
