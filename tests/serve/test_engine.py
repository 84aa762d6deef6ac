"""The batching engine: mixed-adapter batches give each row exactly its own adapter's tokens."""

from __future__ import annotations

import threading
from concurrent.futures import wait

import pytest
import torch
from serve.helpers import (  # noqa: F401  (fixtures)
    PROMPTS, adapter_root, base_dir, make_service, one_thread, reference_greedy,
)

from tunelab.methods.base import adapter_state
from tunelab.serve.engine import GenerationRequest
from tunelab.serve.sampling import StopText

N = 10


@pytest.fixture(scope="module")
def references(base_dir, adapter_root, tokenizer):
    """Greedy tokens of PROMPTS[i] on adapters a, b, c and the base, each run alone by transformers' generate."""
    prompts = [tokenizer(p).input_ids for p in PROMPTS[:4]]
    out = {}
    for name in ["a", "b", "c", None]:
        tokens = reference_greedy(base_dir, adapter_root / name if name else None, prompts, N)
        out.update({(name, i): t for i, t in enumerate(tokens)})
    return out


def _row_adapters_seen(model):
    """Record `row_adapters` at every top-level forward of `model`."""
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a: seen.append(adapter_state(m).row_adapters))
    return seen, handle


def test_mixed_batch_matches_each_adapter_alone(make_service, adapter_root, tokenizer, references):
    service = make_service({n: adapter_root / n for n in "abc"})
    service.engine.eos_ids = set()  # the references ignore EOS too: exactly N tokens each
    keys = [service.registry.acquire(n) for n in ("a", "b", "c", service.base_name)]
    requests = [GenerationRequest(tokenizer(PROMPTS[i]).input_ids, adapter=k, max_tokens=N, temperature=0)
                for i, k in enumerate(keys)]
    seen, handle = _row_adapters_seen(service.engine.model)
    try:
        results = service.engine.generate(requests)  # one wave: one forward per step for all four rows
    finally:
        handle.remove()
    assert seen[0] == [*keys[:3], None] and len(seen) == N  # one batch of 4 rows, each with its own adapter
    got = [r.token_ids for r in results]
    assert got == [references[(n, i)] for i, n in enumerate(["a", "b", "c", None])]
    assert len({tuple(t) for t in got}) == 4  # the adapters really change the output
    assert all(r.finish_reason == "length" and r.completion_tokens == N for r in results)


def test_queued_requests_on_many_adapters_match_references(make_service, adapter_root, tokenizer, references):
    service = make_service(adapter_root=adapter_root)
    service.engine.eos_ids = set()
    jobs = {(name, i): service.submit(name or service.base_name,
                                      GenerationRequest(tokenizer(PROMPTS[i]).input_ids, max_tokens=N,
                                                        temperature=0))
            for i in range(4) for name in ["a", "b", "c", None]}
    done, not_done = wait(jobs.values(), timeout=60)
    assert not not_done
    assert {k: f.result().token_ids for k, f in jobs.items()} == references
    assert all(a.refs == 0 for a in service.registry.loaded())  # every hold was released


def test_rows_leave_at_their_own_length_and_the_rest_stay_exact(make_service, adapter_root, tokenizer, references):
    service = make_service({n: adapter_root / n for n in "ab"})
    service.engine.eos_ids = set()
    ka, kb = service.registry.acquire("a"), service.registry.acquire("b")
    lengths = [2, N, 5, N]
    requests = [GenerationRequest(tokenizer(PROMPTS[i]).input_ids, adapter=k, max_tokens=m)
                for i, (k, m) in enumerate(zip([ka, kb, None, ka], lengths))]
    for r in requests:
        r.temperature = 0
    results = service.engine.generate(requests)
    expected = [references[("a", 0)][:2], references[("b", 1)], references[(None, 2)][:5], references[("a", 3)]]
    assert [r.token_ids for r in results] == expected


def test_eos_ends_a_row_with_stop(make_service, adapter_root, tokenizer, references):
    service = make_service({"a": adapter_root / "a"})
    key = service.registry.acquire("a")
    eos = references[("a", 0)][3]
    service.engine.eos_ids = {eos}
    first = references[("a", 0)].index(eos)
    [result] = service.engine.generate([GenerationRequest(tokenizer(PROMPTS[0]).input_ids, adapter=key,
                                                          max_tokens=N, temperature=0)])
    assert result.finish_reason == "stop"
    assert result.token_ids == references[("a", 0)][:first]  # EOS itself is not part of the completion
    assert result.completion_tokens == first + 1


def test_stop_string_cuts_the_text(make_service, adapter_root, tokenizer, references):
    service = make_service({"b": adapter_root / "b"})
    service.engine.eos_ids = set()
    key = service.registry.acquire("b")
    full = tokenizer.decode(references[("b", 1)], skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = full[: full.find(stop)]
    [result] = service.engine.generate([GenerationRequest(tokenizer(PROMPTS[1]).input_ids, adapter=key,
                                                          max_tokens=N, temperature=0, stop=[stop, "zzzz"])])
    assert result.finish_reason == "stop" and result.text == cut and stop not in result.text
    assert result.completion_tokens < N


def test_streamed_pieces_add_up_to_the_text(make_service, adapter_root, tokenizer):
    service = make_service({"c": adapter_root / "c"})
    pieces = []
    req = GenerationRequest(tokenizer(PROMPTS[2]).input_ids, adapter=service.registry.acquire("c"),
                            max_tokens=N, temperature=0.9, seed=1, on_text=pieces.append)
    [result] = service.engine.generate([req])
    assert "".join(pieces) == result.text and len(pieces) > 1


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(make_service, adapter_root, tokenizer):
    service = make_service({n: adapter_root / n for n in "ab"})
    service.engine.eos_ids = set()
    ka, kb = service.registry.acquire("a"), service.registry.acquire("b")
    ids = tokenizer(PROMPTS[0]).input_ids

    def sample(seed, top_p=1.0, others=()):
        reqs = [GenerationRequest(ids, adapter=ka, max_tokens=N, temperature=1.5, top_p=top_p, seed=seed)]
        reqs += [GenerationRequest(tokenizer(p).input_ids, adapter=kb, max_tokens=3, temperature=1.0, seed=9)
                 for p in others]
        return service.engine.generate(reqs)[0].token_ids

    alone = sample(7)
    assert sample(7, others=PROMPTS[1:4]) == alone
    assert sample(8) != alone
    greedy = service.engine.generate([GenerationRequest(ids, adapter=ka, max_tokens=N, temperature=0)])[0]
    assert sample(7, top_p=1e-6) == greedy.token_ids  # a tiny nucleus keeps only the most likely token


def test_method_without_row_adapters_is_batched_alone(make_service, adapter_root, base_dir, tokenizer, references):
    service = make_service(adapter_root=adapter_root)
    service.engine.eos_ids = set()
    prompts = [PROMPTS[0], PROMPTS[3]]  # different lengths: left padding inside the prompt-tuning wave
    jobs = [service.submit("soft", GenerationRequest(tokenizer(p).input_ids, max_tokens=6, temperature=0))
            for p in prompts]
    jobs.append(service.submit("a", GenerationRequest(tokenizer(PROMPTS[0]).input_ids, max_tokens=N,
                                                      temperature=0)))
    loaded = {a.name: a for a in service.registry.loaded()}
    assert not loaded["soft"].mixed and loaded["a"].mixed
    got = [f.result(timeout=60).token_ids for f in jobs]
    soft = reference_greedy(base_dir, adapter_root / "soft", [tokenizer(p).input_ids for p in prompts], 6)
    assert got == [*soft, references[("a", 0)]]


def test_merged_adapter_serves_its_tokens_from_the_base(make_service, adapter_root, tokenizer, references):
    service = make_service({"a": adapter_root / "a"}, merge="a")
    service.engine.eos_ids = set()
    assert service.base_name == "a" and service.registry.loaded() == []
    assert adapter_state(service.engine.model).methods == {}  # no adapter left: zero overhead
    ids = tokenizer(PROMPTS[0]).input_ids
    result = service.submit("a", GenerationRequest(ids, max_tokens=N, temperature=0)).result(timeout=60)
    assert result.token_ids == references[("a", 0)]


def test_limits_are_checked_before_queueing(make_service, tokenizer):
    from tunelab.serve.errors import BadRequest

    service = make_service(max_tokens_limit=20)
    ids = tokenizer(PROMPTS[0]).input_ids
    for bad, field in ((GenerationRequest(ids, max_tokens=21), "max_tokens"),
                       (GenerationRequest([], max_tokens=2), "prompt"),
                       (GenerationRequest(ids * 40, max_tokens=20), "max_tokens")):  # beyond the 128 context
        with pytest.raises(BadRequest) as err:
            service.submit(service.base_name, bad)
        assert err.value.param == field


@pytest.mark.parametrize("stops, tokens, streamed", [
    (["END"], ["ab", "cE", "N", "Dx"], ["ab", "c", "", ""]),  # "E", "EN" held back: they may start "END"
    (["xyz"], ["ab", "cd"], ["ab", "cd"]),
    ([], ["a\ufffd", "\ufffdb"], ["a", "\ufffd\ufffdb"]),  # an unfinished UTF-8 character waits
])
def test_stop_text_holds_back_what_may_still_change(stops, tokens, streamed):
    text, out = StopText(stops), []
    decoded = ""
    for piece in tokens:
        decoded += piece
        text.update(decoded)
        out.append(text.new_text())
        if text.stopped:
            break
    assert [o for o in out] == streamed
    if stops == ["END"]:
        assert text.stopped and text.text == "abc"


def test_greedy_is_argmax():
    from tunelab.serve.sampling import next_token, row_generator

    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    assert next_token(logits, 0.0, 1.0, row_generator(0)) == 1
    assert {next_token(logits, 1.0, 0.4, row_generator(s)) for s in range(20)} == {1}  # p = .07 .48 .02 .43
    assert {next_token(logits, 5.0, 1.0, row_generator(s)) for s in range(50)} == {0, 1, 2, 3}


def test_queued_rows_join_a_running_batch_and_stay_exact(make_service, adapter_root, base_dir, tokenizer):
    service = make_service({n: adapter_root / n for n in "ab"})
    service.engine.eos_ids = set()
    long_ids, gate, started = tokenizer("hi").input_ids, threading.Event(), threading.Event()

    def hold_once(_):
        if not started.is_set():
            started.set()
            assert gate.wait(30)

    finished = []
    running = service.submit("a", GenerationRequest(long_ids, max_tokens=30, temperature=0, on_text=hold_once))
    running.add_done_callback(lambda _: finished.append("a"))
    assert started.wait(30)  # the batch is running (paused between steps)
    joiners = {name: service.submit(name, GenerationRequest(tokenizer(p).input_ids, max_tokens=4, temperature=0))
               for name, p in (("b", PROMPTS[3]), (service.base_name, "fox"))}  # longer and shorter caches
    for name, f in joiners.items():
        f.add_done_callback(lambda _, n=name: finished.append(n))
    gate.set()
    assert running.result(timeout=60).token_ids == reference_greedy(base_dir, adapter_root / "a", [long_ids], 30)[0]
    assert joiners["b"].result(timeout=60).token_ids == \
        reference_greedy(base_dir, adapter_root / "b", [tokenizer(PROMPTS[3]).input_ids], 4)[0]
    assert joiners[service.base_name].result(timeout=60).token_ids == \
        reference_greedy(base_dir, None, [tokenizer("fox").input_ids], 4)[0]
    assert finished[-1] == "a"  # the newcomers finished inside the running batch, not after it
    assert next(service.engine.waves) == 1  # one batch: they joined it


def _forward_rows(model):
    """Record (rows, positions fed) of every top-level forward of `model`."""
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)),
                                             with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("running_tokens", [30, 4])  # the running row outlasts the joiners' prefill, or not
def test_joiners_prefill_in_chunks_between_decode_steps_and_stay_exact(make_service, adapter_root, base_dir,
                                                                      tokenizer, running_tokens):
    service = make_service({n: adapter_root / n for n in "ab"})
    service.engine.eos_ids = set()
    service.engine.prefill_chunk = 2  # two joining rows: one prompt column per chunk
    long_ids, gate, started = tokenizer("hi").input_ids, threading.Event(), threading.Event()

    def hold_once(_):
        if not started.is_set():
            started.set()
            assert gate.wait(30)

    running = service.submit("a", GenerationRequest(long_ids, max_tokens=running_tokens, temperature=0,
                                                    on_text=hold_once))
    assert started.wait(30)
    prompts = {"b": tokenizer(PROMPTS[3]).input_ids, service.base_name: tokenizer("fox jumps").input_ids}
    seen, handle = _forward_rows(service.engine.model)
    try:
        joiners = {name: service.submit(name, GenerationRequest(ids, max_tokens=4, temperature=0))
                   for name, ids in prompts.items()}
        gate.set()
        assert running.result(timeout=60).token_ids == \
            reference_greedy(base_dir, adapter_root / "a", [long_ids], running_tokens)[0]
        for name, ids in prompts.items():
            want = reference_greedy(base_dir, adapter_root / name if name == "b" else None, [ids], 4)[0]
            assert joiners[name].result(timeout=60).token_ids == want
    finally:
        handle.remove()
    width = max(len(ids) for ids in prompts.values())
    assert (2, width) not in seen and seen.count((2, 1)) >= width  # the joiners' prompts: one column a forward
    if running_tokens == 30:  # a decode step of the running row after every chunk; after the last, of all three
        first = seen.index((2, 1))
        assert seen[first:first + 2 * width] == [(2, 1), (1, 1)] * (width - 1) + [(2, 1), (3, 1)]
    assert next(service.engine.waves) == 1
