"""RELIABILITY.md cases 25-28: `tunelab serve` under hostile adapter names, adapter churn, limits and floods."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from serve.helpers import (  # noqa: F401  (fixtures)
    PROMPTS, adapter_root, base_dir, make_adapter, make_service, one_thread, reference_greedy,
)

from tunelab.methods.base import adapter_state
from tunelab.serve.api import create_app
from tunelab.serve.engine import GenerationRequest
from tunelab.serve.errors import AdapterRejected
from tunelab.serve.server import running

_OPENED: list[str] | None = None  # paths Python opens while a test records them (an audit hook)


def _audit(event, args):
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, Path)):
        _OPENED.append(str(args[0]))


sys.addaudithook(_audit)


@pytest.fixture
def opened(monkeypatch):
    """Every file opened during the test: Python's opens and safetensors' own (native) ones."""
    global _OPENED
    import safetensors.torch

    _OPENED = seen = []
    real = safetensors.torch.safe_open
    monkeypatch.setattr(safetensors.torch, "safe_open", lambda f, *a, **k: (seen.append(str(f)), real(f, *a, **k))[1])
    yield seen
    _OPENED = None


def _error(response, status: int) -> str:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "\n" not in err["message"]
    return err["message"]


# --- case 25 ------------------------------------------------------------------------------------------------

@pytest.fixture
def hostile_root(tmp_path, adapter_root):
    """A root holding a valid adapter, a symlink to a real adapter outside it, and an adapter dir whose files
    link outside; the outside adapter is valid, so only the root check keeps it out."""
    outside = tmp_path / "outside"
    shutil.copytree(adapter_root / "b", outside / "evil")
    root = tmp_path / "root"
    shutil.copytree(adapter_root / "a", root / "good")
    (root / "link").symlink_to(outside / "evil", target_is_directory=True)
    (root / "inner").mkdir()
    for f in (outside / "evil").iterdir():
        (root / "inner" / f.name).symlink_to(f)
    return root, outside


def test_case25_names_outside_the_adapter_root_are_rejected_unread(make_service, hostile_root, opened):
    root, outside = hostile_root
    service = make_service(adapter_root=root)
    client = TestClient(create_app(service))
    ask = {"prompt": "hi", "max_tokens": 2}
    for name, words in [("../outside/evil", "'..'"), (str(outside / "evil"), "absolute path"),
                        ("good/../../outside/evil", "'..'"), ("link", "resolves outside the adapter root"),
                        ("inner", "links outside the adapter root")]:
        message = _error(client.post("/v1/completions", json={**ask, "model": name}), 400)
        assert words in message and repr(name) in message
        assert str(outside) not in message.replace(repr(name), "")  # no server paths beyond the request's own
    assert not [p for p in opened if Path(p).resolve().is_relative_to(outside.resolve())]
    assert client.post("/v1/completions", json={**ask, "model": "good"}).status_code == 200
    assert [a.name for a in service.registry.loaded()] == ["good"]
    # the spy does see adapter reads (root adapters are read through a directory descriptor into a private copy,
    # so their opens name the file alone, or the copy)
    read = {Path(p).name for p in opened}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= read


# --- case 26 ------------------------------------------------------------------------------------------------

def _gated_request(service, name, prompt_ids, n):
    """Submit a request whose generation pauses at its first text until `gate` is set: it stays in flight."""
    gate, started = threading.Event(), threading.Event()

    def on_text(_):
        started.set()
        assert gate.wait(60)

    future = service.submit(name, GenerationRequest(prompt_ids, max_tokens=n, temperature=0, on_text=on_text))
    assert started.wait(30)
    return future, gate


def test_case26_busy_adapter_survives_eviction_and_in_flight_is_unaffected(make_service, adapter_root, base_dir,
                                                                            tokenizer):
    service = make_service(adapter_root=adapter_root, max_adapters=2)
    service.engine.eos_ids = set()
    client = TestClient(create_app(service))
    ids = tokenizer(PROMPTS[0]).input_ids
    expected = reference_greedy(base_dir, adapter_root / "a", [ids], 12)[0]
    in_flight, gate = _gated_request(service, "a", ids, 12)  # a: loaded first, so least recently used
    service.registry.release(service.registry.acquire("b"))  # slots: a (busy), b (idle)
    ask = {"model": "c", "prompt": PROMPTS[1], "max_tokens": 3, "temperature": 0}
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(client.post("/v1/completions", json=ask)))
    waiting.start()  # loads c, evicting idle b rather than older busy a, then queues behind the gated wave
    deadline = time.monotonic() + 30
    while {a.name for a in service.registry.loaded()} != {"a", "c"}:
        assert time.monotonic() < deadline, [a.name for a in service.registry.loaded()]
        time.sleep(0.01)
    gate.set()
    assert in_flight.result(timeout=60).token_ids == expected
    waiting.join(60)
    assert answers[0].status_code == 200, answers[0].text


def test_case26_all_adapters_busy_is_a_clear_503(make_service, adapter_root, tokenizer):
    service = make_service(adapter_root=adapter_root, max_adapters=1, slot_wait_s=0)  # no wait for a slot
    client = TestClient(create_app(service))
    in_flight, gate = _gated_request(service, "a", tokenizer(PROMPTS[0]).input_ids, 5)
    r = client.post("/v1/completions", json={"model": "b", "prompt": "hi", "max_tokens": 2})
    assert "all 1 adapter slots (--max-adapters) are in use" in _error(r, 503)
    assert r.json()["error"]["code"] == "adapter_slots_busy"
    gate.set()
    assert in_flight.result(timeout=60).finish_reason in ("stop", "length")
    assert client.post("/v1/completions", json={"model": "b", "prompt": "hi", "max_tokens": 2}).status_code == 200


# --- case 27 ------------------------------------------------------------------------------------------------

@pytest.fixture
def odd_root(tmp_path, adapter_root, base_dir):
    """Adapters the server must refuse: rank 16 (limit 8), a peft_type tunelab lacks, a whole model,
    a classification adapter, a truncated weights file, a config that is not JSON, one without peft_type."""
    root = tmp_path / "odd"
    shutil.copytree(adapter_root / "d", root / "wide")
    shutil.copytree(base_dir, root / "wholemodel")

    def variant(name, edit_config=None, edit_weights=None):
        shutil.copytree(adapter_root / "a", root / name)
        cfg = root / name / "adapter_config.json"
        if edit_config:
            cfg.write_text(edit_config(json.loads(cfg.read_text())))
        if edit_weights:
            edit_weights(root / name / "adapter_model.safetensors")

    variant("loha", lambda c: json.dumps({**c, "peft_type": "LOHA"}))
    variant("classifier", lambda c: json.dumps({**c, "task_type": "SEQ_CLS"}))
    variant("notjson", lambda c: "{peft_type: LORA")
    variant("nopeft", lambda c: json.dumps({k: v for k, v in c.items() if k != "peft_type"}))
    variant("truncated", edit_weights=lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]))
    variant("badheader", edit_weights=lambda p: p.write_bytes(b"\xff" * 8 + b"{}" + p.read_bytes()[10:]))
    shutil.copytree(adapter_root / "a", root / "fine")
    return root


@pytest.mark.parametrize("name, words", [
    ("wide", "rank 16 is above the server limit --max-rank 8"),
    ("loha", "peft_type 'LOHA' is not supported"),
    ("wholemodel", "adapter_config.json: file not found"),
    ("classifier", "task_type 'SEQ_CLS' is not text generation"),
    ("notjson", "not valid JSON"),
    ("nopeft", "no 'peft_type' field"),
    ("truncated", "not a readable safetensors file"),
    ("badheader", "not a readable safetensors file"),
])
def test_case27_over_rank_unsupported_or_corrupt_adapters_are_400s(make_service, odd_root, name, words):
    service = make_service(adapter_root=odd_root, max_rank=8)
    client = TestClient(create_app(service))
    message = _error(client.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2}), 400)
    assert message.startswith(f"adapter {name!r}") and words in message
    assert str(odd_root) not in message
    assert service.registry.loaded() == [] and not adapter_state(service.engine.model).methods
    assert client.post("/v1/completions", json={"model": "fine", "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_case27_at_start_the_same_checks_raise_one_line_errors(make_service, odd_root):
    with pytest.raises(AdapterRejected, match=r"adapter 'wide': rank 16 is above the server limit --max-rank 8"):
        make_service({"wide": odd_root / "wide"}, max_rank=8)
    with pytest.raises(AdapterRejected, match="adapter 'truncated': cannot be loaded"):
        make_service({"truncated": odd_root / "truncated"})


# --- case 28 ------------------------------------------------------------------------------------------------

MALFORMED = [
    (b'{"model": "a", "prompt": ', 400),                                       # bad JSON
    (b'[1, 2, 3]', 400),                                                       # not an object
    (json.dumps({"model": "a"}).encode(), 400),                                # missing prompt
    (json.dumps({"prompt": "hi"}).encode(), 400),                              # missing model
    (json.dumps({"model": "nope", "prompt": "hi"}).encode(), 404),             # unknown adapter
    (json.dumps({"model": "../a", "prompt": "hi"}).encode(), 400),             # outside the root
    (json.dumps({"model": "a", "prompt": "hi", "max_tokens": -3}).encode(), 400),
    (json.dumps({"model": "a", "prompt": "hi", "max_tokens": 10**9}).encode(), 400),
    (json.dumps({"model": "a", "prompt": "hi", "temperature": "hot"}).encode(), 400),
    (json.dumps({"model": "broken", "prompt": "hi"}).encode(), 400),           # a corrupt adapter load
    (json.dumps({"model": "a", "prompt": "hi" * 100_000}).encode(), 400),      # far beyond the context
]


def test_case28_floods_of_malformed_requests_leave_valid_ones_working(make_service, adapter_root, tmp_path):
    root = tmp_path / "root"
    for name in "abc":
        shutil.copytree(adapter_root / name, root / name)
    shutil.copytree(adapter_root / "a", root / "broken")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"\x00" * 7)
    service = make_service(adapter_root=root, max_tokens_limit=32)
    valid = {n: {"model": n, "prompt": PROMPTS[i], "max_tokens": 6, "temperature": 0} for i, n in enumerate("ab")}
    with running(create_app(service)) as url, httpx.Client(base_url=url, timeout=60) as http:
        expected = {n: http.post("/v1/completions", json=b).json()["choices"][0]["text"] for n, b in valid.items()}
        bad, good = [], []

        def flood(k):
            for i in range(12):
                body, status = MALFORMED[(k + i) % len(MALFORMED)]
                r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
                bad.append((r.status_code == status and "error" in r.json(), body[:40], r.status_code))
            http.post("/v1/completions", json={"model": "c", "prompt": "hi", "max_tokens": 2})  # an adapter load

        def use(name):
            for _ in range(4):
                r = http.post("/v1/completions", json=valid[name])
                good.append(r.status_code == 200 and r.json()["choices"][0]["text"] == expected[name])

        threads = [threading.Thread(target=flood, args=(k,)) for k in range(6)]
        threads += [threading.Thread(target=use, args=(n,)) for n in "ab"]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads) and time.monotonic() - start < 120
        assert len(bad) == 72 and [b for b in bad if not b[0]] == []
        assert good == [True] * 8
        assert http.get("/health").json() == {"status": "ok"}
    assert all(a.refs == 0 for a in service.registry.loaded())
