"""The contract matrix: every registered method x tiny {llama, gpt2, bert-classification}, with default options,
through the `Method` interface and the artifacts API only. A new method joins by registering itself.

A method may declare an architecture unsupported by raising a one-line `ConfigError` at inject; the case is then
skipped. Checks that do not apply to a method (merge for non-mergeable ones, disabling for whole-model ones,
the analytic count for methods without `expected_trainable`) say so with a visible skip or a clear error.
Every method declares `supports_mixed_batch`; the matrix holds it to its word (a mixed batch gives each row its
own adapter, or is refused in one line). The helpers live in _matrix.py, shared with the other method tests here.
"""

from __future__ import annotations

import pytest
import torch
from _matrix import (
    KINDS,
    LABELS,
    adam_steps,
    inject_or_skip,
    labelled_batch,
    logits,
    prepared,
    same_bits,
    snapshot,
)
from conftest import build_tiny

from tunelab.artifacts import (
    artifact_bytes,
    load_adapter,
    merge_and_unload,
    read_label_names,
    save_artifact,
)
from tunelab.errors import ConfigError
from tunelab.methods import all_methods, get_method
from tunelab.methods.base import (
    Method,
    adapter_state,
    disabled,
    mark_trainable,
    set_active,
)

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


@pytest.mark.parametrize("method_name, kind", CASES)
def test_mixed_batch_as_declared(method_name, kind, tokenizer):
    """`supports_mixed_batch` is declared by the method itself; True: with `row_adapters = ["default", None]` row 0
    gets the adapter's logits and row 1 the base's; False: the forward is refused in one line."""
    method = get_method(method_name)
    declared = [c for c in type(method).__mro__ if c is not Method and "supports_mixed_batch" in vars(c)]
    assert declared, f"{method_name} does not declare supports_mixed_batch"
    model, method, _, _, batch = prepared(method_name, kind, tokenizer)
    alone = logits(model, batch)
    with disabled(model):
        base = logits(model, batch)
    state = adapter_state(model)
    state.row_adapters = ["default", None]
    if not method.supports_mixed_batch:
        with pytest.raises(ConfigError, match="mixed-adapter batches") as err:
            logits(model, batch)
        assert "\n" not in str(err.value), f"{method_name}: the refusal must be one line"
        return
    mixed = logits(model, batch)
    assert not torch.allclose(alone[0], base[0], atol=1e-4), "the adapter must change row 0 for the check to bite"
    assert torch.allclose(mixed[0], alone[0], atol=1e-5)
    assert torch.allclose(mixed[1], base[1], atol=1e-5)
