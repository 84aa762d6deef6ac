"""The contract matrix: every registered method x tiny {llama, gpt2, bert-classification}, with default options,
through the `Method` interface and the artifacts API only. A new method joins by registering itself.

A method may declare an architecture unsupported by raising a one-line `ConfigError` at inject; the case is then
skipped. Checks that do not apply to a method (merge for non-mergeable ones, disabling for whole-model ones,
the analytic count for methods without `expected_trainable`) say so with a visible skip or a clear error.
The helpers at the top are shared with the other method tests in this folder.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny, sample_batch
from torch import nn

from tunelab.artifacts import artifact_bytes, load_adapter, merge_and_unload, read_label_names, save_artifact
from tunelab.errors import ConfigError
from tunelab.methods import all_methods, get_method
from tunelab.methods.base import disabled, mark_trainable, set_active

KINDS = ("llama", "gpt2", "bert")
LABELS = ["sports", "tech", "politics"]


# --- helpers ------------------------------------------------------------------------------------------------

def labelled_batch(tokenizer, kind: str) -> dict[str, torch.Tensor]:
    """Two padded rows with labels: next-token ids (pad -> -100) for causal LMs, class ids for BERT."""
    batch = dict(sample_batch(tokenizer))
    if kind == "bert":
        batch["labels"] = torch.tensor([0, 2])
    else:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def frozen_copy(t: torch.Tensor):
    """A copy to compare bit for bit: the tensor, or for a wrapper tensor subclass (qlora's NF4 weights) the
    inner tensors it stores (copying the wrapper itself would re-quantise)."""
    t = t.detach()
    if hasattr(type(t), "__tensor_flatten__"):
        return tuple(getattr(t, n).clone() for n in t.__tensor_flatten__()[0])
    return t.clone()


def same_bits(t: torch.Tensor, saved) -> bool:
    """Whether `t` still holds exactly what `frozen_copy` saved."""
    now = frozen_copy(t)
    if isinstance(saved, tuple):
        return isinstance(now, tuple) and all(torch.equal(a, b) for a, b in zip(now, saved, strict=True))
    return not isinstance(now, tuple) and torch.equal(now, saved)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: frozen_copy(p) for n, p in model.named_parameters()}


def adam_steps(model: nn.Module, method, name: str, batch: dict, steps: int = 3, lr: float = 1e-2) -> list[float]:
    """`steps` AdamW steps on adapter `name` alone; returns the loss before each step and after the last."""
    set_active(model, [name])
    mark_trainable(model, method.parameters(model, name))
    opt = torch.optim.AdamW(method.param_groups(model, name, lr=lr, weight_decay=0.0))
    losses = []
    for step in range(steps + 1):
        loss = model(**batch).loss
        losses.append(loss.item())
        if step < steps:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return losses


def perturb(method, model: nn.Module, name: str, seed: int, scale: float = 0.2) -> None:
    """Add seeded noise to every weight of adapter `name` (non-trivial values for parity checks)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.parameters(model, name).values():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def inject_or_skip(method, model: nn.Module, kind: str, name: str = "default") -> list[str]:
    """Inject with default options; a method that refuses the architecture must say so in one clear line."""
    try:
        return method.inject(model, method.Options(), name)
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg, f"{method.name} on {kind}: the refusal must be one line: {msg!r}"
        pytest.skip(f"{method.name} declares {kind} unsupported: {msg}")


def prepared(method_name: str, kind: str, tokenizer):
    """(model, method, base snapshot, base logits, batch) with adapter "default" injected, active and given
    seeded noise: a clearly visible adapter at no training cost."""
    model = build_tiny(kind, tokenizer)
    batch = labelled_batch(tokenizer, kind)
    snap, base = snapshot(model), logits(model, batch)
    method = get_method(method_name)
    inject_or_skip(method, model, kind)
    set_active(model, ["default"])
    perturb(method, model, "default", seed=0)
    return model, method, snap, base, batch


CASES = [pytest.param(m, k, id=f"{m}-{k}") for m in all_methods() for k in KINDS]


# --- the matrix ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method_name, kind", CASES)
def test_steps_move_loss_and_keep_frozen_weights(method_name, kind, tokenizer):
    model = build_tiny(kind, tokenizer)
    method = get_method(method_name)
    inject_or_skip(method, model, kind)
    snap = snapshot(model)  # the frozen base as training sees it (qlora: its NF4 data)
    initial = {n: p.detach().clone() for n, p in method.parameters(model, "default").items()}
    losses = adam_steps(model, method, "default", labelled_batch(tokenizer, kind))
    assert losses[-1] < losses[0], losses
    params = dict(model.named_parameters())
    for n in set(snap) - set(initial):
        assert same_bits(params[n], snap[n]), f"frozen parameter {n} changed"
    moved = [n for n, p in method.parameters(model, "default").items() if not torch.equal(p, initial[n])]
    assert moved, "no trainable parameter changed"


@pytest.mark.parametrize("method_name, kind", CASES)
def test_save_and_load_into_fresh_base(method_name, kind, tokenizer, tmp_path):
    model, method, _, _, batch = prepared(method_name, kind, tokenizer)
    want = logits(model, batch)
    labels = LABELS if kind == "bert" else None
    out = tmp_path / "artifact"
    written = save_artifact(model, tokenizer, "default", out, base_model="tiny", label_names=labels)
    assert written == artifact_bytes(out) > 0
    assert not [p for p in tmp_path.iterdir() if p.name != "artifact"], "temp dirs left behind"
    marker = {"adapter": "adapter_config.json", "model": "config.json"}[method.artifact]
    assert (out / marker).is_file() and read_label_names(out) == labels
    fresh = build_tiny(kind, tokenizer)
    assert load_adapter(fresh, out) == "default"
    assert torch.allclose(logits(fresh, batch), want, atol=1e-5)


@pytest.mark.parametrize("method_name, kind", CASES)
def test_merge_gives_same_logits(method_name, kind, tokenizer):
    model, method, snap, _, batch = prepared(method_name, kind, tokenizer)
    if not method.mergeable:
        with pytest.raises(ConfigError, match=method.name):
            method.merge(model, "default")
        return
    want = logits(model, batch)
    merge_and_unload(model, "default")
    assert set(dict(model.named_parameters())) == set(snap), "merge_and_unload left adapter parameters"
    assert torch.allclose(logits(model, batch), want, atol=1e-5)


@pytest.mark.parametrize("method_name, kind", CASES)
def test_disabled_gives_base_logits(method_name, kind, tokenizer):
    if get_method(method_name).artifact == "model":
        pytest.skip(f"{method_name} trains the base weights in place: there is no separate base to fall back to")
    model, method, _, base, batch = prepared(method_name, kind, tokenizer)
    if method.changes_base:  # the base under the adapter is stored differently (qlora: NF4): close, not equal
        stored = build_tiny(kind, tokenizer)
        inject_or_skip(method, stored, kind)
        set_active(stored, [])
        stored_base = logits(stored, batch)
        assert not torch.equal(stored_base, base)
        assert (stored_base - base).abs().max() < 0.25 * base.abs().max()
        base = stored_base
    assert not torch.allclose(logits(model, batch), base, atol=1e-4)
    with disabled(model):
        assert torch.allclose(logits(model, batch), base, atol=1e-6)
    set_active(model, [])
    assert torch.allclose(logits(model, batch), base, atol=1e-6)


@pytest.mark.parametrize("method_name, kind", CASES)
def test_trainable_count_is_analytic(method_name, kind, tokenizer):
    method = get_method(method_name)
    model = build_tiny(kind, tokenizer)
    inject_or_skip(method, model, kind)
    expected = method.expected_trainable(build_tiny(kind, tokenizer), method.Options())  # from the bare base
    if expected is None:
        pytest.skip(f"{method_name} does not implement expected_trainable")
    params = {id(p): p for p in method.parameters(model, "default").values()}
    assert sum(p.numel() for p in params.values()) == expected > 0
    mark_trainable(model, method.parameters(model, "default"))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
