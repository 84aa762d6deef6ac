"""The stacked mixed-adapter path (`methods/stacked.py`): each row of a mixed batch equals that row run alone with
its own adapter, for lora, rslora, dora and ia3 with mixed ranks, on Llama and GPT-2 (Conv1D) models."""

from __future__ import annotations

import pytest
import torch
from _matrix import logits, perturb
from conftest import build_tiny

from tunelab.methods import get_method
from tunelab.methods.base import adapter_state, set_active
from tunelab.methods.stacked import IA3_STACK, LORA_STACK

TEXTS = ("the quick brown fox", "hello, how are you today? i am fine", "a language model predicts",
         "one base, many adapters", "rows of a batch")

# (method, options) per adapter: mixed ranks, rsLoRA, all-linear beside the default targets
ADAPTERS = {
    "lora": [("lora", {"r": 4}), ("lora", {"r": 2, "target_modules": "all-linear"}),
             ("lora", {"r": 8, "rslora": True, "target_modules": "all-linear"})],
    "dora": [("dora", {"r": 4}), ("dora", {"r": 2, "target_modules": "all-linear"}),
             ("lora", {"r": 3, "target_modules": "all-linear"})],
    "ia3": [("ia3", {}), ("ia3", {}), ("lora", {"r": 2, "target_modules": "all-linear"})],
}


def _model(kind, tokenizer, family):
    model = build_tiny(kind, tokenizer)
    for i, (method, options) in enumerate(ADAPTERS[family]):
        m = get_method(method)
        m.inject(model, m.Options(**options), f"a{i}")
        perturb(m, model, f"a{i}", seed=10 + i)
    return model.eval()


def _per_row(model, batch, rows):
    """Each row alone with only its own adapter (None: the base) on the plain active-adapter path."""
    state = adapter_state(model)
    state.row_adapters = None
    out = []
    for i, name in enumerate(rows):
        set_active(model, [name] if name else [])
        out.append(logits(model, {k: v[i:i + 1] for k, v in batch.items()})[0])
    return out


def _check(mixed, alone, batch, kind, rows):
    for i, name in enumerate(rows):
        keep = batch["attention_mask"][i].bool()  # padded positions may differ
        assert torch.allclose(mixed[i][keep], alone[i][keep], atol=1e-5, rtol=1e-4), (kind, i, name)


@pytest.mark.parametrize("family", ["lora", "dora", "ia3"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_stacked_rows_match_each_row_alone(kind, family, tokenizer):
    batch = dict(tokenizer(list(TEXTS), return_tensors="pt", padding=True))
    model = _model(kind, tokenizer, family)
    rows = ["a1", None, "a0", "a2", "a1"]
    adapter_state(model).row_adapters = rows
    mixed = logits(model, batch)
    stacks = [m for m in model.modules() if LORA_STACK in m.__dict__ or IA3_STACK in m.__dict__]
    assert stacks, "the mixed forward did not take the stacked path"
    _check(mixed, _per_row(model, batch, rows), batch, kind, rows)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_one_adapter_batch_and_base_batch(kind, tokenizer):
    batch = dict(tokenizer(list(TEXTS[:3]), return_tensors="pt", padding=True))
    model = _model(kind, tokenizer, "dora")
    for rows in (["a1"] * 3, [None] * 3):  # one slot, no gather; every row on the base
        adapter_state(model).row_adapters = rows
        mixed = logits(model, batch)
        _check(mixed, _per_row(model, batch, rows), batch, kind, rows)


def test_stack_follows_weight_changes_and_removal(tokenizer):
    batch = dict(tokenizer(list(TEXTS[:2]), return_tensors="pt", padding=True))
    model = _model("llama", tokenizer, "lora")
    rows = ["a0", "a2"]
    state = adapter_state(model)
    state.row_adapters = rows
    before = logits(model, batch)
    perturb(get_method("lora"), model, "a2", seed=99)  # in place, no inject or load in between
    after = logits(model, batch)
    assert not torch.allclose(before[1], after[1])
    _check(after, _per_row(model, batch, rows), batch, "llama", rows)
    get_method("lora").remove(model, "a1")  # slots shift: every stack is rebuilt
    assert not any(LORA_STACK in m.__dict__ for m in model.modules())
    state.row_adapters = rows
    _check(logits(model, batch), _per_row(model, batch, rows), batch, "llama", rows)


def test_training_mode_keeps_the_per_adapter_path(tokenizer):
    batch = dict(tokenizer(list(TEXTS[:2]), return_tensors="pt", padding=True))
    model = _model("llama", tokenizer, "lora").train()
    adapter_state(model).row_adapters = ["a2", None]
    model(**batch).logits.sum().backward()
    assert not any(LORA_STACK in m.__dict__ for m in model.modules())
    assert any(p.grad is not None for n, p in model.named_parameters() if ".a2." in n)


def test_bf16_stacks_in_the_activation_dtype(tokenizer):
    batch = dict(tokenizer(list(TEXTS[:3]), return_tensors="pt", padding=True))
    model = _model("llama", tokenizer, "lora")
    rows = ["a0", "a1", "a2"]
    adapter_state(model).row_adapters = rows
    want = logits(model, batch)
    model.to(torch.bfloat16)
    adapter_state(model).row_adapters = rows
    got = logits(model, batch)
    stack = model.model.layers[0].self_attn.q_proj.__dict__[LORA_STACK]
    assert stack.a.dtype == stack.b.dtype == torch.bfloat16
    keep = batch["attention_mask"].bool()
    assert torch.allclose(got.float()[keep], want[keep], atol=0.1, rtol=0.05)


@pytest.mark.parametrize("family", ["lora", "dora"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_loaded_adapter_is_appended_to_the_stack_and_equals_a_rebuild(kind, family, tokenizer, monkeypatch):
    import tunelab.methods.stacked as stacked

    batch = dict(tokenizer(list(TEXTS), return_tensors="pt", padding=True))
    model = build_tiny(kind, tokenizer).eval()
    state = adapter_state(model)
    for i, (method, options) in enumerate(ADAPTERS[family][:2]):
        m = get_method(method)
        m.inject(model, m.Options(**options), f"a{i}")
        perturb(m, model, f"a{i}", seed=10 + i)
    state.row_adapters = ["a0", None, "a0", "a1", "a1"]
    logits(model.eval(), batch)  # the stacks now hold a0 and a1
    method, options = ADAPTERS[family][2]
    get_method(method).inject(model, get_method(method).Options(**options), "a2")  # a load
    perturb(get_method(method), model, "a2", seed=12)
    model.eval()
    read = []
    real = stacked._slots
    monkeypatch.setattr(stacked, "_slots", lambda m, names, *a: read.append(names) or real(m, names, *a))
    rows = ["a2", "a1", None, "a0", "a2"]
    state.row_adapters = rows
    grown = logits(model, batch)
    assert read and all(names == ("a2",) for names in read)  # only the new adapter's factors were read
    for module in model.modules():
        module.__dict__.pop(LORA_STACK, None)  # the same from scratch
    state.row_adapters = rows
    rebuilt = logits(model, batch)
    assert torch.equal(grown, rebuilt)
    _check(grown, _per_row(model, batch, rows), batch, kind, rows)


# --- invalidation: a forward reads the counters of the slots it uses ------------------------------------------

def _stack_ids(model):
    return [id(m.__dict__[LORA_STACK]) for m in model.modules() if LORA_STACK in m.__dict__]


@pytest.mark.parametrize("family", ["lora", "dora"])
def test_one_adapter_batch_sees_an_in_place_edit_of_its_weights(family, tokenizer):
    batch = dict(tokenizer(list(TEXTS[:3]), return_tensors="pt", padding=True))
    model = _model("llama", tokenizer, family)
    rows = ["a0"] * 3
    adapter_state(model).row_adapters = rows  # the same list (and Routing) for every forward below
    before = logits(model, batch)
    kept = _stack_ids(model)
    assert logits(model, batch).equal(before) and _stack_ids(model) == kept  # nothing moved: the cache holds
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_B["a0"].weight.mul_(3.0)  # a manual edit, in place
    after = logits(model, batch)
    assert not torch.allclose(before, after)
    _check(after, _per_row(model, batch, rows), batch, "llama", rows)
    adapter_state(model).row_adapters = rows
    sd = {k: v * 0.5 for k, v in q.lora_A["a0"].state_dict().items()}
    q.lora_A["a0"].load_state_dict(sd)  # load_state_dict copies in place
    _check(logits(model, batch), _per_row(model, batch, rows), batch, "llama", rows)


def test_dora_one_adapter_batch_sees_an_edit_of_the_base_weight(tokenizer):
    batch = dict(tokenizer(list(TEXTS[:3]), return_tensors="pt", padding=True))
    model = _model("llama", tokenizer, "dora")
    rows = ["a0"] * 3
    adapter_state(model).row_adapters = rows
    before = logits(model, batch)
    with torch.no_grad():  # DoRA's g = m / ||W + s B A|| reads the base weight
        model.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    after = logits(model, batch)
    assert not torch.allclose(before, after)
    _check(after, _per_row(model, batch, rows), batch, "llama", rows)


def test_an_edit_to_an_unused_slot_is_seen_by_the_first_batch_that_uses_it(tokenizer):
    batch = dict(tokenizer(list(TEXTS[:3]), return_tensors="pt", padding=True))
    model = _model("llama", tokenizer, "lora")
    state = adapter_state(model)
    state.row_adapters = ["a0"] * 3
    logits(model, batch)
    with torch.no_grad():
        for p in get_method("lora").parameters(model, "a2").values():
            p.mul_(-2.0)  # a2's slot is stale now; the a0 batch does not read it
    kept = _stack_ids(model)
    logits(model, batch)
    assert _stack_ids(model) == kept  # an a0 batch does not rebuild for a2's edit
    for rows in (["a2"] * 3, ["a1", "a2", None]):  # one-adapter batch, mixed batch
        state.row_adapters = rows
        logits(model, batch)  # builds a0's, a1's and a2's stack afresh
        with torch.no_grad():
            for p in get_method("lora").parameters(model, "a2").values():
                p.mul_(0.5)
        _check(logits(model, batch), _per_row(model, batch, rows), batch, "llama", rows)


def test_loading_and_removing_adapters_under_the_same_rows(tokenizer):
    batch = dict(tokenizer(list(TEXTS[:3]), return_tensors="pt", padding=True))
    model = _model("llama", tokenizer, "lora")
    state = adapter_state(model)
    rows = ["a2", "a0", "a2"]
    state.row_adapters = rows
    logits(model, batch)
    lora = get_method("lora")
    lora.inject(model.train(), lora.Options(r=5, target_modules="all-linear"), "a3")  # a load
    perturb(lora, model, "a3", seed=13)
    model.eval()
    for now in (rows, ["a3"] * 3, ["a3", "a2", None]):
        state.row_adapters = now
        _check(logits(model, batch), _per_row(model, batch, now), batch, "llama", now)
    lora.remove(model, "a0")  # slots shift
    for now in (["a3"] * 3, ["a2", "a3", "a1"]):
        state.row_adapters = now
        _check(logits(model, batch), _per_row(model, batch, now), batch, "llama", now)
