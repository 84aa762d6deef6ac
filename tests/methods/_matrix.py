"""Matrix checks for methods that attach through hooks (ia3, bitfit, adapter), run by their test files with
per-method options (BitFit's include_norms on Llama, each adapter variant), beside the contract matrix of
test_matrix.py (default options, through the artifacts API), whose helpers they reuse.

Each check takes a registered method, its options and a tiny model kind (tests/conftest.py) and drives it
through the `Method` interface only: untrained == base, disabled == base, save/load, merge/unmerge, two named
adapters and their removal, the analytic count, and mixed-adapter batches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
from conftest import build_tiny
from test_matrix import KINDS, adam_steps, labelled_batch, perturb, snapshot
from torch import nn

from tunelab.errors import ArtifactError
from tunelab.methods import get_method
from tunelab.methods.base import Method, adapter_state, disabled, set_active

__all__ = ["KINDS", "labelled_batch", "perturb", "outputs", "ALL_CHECKS", "check_merge", "check_load_errors",
           "check_bf16_base"]


def outputs(model: nn.Module, batch: dict) -> torch.Tensor:
    """The logits and the last hidden state, flattened into one vector.

    The hidden state is there because the tiny BERT's classifier (weights of std 0.02) barely moves its three
    logits; every change an adapter makes shows in the hidden state.
    """
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])


def hook_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(forward hooks, forward pre-hooks) per module path."""
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


@dataclass
class Case:
    """A tiny model with adapter(s) injected, and what the base gave before."""

    model: nn.Module
    method: Method
    snap: dict[str, torch.Tensor]  # the base parameters
    base: torch.Tensor  # the base outputs on `batch`
    batch: dict[str, torch.Tensor]

    def out(self) -> torch.Tensor:
        return outputs(self.model, self.batch)


def fresh(kind: str, tokenizer, method_name: str, options, names=("default",), seed: int | None = None) -> Case:
    """Inject adapters `names`; with `seed`, give each non-trivial weights; the first is the active one."""
    model = build_tiny(kind, tokenizer)
    batch = labelled_batch(tokenizer, kind)
    case = Case(model, get_method(method_name), snapshot(model), outputs(model, batch), batch)
    for i, name in enumerate(names):
        case.method.inject(model, options, name)
        if seed is not None:
            perturb(case.method, model, name, seed=seed + i)
    set_active(model, [names[0]])
    return case


# --- the checks -----------------------------------------------------------------------------------------

def check_train_keeps_base(kind, tokenizer, method_name, options) -> None:
    """3 AdamW steps: every step lowers the loss, the adapter changes, the base stays bit-identical."""
    c = fresh(kind, tokenizer, method_name, options)
    before = {n: p.detach().clone() for n, p in c.method.parameters(c.model, "default").items()}
    losses = adam_steps(c.model, c.method, "default", c.batch)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    params = dict(c.model.named_parameters())
    for n, base in c.snap.items():
        assert torch.equal(params[n], base), f"frozen base parameter {n} changed"
    after = c.method.parameters(c.model, "default")
    assert any(not torch.equal(after[n], before[n]) for n in before)


def check_untrained_and_disabled(kind, tokenizer, method_name, options) -> None:
    """A fresh adapter gives the base outputs exactly; a trained one differs; disabled gives the base again."""
    c = fresh(kind, tokenizer, method_name, options)
    assert torch.equal(c.out(), c.base)
    adam_steps(c.model, c.method, "default", c.batch)
    assert not torch.equal(c.out(), c.base)
    with disabled(c.model):
        assert torch.equal(c.out(), c.base)
    set_active(c.model, [])
    assert torch.equal(c.out(), c.base)


def check_save_load(kind, tokenizer, method_name, options) -> None:
    """state_dict (PEFT key layout) -> a fresh base -> inject + load_state_dict -> the same outputs."""
    c = fresh(kind, tokenizer, method_name, options, seed=1)
    want, sd = c.out(), c.method.state_dict(c.model, "default")
    assert sd and all(k.startswith("base_model.model.") and ".default" not in k for k in sd)
    torch.manual_seed(123)  # a different adapter initialisation before loading
    other = build_tiny(kind, tokenizer)
    config = c.method.adapter_config(c.model, options, "default")
    c.method.inject(other, c.method.options_from_config(config), "default")
    c.method.load_state_dict(other, sd, "default")
    assert torch.allclose(outputs(other, c.batch), want, atol=1e-6)


def check_merge(kind, tokenizer, method_name, options) -> None:
    """merge -> same outputs with the adapter folded in (and inactive); unmerge -> the base weights again."""
    c = fresh(kind, tokenizer, method_name, options, seed=2)
    want = c.out()
    c.method.merge(c.model, "default")
    assert adapter_state(c.model).active == ()
    assert torch.allclose(c.out(), want, atol=1e-5)
    set_active(c.model, ["default"])  # a merged adapter never applies twice
    assert torch.allclose(c.out(), want, atol=1e-5)
    c.method.unmerge(c.model, "default")
    params = dict(c.model.named_parameters())
    for n, before in c.snap.items():
        assert torch.allclose(params[n], before, atol=1e-6), n
    assert adapter_state(c.model).active == ("default",)
    assert torch.allclose(c.out(), want, atol=1e-5)
    with disabled(c.model):
        assert torch.allclose(c.out(), c.base, atol=1e-5)


def check_two_adapters(kind, tokenizer, method_name, options) -> None:
    """Two named adapters coexist, each giving its own outputs; removing both restores the base module tree."""
    c = fresh(kind, tokenizer, method_name, options, names=("a", "b"), seed=3)
    assert not set(c.method.parameters(c.model, "a")) & set(c.method.parameters(c.model, "b"))
    out_a = c.out()
    set_active(c.model, ["b"])
    assert not torch.allclose(out_a, c.out(), atol=1e-4)
    assert not torch.allclose(out_a, c.base, atol=1e-4)
    c.method.remove(c.model, "b")
    set_active(c.model, ["a"])
    assert torch.equal(c.out(), out_a)
    c.method.remove(c.model, "a")
    assert set(dict(c.model.named_parameters())) == set(c.snap)
    reference = build_tiny(kind, tokenizer)
    outputs(reference, c.batch)  # transformers may add its own hooks on a first forward
    assert hook_counts(c.model) == hook_counts(reference)
    assert adapter_state(c.model).methods == {}
    assert torch.equal(c.out(), c.base)


def check_count(kind, tokenizer, method_name, options) -> None:
    """The analytic `expected_trainable` (on a bare base) equals the trainable parameters after inject."""
    c = fresh(kind, tokenizer, method_name, options)
    expected = c.method.expected_trainable(build_tiny(kind, tokenizer), options)
    assert sum(p.numel() for p in c.model.parameters() if p.requires_grad) == expected > 0
    assert sum(p.numel() for p in c.method.parameters(c.model, "default").values()) == expected


def check_row_adapters(kind, tokenizer, method_name, options) -> None:
    """A mixed batch (row 0 adapter 'a', row 1 the base) gives each row what it gets in a batch of its own."""
    c = fresh(kind, tokenizer, method_name, options, names=("a",), seed=5)
    out_a = c.out()
    assert not torch.allclose(out_a, c.base, atol=1e-4)
    adapter_state(c.model).row_adapters = ["a", None]
    mixed = c.out()
    rows = _row_zero(c.model, c.batch)
    assert torch.allclose(mixed[rows], out_a[rows], atol=1e-5)
    assert torch.allclose(mixed[~rows], c.base[~rows], atol=1e-5)


def _row_zero(model: nn.Module, batch: dict) -> torch.Tensor:
    """A mask over `outputs`' flat vector: True on the entries of batch row 0."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    parts = [torch.zeros_like(t, dtype=torch.bool).index_fill_(0, torch.tensor([0]), True).flatten()
             for t in (out.logits, out.hidden_states[-1])]
    return torch.cat(parts)


def check_bf16_base(kind, tokenizer, method_name, options) -> None:
    """On a bf16 base the adapter's weights are fp32, outputs stay bf16, and gradients reach the adapter."""
    model = build_tiny(kind, tokenizer).to(torch.bfloat16)
    batch = labelled_batch(tokenizer, kind)
    base = outputs(model, batch)
    method = get_method(method_name)
    method.inject(model, options, "default")
    perturb(method, model, "default", seed=6)
    params = method.parameters(model, "default")
    assert params and all(p.dtype == torch.float32 for p in params.values())
    out = model(**batch)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all()
               for p in params.values())
    assert not torch.equal(outputs(model, batch), base)


def check_load_errors(method: Method, model: nn.Module, key: str, wrong_shape: tuple[int, ...]) -> None:
    """Loading adapter 'default' (injected) without `key`, with `key` of `wrong_shape`, or with a key the model
    lacks raises `ArtifactError` naming the key (and both shapes); the adapter's weights stay as they were."""
    sd = method.state_dict(model, "default")
    needed = tuple(sd[key].shape)
    with pytest.raises(ArtifactError, match=f"missing keys {re.escape(key)}"):
        method.load_state_dict(model, {k: v for k, v in sd.items() if k != key}, "default")
    shape_msg = f"{key} has shape {wrong_shape}, the base model needs {needed}"
    with pytest.raises(ArtifactError, match=re.escape(shape_msg)):
        method.load_state_dict(model, {**{k: v + 1 for k, v in sd.items()}, key: torch.zeros(wrong_shape)}, "default")
    with pytest.raises(ArtifactError, match="unexpected keys base_model.model.nowhere.weight"):
        method.load_state_dict(model, {**sd, "base_model.model.nowhere.weight": torch.zeros(1)}, "default")
    assert all(torch.equal(v, sd[k]) for k, v in method.state_dict(model, "default").items())


ALL_CHECKS = (check_train_keeps_base, check_untrained_and_disabled, check_save_load, check_two_adapters,
              check_count, check_row_adapters)
