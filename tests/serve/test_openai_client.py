"""The fields real clients send, through the official `openai` client against a live server (issue 17):
stream_options.include_usage, text parts, penalties and logit_bias, logprobs, echo scoring as lm-eval-harness asks
for it, n, prompt lists, GET /v1/models/{id}, waiting for an adapter slot, and errors naming adapters as given."""

from __future__ import annotations

import threading

import openai
import pytest
import torch
from serve.helpers import PROMPTS, adapter_root, base_dir, make_adapter, make_service, one_thread  # noqa: F401

from tunelab.serve.api import create_app
from tunelab.serve.server import running


@pytest.fixture
def live(make_service, adapter_root):
    """A live server with adapter a given at start and the adapter root; yields (service, openai client)."""
    service = make_service({"a": adapter_root / "a"}, adapter_root=adapter_root, max_tokens_limit=64)
    with running(create_app(service)) as url:
        yield service, openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _hf_model(base_dir, adapter_dir=None):
    """The same model straight from transformers (with `adapter_dir` loaded alone), for reference numbers."""
    from transformers import AutoModelForCausalLM

    from tunelab.artifacts import load_adapter

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if adapter_dir is not None:
        load_adapter(model, adapter_dir, "ref")
    return model


@torch.inference_mode()
def _hf_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1, from one forward of the whole sequence."""
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]


def test_stream_include_usage_ends_with_a_usage_chunk(live):
    service, client = live
    ask = dict(model="a", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    whole = client.completions.create(**ask)
    chunks = list(client.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    chat = dict(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
    *_, last = client.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True})
    assert last.choices == [] and last.usage.completion_tokens == client.chat.completions.create(
        **chat).usage.completion_tokens


def test_content_as_text_parts_is_the_joined_text(live):
    _, client = live
    ask = dict(model="a", max_tokens=6, temperature=0)
    parts = client.chat.completions.create(**ask, messages=[{"role": "user", "content": [
        {"type": "text", "text": PROMPTS[1]}, {"type": "text", "text": PROMPTS[2]}]}])
    plain = client.chat.completions.create(**ask, messages=[{"role": "user",
                                                             "content": f"{PROMPTS[1]}\n{PROMPTS[2]}"}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="content"):
        client.chat.completions.create(**ask, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}])


def _reference_penalised(model, ids: list[int], n: int, frequency: float, presence: float,
                         bias: dict[int, float]) -> list[int]:
    """Greedy decoding with OpenAI's penalty formula, one full forward per token (no cache, no batching)."""
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float()
            logits = logits - counts * frequency - (counts > 0) * presence
            for token, value in bias.items():
                logits[token] += value
            out.append(int(logits.argmax()))
    return out


def test_penalties_and_logit_bias_follow_openais_formula(live, base_dir, adapter_root, tokenizer):
    service, client = live
    service.engine.eos_ids = set()  # every answer is exactly max_tokens tokens
    ids = tokenizer(PROMPTS[3]).input_ids
    model = _hf_model(base_dir, adapter_root / "a")
    bias = {7: 3.0, 11: -100.0}
    expected = _reference_penalised(model, ids, 10, 1.5, 0.5, bias)
    plain = _reference_penalised(model, ids, 10, 0.0, 0.0, {})
    assert expected != plain  # the penalties change this answer, so the check below can fail
    r = client.completions.create(model="a", prompt=ids, max_tokens=10, temperature=0, frequency_penalty=1.5,
                                  presence_penalty=0.5, logit_bias={str(k): v for k, v in bias.items()}, logprobs=0)
    assert r.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    forced = client.completions.create(model="a", prompt=ids, max_tokens=4, temperature=0, logit_bias={"9": 100})
    assert forced.choices[0].text == tokenizer.decode([9] * 4, skip_special_tokens=True)


def test_penalised_rows_in_a_batch_equal_each_alone(make_service, adapter_root, tokenizer):
    """Controls are per row: a mixed batch, and rows that join a running batch, equal the same requests alone."""
    from serve.helpers import ForwardGate, wait_until

    from tunelab.serve.engine import GenerationRequest

    service = make_service({"a": adapter_root / "a"})
    service.engine.eos_ids = set()
    key = service.registry.acquire("a")

    def reqs():
        return [GenerationRequest(tokenizer(PROMPTS[0]).input_ids, max_tokens=8),
                GenerationRequest(tokenizer(PROMPTS[1]).input_ids, adapter=key, max_tokens=8, frequency_penalty=2.0),
                GenerationRequest(tokenizer(PROMPTS[2]).input_ids, max_tokens=8, presence_penalty=-1.0,
                                  logit_bias={5: 2.5}),
                GenerationRequest(tokenizer(PROMPTS[3]).input_ids, adapter=key, max_tokens=8, temperature=0.9,
                                  seed=4, frequency_penalty=0.7)]

    alone = [service.engine.generate([r])[0].token_ids for r in reqs()]
    assert [r.token_ids for r in service.engine.generate(reqs())] == alone
    gate = ForwardGate(service.engine.model)
    try:  # a lead row without controls runs; the others queue and join it (its batch gains controls)
        gate.close()
        lead = service.engine.submit(GenerationRequest(tokenizer(PROMPTS[4]).input_ids, max_tokens=12))
        wait_until(lambda: gate.waiting == 1, what="the lead's forward")
        futures = [service.engine.submit(r) for r in reqs()]
        wait_until(lambda: service.engine.queue_depth() == 4, what="four queued requests")
        gate.open()
        assert [f.result(timeout=60).token_ids for f in futures] == alone
        lead.result(timeout=60)
    finally:
        gate.remove()


@pytest.mark.parametrize("adapter", [None, "a"])
def test_lm_eval_loglikelihood_shape_matches_a_direct_forward(live, base_dir, adapter_root, tokenizer, adapter):
    """lm-eval-harness's completions model: echo, max_tokens 0, logprobs 1, prompt = context + continuation (as
    token ids or text); the continuation's token_logprobs equal the model's own, and is_greedy is readable."""
    service, client = live
    model_name = adapter or service.base_name
    reference = _hf_model(base_dir, adapter_root / adapter if adapter else None)
    pairs = [(PROMPTS[0], " jumps over"), (PROMPTS[1], " today"), (PROMPTS[4], " a model")]
    contexts = [tokenizer(c).input_ids for c, _ in pairs]
    full = [tokenizer(c + x).input_ids for c, x in pairs]
    r = client.completions.create(model=model_name, prompt=full, echo=True, max_tokens=0, logprobs=1,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 0
    for choice, ids, ctx in zip(r.choices, full, contexts):
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx(_hf_logprobs(reference, ids), abs=2e-4)
        continuation = lp.token_logprobs[len(ctx):]
        is_greedy = all(tok >= max(top.values()) - 1e-6 for tok, top in
                        zip(continuation, lp.top_logprobs[len(ctx):]))
        greedy_ref = [int(t) for t in torch.log_softmax(reference(torch.tensor([ids])).logits[0], -1).argmax(-1)]
        assert is_greedy == all(greedy_ref[t - 1] == ids[t] for t in range(len(ctx), len(ids)))
        assert choice.text == tokenizer.decode(ids)
    # the newer lm-eval shape: max_tokens 1 and text prompts; the last token is the generated one
    texts = [c + x for c, x in pairs]
    newer = client.completions.create(model=model_name, prompt=texts, echo=True, max_tokens=1, logprobs=1,
                                      temperature=0)
    for choice, ids in zip(newer.choices, full):
        assert len(choice.logprobs.token_logprobs) == len(ids) + 1
        assert choice.logprobs.token_logprobs[1:-1] == pytest.approx(_hf_logprobs(reference, ids), abs=2e-4)


def test_chat_logprobs_and_top_logprobs(live, base_dir, adapter_root):
    service, client = live
    service.engine.eos_ids = set()
    r = client.chat.completions.create(model="a", messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    assert all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy: the top token
    assert "".join(t.token for t in content) == r.choices[0].message.content
    ids = service.encode_chat([{"role": "user", "content": PROMPTS[2]}])
    generated = service.tokenizer(r.choices[0].message.content, add_special_tokens=False).input_ids
    want = _hf_logprobs(_hf_model(base_dir, adapter_root / "a"), ids + generated)[len(ids) - 1:]
    if len(generated) == 5:  # the text re-tokenizes to the same tokens
        assert [t.logprob for t in content] == pytest.approx(want, abs=2e-4)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="a", messages=[{"role": "user", "content": "x"}], top_logprobs=2)


def test_n_choices_and_prompt_lists(live, tokenizer):
    service, client = live
    ask = dict(model="a", max_tokens=6, temperature=1.3, seed=5)
    r = client.completions.create(**ask, prompt=PROMPTS[0], n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1  # seed + j per choice: they differ
    assert [c.text for c in client.completions.create(**ask, prompt=PROMPTS[0], n=3).choices] == \
        [c.text for c in r.choices]  # and each is reproducible
    assert r.usage.prompt_tokens == len(tokenizer(PROMPTS[0]).input_ids)  # the prompt counts once
    chat = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=4, temperature=0)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content
    greedy = dict(model="a", max_tokens=5, temperature=0)
    one_by_one = [client.completions.create(**greedy, prompt=p).choices[0].text for p in PROMPTS[:3]]
    listed = client.completions.create(**greedy, prompt=PROMPTS[:3], n=2)
    assert [c.text for c in listed.choices] == [t for t in one_by_one for _ in range(2)]
    as_ids = client.completions.create(**greedy, prompt=[tokenizer(p).input_ids for p in PROMPTS[:3]])
    assert [c.text for c in as_ids.choices] == one_by_one
    streamed = list(client.completions.create(**greedy, prompt=PROMPTS[:2], stream=True))
    texts = ["".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == i) for i in (0, 1)]
    assert texts == one_by_one[:2]


def test_retrieve_a_model(live):
    service, client = live
    assert client.models.retrieve(service.base_name).id == service.base_name
    card = client.models.retrieve("a")
    assert card.id == "a" and card.owned_by == "tunelab"
    with pytest.raises(openai.NotFoundError, match="'b' not found"):
        client.models.retrieve("b")  # under the root but not loaded yet


def test_a_request_waits_for_an_adapter_slot(make_service, base_dir, tokenizer, tmp_path):
    """12 concurrent requests over 6 adapters and 2 slots: every one succeeds on its first try."""
    for i in range(6):
        make_adapter(base_dir, tokenizer, tmp_path / f"r{i}", seed=10 + i, r=4, alpha=8, target_modules="all-linear")
    service = make_service(adapter_root=tmp_path, max_adapters=2, max_tokens_limit=32)
    answers: dict[int, object] = {}
    with running(create_app(service)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(i: int) -> None:
            try:
                answers[i] = client.completions.create(model=f"r{i % 6}", prompt=PROMPTS[i % 5], max_tokens=16,
                                                       temperature=0)
            except Exception as err:  # noqa: BLE001  (recorded, then asserted below)
                answers[i] = err

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert all(isinstance(answers[i], openai.types.Completion) for i in range(12)), answers
    assert service.registry.metrics.counters["tunelab_adapter_evictions_total"] >= 4


def test_errors_name_the_adapter_as_the_client_named_it(make_service, base_dir, tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = make_adapter(base_dir, tokenizer, tmp_path / "wrong-shape", seed=8, r=4, alpha=8,
                       target_modules="all-linear")
    weights = load_file(bad / "adapter_model.safetensors")
    first = sorted(weights)[0]
    weights[first] = torch.zeros(weights[first].shape[0] + 1, *weights[first].shape[1:])
    save_file(weights, bad / "adapter_model.safetensors")
    make_adapter(base_dir, tokenizer, tmp_path / "good", seed=9, r=4, alpha=8, target_modules="all-linear")
    service = make_service(adapter_root=tmp_path)
    with running(create_app(service)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        client.completions.create(model="good", prompt="hi", max_tokens=2)  # takes the key serve_0
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="wrong-shape", prompt="hi", max_tokens=2)
    message = err.value.body["message"]
    assert "'wrong-shape'" in message and "shape" in message and "serve_" not in message, message
    key = service.registry.acquire("good")
    assert service.registry.public_text(f"adapter {key!r} failed") == "adapter 'good' failed"
    service.registry.release(key)


def test_streamed_logprobs_add_up_to_the_whole_answers(live):
    _, client = live
    ask = dict(model="a", prompt=PROMPTS[1], max_tokens=10, temperature=0, logprobs=2)
    whole = client.completions.create(**ask).choices[0].logprobs
    pieces = [c.choices[0].logprobs for c in client.completions.create(**ask, stream=True)
              if c.choices and c.choices[0].logprobs]
    assert len(pieces) > 1
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert sum((getattr(p, field) for p in pieces), []) == getattr(whole, field), field
    chat = dict(model="a", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=8, temperature=0,
                logprobs=True, top_logprobs=2)
    whole_chat = client.chat.completions.create(**chat).choices[0].logprobs.content
    streamed = [t for c in client.chat.completions.create(**chat, stream=True)
                if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in whole_chat]


def test_scoring_rows_batch_among_themselves_within_the_logits_budget(make_service, tokenizer, monkeypatch):
    """Echo-scoring rows keep every position's logits: they never share a batch with generating rows, and a
    scoring batch holds at most SCORING_LOGITS numbers; what they score is what each scores alone."""
    from serve.helpers import ForwardGate, wait_until

    from tunelab.serve import engine as engine_module
    from tunelab.serve.engine import GenerationRequest

    service = make_service()
    engine = service.engine
    prompts = [tokenizer(p).input_ids for p in PROMPTS[:3]]

    def scoring():
        return [GenerationRequest(ids, max_tokens=0, prompt_logprobs=1) for ids in prompts]

    alone = [engine.generate([r])[0].prompt_logprobs for r in scoring()]
    width = max(len(ids) for ids in prompts)
    monkeypatch.setattr(engine_module, "SCORING_LOGITS", 2 * width * engine.vocab_size)  # two rows fit
    waves = []
    run_wave = engine._run_wave
    monkeypatch.setattr(engine, "_run_wave", lambda rows, group: (waves.append((len(rows), group)),
                                                                   run_wave(rows, group))[1])
    gate = ForwardGate(engine.model)
    try:
        gate.close()
        lead = engine.submit(GenerationRequest(tokenizer(PROMPTS[4]).input_ids, max_tokens=6))
        wait_until(lambda: gate.waiting == 1, what="the lead's forward")
        futures = [engine.submit(r) for r in scoring()]
        joining = engine.submit(GenerationRequest(tokenizer(PROMPTS[3]).input_ids, max_tokens=3))
        wait_until(lambda: engine.queue_depth() == 4, what="four queued requests")
        gate.open()
        got = [f.result(timeout=60).prompt_logprobs for f in futures]
        lead.result(timeout=60), joining.result(timeout=60)
    finally:
        gate.remove()
    assert [n for n, group in waves if isinstance(group, tuple)] == [2, 1]
    for row, want in zip(got, alone):
        assert row[0] is None and [e.token for e in row[1:]] == [e.token for e in want[1:]]
        assert [e.logprob for e in row[1:]] == pytest.approx([e.logprob for e in want[1:]], abs=1e-4)
