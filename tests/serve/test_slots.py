"""Decode steps on the slot cache (`serve/slots.py`): the same tokens and log-probabilities as decoding on
transformers' DynamicCache, with rows of different lengths, adapters and methods, rows leaving and joining;
the captured step's routing (every row's adapter from a device buffer) equals the per-batch routing; a module
that would bake the rows into a graph keeps its adapters eager; graphs are recaptured when the adapters change.
On CPU, `slots.capture` is replaced by a stand-in that re-runs the step (a CUDA graph needs a GPU); the last
test captures real CUDA graphs where a GPU is present."""

from __future__ import annotations

import threading

import pytest
import torch
from methods._matrix import perturb
from conftest import build_tiny

from tunelab.methods import get_method
from tunelab.methods.base import adapter_state
from tunelab.serve import slots
from tunelab.serve.engine import Engine, GenerationRequest
from tunelab.serve.slots import SlotCache

TEXTS = ("the quick brown fox", "hello, how are you today? i am fine", "a language model predicts",
         "one base, many adapters", "rows of a batch", "fine")
ADAPTERS = [("lora", {"r": 4}), ("dora", {"r": 2, "target_modules": "all-linear"}),
            ("lora", {"r": 8, "rslora": True, "target_modules": "all-linear"}), ("ia3", {})]


def _engine(kind, tokenizer, adapters=ADAPTERS, **kw) -> Engine:
    model = build_tiny(kind, tokenizer)
    for i, (method, options) in enumerate(adapters):
        m = get_method(method)
        m.inject(model, m.Options(**options), f"a{i}")
        perturb(m, model, f"a{i}", seed=10 + i)
    model.eval().requires_grad_(False)
    adapter_state(model).active = ()
    engine = Engine(model, tokenizer, lock=threading.RLock(), mixed_batch=lambda n: True, max_batch_size=8, **kw)
    engine.eos_ids = set()
    return engine


def _requests(tokenizer, names):
    """Rows of different prompt lengths and adapters that stop after different numbers of tokens."""
    return [GenerationRequest(tokenizer(TEXTS[i % len(TEXTS)]).input_ids, adapter=name, max_tokens=3 + 2 * i,
                              temperature=0, logprobs=2) for i, name in enumerate(names)]


def _run(engine, requests):
    results = engine.generate(requests)
    return [r.token_ids for r in results], [[t.logprob for t in r.logprobs] for r in results]


def _fake_capture(fn, pool):
    """A CUDA graph's stand-in on CPU: each replay runs the captured step again, with its routing."""
    out = fn()
    return (lambda: out.copy_(fn())), out, pool


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_slot_decoding_equals_dynamic_cache_decoding(kind, graphs, tokenizer, monkeypatch):
    monkeypatch.setattr(slots, "capture", _fake_capture)
    engine = _engine(kind, tokenizer, cuda_graphs=True)
    engine.decoder.graphs = graphs  # False: eager steps on the slot cache (a set of adapters that cannot be captured)
    requests = _requests(tokenizer, ["a1", None, "a0", "a2", "a1", "a3"])
    used = []
    adopt = engine.decoder.adopt
    monkeypatch.setattr(engine.decoder, "adopt", lambda *a: used.append(1) or adopt(*a))
    tokens, logprobs = _run(engine, requests)
    assert used, "the wave did not decode on the slot cache"
    assert (engine.decoder.captures > 0) == graphs
    engine.decoder = None
    want_tokens, want_logprobs = _run(engine, requests)
    assert tokens == want_tokens
    for got, want in zip(logprobs, want_logprobs):
        assert got == pytest.approx(want, abs=1e-4)


def test_captured_routing_equals_per_batch_routing_at_every_step(tokenizer, monkeypatch):
    """Every replayed step's logits against the eager step on the same cache (which writes the same keys)."""
    checked = []

    def checking_capture(fn, pool):
        out = fn()

        def replay():
            out.copy_(fn())
            checked.append(out.clone())
        return replay, out, pool

    monkeypatch.setattr(slots, "capture", checking_capture)
    engine = _engine("llama", tokenizer, cuda_graphs=True)
    replay = slots.Decoder._replay

    def both(self, rows, columns, names, loaded):
        got = replay(self, rows, columns, names, loaded)
        adapter_state(self.model).row_adapters = list(names) + [None] * (rows - len(names))
        want = self._forward(rows, columns)
        assert torch.allclose(got[:len(names)], want[:len(names)], atol=1e-5, rtol=1e-4)
        return got

    monkeypatch.setattr(slots.Decoder, "_replay", both)
    _run(engine, _requests(tokenizer, ["a3", "a1", None, "a2", "a0"]))
    assert len(checked) > 5


def test_a_module_that_groups_rows_keeps_its_adapters_eager(tokenizer, monkeypatch):
    """A PiSSA adapter keeps the per-adapter path, which reads the rows of each adapter: no graph is kept, and
    the tokens still equal those of the DynamicCache decode."""
    monkeypatch.setattr(slots, "capture", _fake_capture)
    engine = _engine("llama", tokenizer, adapters=[("lora", {"r": 2, "init": "pissa"}),
                                                     ("lora", {"r": 4, "target_modules": ["k_proj", "o_proj"]})],
                     cuda_graphs=True)
    requests = _requests(tokenizer, ["a0", "a1", None])
    tokens, _ = _run(engine, requests)
    assert engine.decoder.captures == 0
    assert tuple(adapter_state(engine.model).methods) in engine.decoder._eager
    used = []
    adopt = engine.decoder.adopt
    monkeypatch.setattr(engine.decoder, "adopt", lambda *a: used.append(1) or adopt(*a))
    assert _run(engine, requests)[0] == tokens and not used  # the next waves decode on DynamicCache
    engine.decoder = None
    assert _run(engine, requests)[0] == tokens


def test_graphs_are_kept_and_recaptured_when_the_adapters_change(tokenizer, monkeypatch):
    monkeypatch.setattr(slots, "capture", _fake_capture)
    engine = _engine("llama", tokenizer, cuda_graphs=True)
    requests = [GenerationRequest(tokenizer(TEXTS[0]).input_ids, adapter="a0", max_tokens=4, temperature=0)] * 2
    engine.generate(requests)
    first = engine.decoder.captures
    assert first >= 1
    engine.generate(requests)  # the same buckets and adapters: the graphs are replayed
    assert engine.decoder.captures == first
    m = get_method("lora")
    m.inject(engine.model, m.Options(r=2), "late")  # a new adapter: new stacks, so new graphs
    perturb(m, engine.model, "late", seed=5)
    engine.model.requires_grad_(False)
    late = [GenerationRequest(tokenizer(TEXTS[0]).input_ids, adapter="late", max_tokens=4, temperature=0)] * 2
    tokens = [r.token_ids for r in engine.generate(late)]
    assert engine.decoder.captures > first
    engine.decoder = None
    assert [r.token_ids for r in engine.generate(late)] == tokens


def test_the_least_recently_replayed_graph_goes_first_beyond_the_limit(tokenizer, monkeypatch):
    monkeypatch.setattr(slots, "capture", _fake_capture)
    monkeypatch.setattr(slots, "MAX_GRAPHS", 2)
    engine = _engine("llama", tokenizer, cuda_graphs=True)
    requests = _requests(tokenizer, ["a1", None, "a0", "a2", "a1", "a3"])  # rows leave: buckets 8, 4, 2, 1
    tokens, _ = _run(engine, requests)
    assert len(engine.decoder._captured) == 2 and engine.decoder.captures > 2
    engine.decoder = None
    assert _run(engine, requests)[0] == tokens


def test_slot_cache_rows_leave_join_and_grow(tokenizer):
    """absorb copies each row's positions to column 0, keep compacts, reserve grows without losing any."""
    from transformers import DynamicCache

    cache = SlotCache([(2, 4)], rows=4, length=8, dtype=torch.float32, device="cpu")
    keys = torch.arange(2 * 2 * 5 * 4, dtype=torch.float32).view(2, 2, 5, 4)  # (rows, heads, positions, dim)
    dyn = DynamicCache()
    dyn.update(keys, -keys, 0)
    cache.absorb(dyn, [5, 3], 0)  # row 1 is left-padded by 2
    assert torch.equal(cache.keys[0][1, :, :3], keys[1, :, 2:]) and torch.equal(cache.values[0][0, :, :5], -keys[0])
    assert cache.host == [5, 3] and cache.lengths.tolist() == [5, 3, 0, 0]
    cache.absorb(dyn, [2], 2)
    cache.keep([2, 0])
    assert cache.host == [2, 5] and cache.lengths.tolist() == [2, 5, 0, 0]
    assert torch.equal(cache.keys[0][0, :, :2], keys[0, :, 3:]) and torch.equal(cache.keys[0][1, :, :5], keys[0])
    cache.reserve(300, limit=None)
    assert cache.length == 512 and cache.generation == 1 and torch.equal(cache.keys[0][1, :, :5], keys[0])
    cache.reserve(600, limit=550)
    assert cache.length == 600  # the limit is the context, but what is needed is always allocated


def test_without_cuda_graphs_waves_decode_on_dynamic_cache(tokenizer):
    assert _engine("llama", tokenizer, cuda_graphs=False).decoder is None
    assert (_engine("llama", tokenizer).decoder is not None) == torch.cuda.is_available()  # default: on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decoding_equals_eager_decoding_on_the_gpu(tokenizer):
    engine = _engine("llama", tokenizer, cuda_graphs=True)
    engine.model.to("cuda")
    engine.decoder = slots.Decoder(engine.model, rows=8, context=engine.context_length,
                                   cache_kw=engine._cache_kw, graphs=True)
    requests = _requests(tokenizer, ["a1", None, "a0", "a2", "a1", "a3"])
    tokens, logprobs = _run(engine, requests)
    assert engine.decoder.captures > 0
    engine.decoder.graphs = False
    want_tokens, want_logprobs = _run(engine, requests)
    assert tokens == want_tokens
    for got, want in zip(logprobs, want_logprobs):
        assert got == pytest.approx(want, abs=1e-4)
