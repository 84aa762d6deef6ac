"""adapter (bottleneck): the method matrix for each variant on tiny Llama, GPT-2 and BERT, where the adapters go,
what they compute (serial / parallel with scaling), and errors."""

from __future__ import annotations

import pytest
import torch
from _matrix import (
    ALL_CHECKS,
    KINDS,
    check_bf16_base,
    check_load_errors,
    labelled_batch,
    perturb,
)
from conftest import build_tiny
from torch import nn

from tunelab.config import build_config, parse_set
from tunelab.errors import ConfigError
from tunelab.methods import get_method
from tunelab.methods.adapter import sites
from tunelab.methods.base import set_active

METHOD = get_method("adapter")
VARIANTS = ("houlsby", "pfeiffer", "parallel")

# Layer-0 sites per architecture: (attention output, FFN output, FFN input).
LAYER0 = {
    "llama": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp", "model.layers.0.mlp"),
    "gpt2": ("transformer.h.0.attn.c_proj", "transformer.h.0.mlp", "transformer.h.0.mlp"),
    "bert": ("bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense",
             "bert.encoder.layer.0.intermediate"),
}


# The serial and parallel hook paths on every architecture; pfeiffer (houlsby's FFN site alone) on BERT, whose
# FFN output `output.dense` must not be confused with `attention.output.dense`.
CASES = [(kind, variant) for kind in KINDS for variant in ("houlsby", "parallel")] + [("bert", "pfeiffer")]


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kind, variant", CASES)
def test_matrix(kind, variant, check, tokenizer):
    options = METHOD.Options(variant=variant, scaling=2.0 if variant == "parallel" else 1.0)
    check(kind, tokenizer, "adapter", options)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_base(kind, tokenizer):
    check_bf16_base(kind, tokenizer, "adapter", METHOD.Options(variant="parallel", scaling=2.0))


@pytest.mark.parametrize("kind", KINDS)
def test_placement(kind, tokenizer):
    model = build_tiny(kind, tokenizer)
    attn, ffn_out, ffn_in = LAYER0[kind]
    layer0 = {v: [s for s in sites(model, v) if ".0." in s[0]] for v in VARIANTS}
    assert layer0["houlsby"] == [(attn, None), (ffn_out, None)]
    assert layer0["pfeiffer"] == [(ffn_out, None)]
    assert layer0["parallel"] == [(ffn_out, None if ffn_in == ffn_out else ffn_in)]
    assert len(sites(model, "houlsby")) == 4  # two per block, two blocks


def _capture(model: nn.Module, paths: dict[str, str], batch: dict) -> dict[str, torch.Tensor]:
    """One forward recording, per labelled module, its first input and its output before (`raw`) and after
    (`out`) tunelab's hooks (our hooks are placed first and last)."""
    seen, handles = {}, []
    for label, path in paths.items():
        module = model.get_submodule(path)
        handles += [
            module.register_forward_pre_hook(lambda m, a, k=label: seen.__setitem__(k + ".in", a[0]), prepend=True),
            module.register_forward_hook(lambda m, a, o, k=label: seen.__setitem__(k + ".raw", o), prepend=True),
            module.register_forward_hook(lambda m, a, o, k=label: seen.__setitem__(k + ".out", o)),
        ]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    return seen


def _run(model, batch) -> None:
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


@pytest.mark.parametrize("kind", KINDS)
def test_houlsby_is_serial_on_the_sublayer_outputs(kind, tokenizer):
    """Each site's output h becomes h + up(act(down(h))): after attention output and after the FFN."""
    model, batch = build_tiny(kind, tokenizer), labelled_batch(tokenizer, kind)
    attn, ffn_out, _ = LAYER0[kind]
    METHOD.inject(model, METHOD.Options(variant="houlsby", non_linearity="tanh"), "default")
    perturb(METHOD, model, "default", seed=1)
    set_active(model, ["default"])
    seen = _capture(model, {"attn": attn, "ffn": ffn_out}, batch)
    with torch.no_grad():
        for label, path in (("attn", attn), ("ffn", ffn_out)):
            a = model.get_submodule(path).bottleneck["default"]
            h = seen[label + ".raw"]
            assert not torch.allclose(seen[label + ".out"], h, atol=1e-4)
            assert torch.allclose(seen[label + ".out"], h + a.up(torch.tanh(a.down(h))), atol=1e-6), label


@pytest.mark.parametrize("kind", KINDS)
def test_parallel_reads_the_ffn_input_and_scales(kind, tokenizer):
    """The FFN output becomes FFN(x) + s * up(act(down(x))), x the FFN's input."""
    model, batch = build_tiny(kind, tokenizer), labelled_batch(tokenizer, kind)
    _, ffn_out, ffn_in = LAYER0[kind]
    METHOD.inject(model, METHOD.Options(variant="parallel", scaling=4.0, non_linearity="silu"), "default")
    perturb(METHOD, model, "default", seed=2)
    set_active(model, ["default"])
    seen = _capture(model, {"site": ffn_out, "src": ffn_in}, batch)
    a = model.get_submodule(ffn_out).bottleneck["default"]
    with torch.no_grad():
        want = seen["site.raw"] + 4.0 * a.up(nn.functional.silu(a.down(seen["src.in"])))
    assert seen["src.in"].shape[-1] == 32  # the FFN input (hidden), not BERT's intermediate activations
    assert torch.allclose(seen["site.out"], want, atol=1e-6)


def test_bottleneck_size_and_reduction_factor(tokenizer):
    for options, size in ((METHOD.Options(), 2), (METHOD.Options(reduction_factor=4), 8),
                          (METHOD.Options(bottleneck_size=5), 5)):
        model = build_tiny("gpt2", tokenizer)
        METHOD.inject(model, options, "default")
        shapes = {k.rsplit("default.", 1)[-1]: tuple(v.shape) for k, v in METHOD.parameters(model, "default").items()}
        assert shapes == {"down.weight": (size, 32), "down.bias": (size,), "up.weight": (32, size), "up.bias": (32,)}


def test_saved_keys_and_config(tiny_llama):
    options = METHOD.Options(variant="parallel", bottleneck_size=3, scaling=4.0)
    METHOD.inject(tiny_llama, options, "default")
    assert "base_model.model.model.layers.0.mlp.bottleneck.down.weight" in METHOD.state_dict(tiny_llama, "default")
    cfg = METHOD.adapter_config(tiny_llama, options, "default")
    assert cfg["peft_type"] == "BOTTLENECK" and METHOD.peft_loadable is False
    assert METHOD.options_from_config(cfg) == options


def test_merge_is_refused_with_the_reason(tiny_gpt2):
    METHOD.inject(tiny_gpt2, METHOD.Options(), "default")
    with pytest.raises(ConfigError, match="cannot be merged.*nonlinear"):
        METHOD.merge(tiny_gpt2, "default")


def test_unsupported_architecture_lists_what_was_looked_for():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ConfigError, match=r"no supported block layout.*self_attn\.o_proj.*attn\.c_proj.*"
                                          r"attention\.output\.dense"):
        METHOD.inject(model, METHOD.Options(), "default")


def test_set_options_select_adapter():
    cfg = build_config({}, {"method": "adapter", "method_options": parse_set(
        ["variant=parallel", "bottleneck_size=8", "scaling=4", "non_linearity=gelu"])})
    opts = cfg.method_opts()
    assert (opts.variant, opts.bottleneck_size, opts.scaling, opts.non_linearity) == ("parallel", 8, 4.0, "gelu")


@pytest.mark.parametrize("pairs, needle", [
    (["reduction_factor=8", "bottleneck_size=4"], "not both"),
    (["variant=serial"], "variant"),
    (["non_linearity=sigmoid"], "non_linearity"),
    (["bottleneck_size=0"], "bottleneck_size"),
    (["scaling=4"], "scaling applies to variant 'parallel' only"),
    (["reduction=8"], "reduction_factor"),  # unknown key suggests the closest one
])
def test_bad_options(pairs, needle):
    with pytest.raises(ConfigError, match=needle):
        build_config({}, {"method": "adapter", "method_options": parse_set(pairs)})


def test_load_missing_keys_and_wrong_shapes(tiny_bert):
    METHOD.inject(tiny_bert, METHOD.Options(), "default")
    check_load_errors(METHOD, tiny_bert, "base_model.model.bert.encoder.layer.1.output.dense.bottleneck.up.weight",
                      (32, 4))


def test_parallel_and_serial_share_a_site(tiny_bert, tokenizer):
    """Removing a BERT parallel adapter drops its FFN-input hook only when no other parallel adapter needs it."""
    batch = labelled_batch(tokenizer, "bert")
    for name, variant in (("p1", "parallel"), ("p2", "parallel"), ("s", "pfeiffer")):
        METHOD.inject(tiny_bert, METHOD.Options(variant=variant), name)
        perturb(METHOD, tiny_bert, name, seed=len(name))
    source = tiny_bert.get_submodule("bert.encoder.layer.0.intermediate")
    METHOD.remove(tiny_bert, "p1")
    assert len(source._forward_pre_hooks) == 1
    set_active(tiny_bert, ["p2", "s"])
    _run(tiny_bert, batch)  # p2 still reads the FFN input
    METHOD.remove(tiny_bert, "p2")
    assert len(source._forward_pre_hooks) == 0
    _run(tiny_bert, batch)
