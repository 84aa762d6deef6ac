"""The shared kit of methods/: the mixed-batch router is checked and built once per batch, whichever module asks."""

from __future__ import annotations

import pytest
import torch
from _matrix import labelled_batch, logits, perturb
from conftest import build_tiny

from tunelab.errors import ConfigError
from tunelab.methods import get_method
from tunelab.methods.base import adapter_state
from tunelab.methods.kit import MIXED_GUARD, has_hook, route


def test_route_groups_rows_once_per_batch(tokenizer):
    lora = get_method("lora")
    model = build_tiny("llama", tokenizer)
    lora.inject(model, lora.Options(r=2, target_modules="all-linear"), "a")
    perturb(lora, model, "a", seed=1)
    state = adapter_state(model)
    state.row_adapters = ["a", None]
    logits(model, labelled_batch(tokenizer, "llama"))  # every adapted linear asks for the routing
    routing = state.routing
    assert routing is not None and routing.groups == {"a": [0], None: [1]}
    index = routing.index("a", torch.device("cpu"))
    assert torch.equal(index, torch.tensor([0])) and routing.index("a", torch.device("cpu")) is index
    assert route(state, 2) is routing  # the same rows: the cached grouping
    state.row_adapters = [None, "a"]
    assert route(state, 2) is not routing and state.routing.groups == {None: [0], "a": [1]}
    with pytest.raises(ConfigError, match="row_adapters has 2 entries, the batch has 3 rows"):
        route(state, 3)


def test_route_refuses_merged_adapters(tokenizer):
    lora = get_method("lora")
    model = build_tiny("llama", tokenizer)
    lora.inject(model, lora.Options(r=2), "a")
    lora.inject(model, lora.Options(r=2), "b")
    lora.merge(model, "b")
    state = adapter_state(model)
    state.row_adapters = ["a", None]
    with pytest.raises(ConfigError, match="adapter 'b' is merged into the base weights"):
        route(state, 2)
    lora.unmerge(model, "b")
    assert route(state, 2).groups == {"a": [0], None: [1]}


def test_guard_stays_while_a_method_without_mixed_batches_is_loaded(tokenizer):
    prompt, lora = get_method("prompt"), get_method("lora")
    model = build_tiny("llama", tokenizer)
    prompt.inject(model, prompt.Options(num_virtual_tokens=2), "soft")
    lora.inject(model, lora.Options(r=2), "a")  # a method with mixed batches joins: the guard stays
    batch = labelled_batch(tokenizer, "llama")
    adapter_state(model).row_adapters = ["soft", None]
    with pytest.raises(ConfigError, match="method 'prompt' \\(adapter 'soft'\\) cannot serve mixed-adapter batches"):
        logits(model, batch)
    prompt.remove(model, "soft")
    adapter_state(model).row_adapters = ["a", None]
    logits(model, batch)
    assert not has_hook(model, MIXED_GUARD), "the guard goes with the last adapter that needs it"
