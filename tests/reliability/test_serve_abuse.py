"""`tunelab serve` under abuse (issue 15), against a live server on loopback: one request never fails another,
bad fields are 400s naming the field, and the limits hold (body size, stop strings, model names, the API key).

Each test is bounded: a handful of requests, httpx timeouts, and threads joined with a deadline.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from serve.helpers import (  # noqa: F401  (fixtures)
    PROMPTS, ForwardGate, adapter_root, base_dir, make_service, one_thread, wait_until,
)

from tunelab.serve.api import create_app
from tunelab.serve.server import running


def _error(response, status: int, param: str | None = "unchecked") -> str:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "\n" not in err["message"]
    if param != "unchecked":
        assert err["param"] == param, err
    return err["message"]


@pytest.fixture
def live(make_service, adapter_root):
    """A live server with adapters a and b given at start; yields (service, httpx client)."""
    service = make_service({"a": adapter_root / "a", "b": adapter_root / "b"}, max_tokens_limit=32)
    service.engine.eos_ids = set()  # every answer is exactly max_tokens tokens
    with running(create_app(service)) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield service, http


def _post(http, path: str, body: dict):
    """POST `body` as ASCII JSON, so lone surrogates travel as `\\ud800` escapes, as a client's JSON may send them."""
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def _text(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


# --- one request never fails another ------------------------------------------------------------------------

def test_poisoned_temperature_in_a_batch_fails_no_other_request(live):
    service, http = live
    base = service.base_name
    normal = [{"model": m, "prompt": PROMPTS[i], "max_tokens": 8, **sampling} for i, (m, sampling) in enumerate([
        (base, {"temperature": 0}), ("a", {"temperature": 0}), ("b", {"temperature": 0.9, "seed": 7}),
        ("a", {"temperature": 1.3, "top_p": 0.8, "seed": 3}), (base, {"temperature": 0.7, "seed": 11})])]
    poisoned = {"model": "a", "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 1e-45}
    serial = [_text(http.post("/v1/completions", json=b)) for b in normal]
    greedy = _text(http.post("/v1/completions", json={**poisoned, "temperature": 0}))

    gate = ForwardGate(service.engine.model)
    try:
        gate.close()  # a lead request holds the engine in its first forward while the six queue behind it
        answers: dict[int, httpx.Response] = {}
        bodies = [poisoned, *normal]
        lead = threading.Thread(target=lambda: http.post("/v1/completions", json={**normal[0], "max_tokens": 2}))
        lead.start()
        wait_until(lambda: gate.waiting == 1, what="the lead request's forward")
        threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, http.post("/v1/completions",
                                                                                         json=bodies[i])))
                   for i in range(len(bodies))]
        for t in threads:
            t.start()
        wait_until(lambda: len(service.engine._pending) == 6, what="six queued requests")
        gate.open()  # the six join the running batch together, as one prefill
        for t in [lead, *threads]:
            t.join(60)
    finally:
        gate.remove()
    assert not any(t.is_alive() for t in threads)
    assert [_text(answers[i + 1]) for i in range(5)] == serial
    assert _text(answers[0]) == greedy  # a temperature below the floor is greedy


def test_a_row_whose_sampling_raises_ends_alone(make_service, adapter_root, tokenizer):
    from tunelab.serve.engine import GenerationRequest

    service = make_service({"a": adapter_root / "a"})
    service.engine.eos_ids = set()
    ids = tokenizer(PROMPTS[0]).input_ids

    def boom(_):
        raise RuntimeError("a streaming callback failed")

    requests = [GenerationRequest(ids, adapter=k, max_tokens=5, temperature=0) for k in (None, "serve_0")]
    alone = service.engine.generate([GenerationRequest(ids, adapter=k, max_tokens=5, temperature=0)
                                     for k in (None, "serve_0")])
    bad = GenerationRequest(ids, max_tokens=5, temperature=0, on_text=boom)
    futures = [service.engine.submit(r) for r in (requests[0], bad, requests[1])]
    with pytest.raises(RuntimeError, match="streaming callback failed"):
        futures[1].result(timeout=60)
    assert [futures[i].result(timeout=60).token_ids for i in (0, 2)] == [r.token_ids for r in alone]


@pytest.mark.parametrize("temperature, top_p", [(1e-45, 1.0), (5e-4, 0.9), (float("nan"), 1.0), (1.0, 0.0),
                                                (1.0, float("nan"))])
def test_degenerate_sampling_numbers_are_greedy(temperature, top_p):
    import torch

    from tunelab.serve.sampling import next_token, row_generator

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 30
    assert next_token(logits, temperature, top_p, row_generator(0)) == int(torch.argmax(logits))


def test_nan_logits_fail_their_row_with_a_clear_error():
    import torch

    from tunelab.serve.sampling import SamplingError, next_token, row_generator

    masked = torch.tensor([0.0, float("-inf"), 2.0])  # -inf is only a token that cannot be chosen
    assert next_token(masked, 1.0, 1.0, row_generator(0)) in (0, 2)
    for bad in (torch.tensor([0.0, float("nan")]), torch.tensor([0.0, float("inf")])):
        with pytest.raises(SamplingError, match="NaN or infinite"):
            next_token(bad, 0.0, 1.0, row_generator(0))


# --- inputs that must be 400s naming the field --------------------------------------------------------------

@pytest.mark.parametrize("extra, param, words", [
    ({"seed": 2**63}, "seed", "less than or equal to 9223372036854775807"),
    ({"seed": -(2**63) - 1}, "seed", "greater than or equal to -9223372036854775808"),
    ({"prompt": "hi \ud800 there"}, "prompt", "unicode"),
    ({"stop": ["ok", "\udfff"]}, "stop.1", "unicode"),
    ({"max_tokens": "8"}, "max_tokens", "valid integer"),
    ({"max_tokens": True}, "max_tokens", "valid integer"),
    ({"stream": "yes"}, "stream", "valid boolean"),
    ({"temperature": "0.5"}, "temperature", "valid number"),
    ({"stop": "x" * 257}, "stop", "at most 256 characters"),
    ({"model": "a/" * 5000 + "a"}, "model", "at most 256 characters"),
])
def test_bad_fields_are_400s_naming_the_field(live, extra, param, words):
    _, http = live
    body = {"model": "a", "prompt": "hello", "max_tokens": 2, **extra}
    message = _error(_post(http, "/v1/completions", body), 400, param.split(".")[0])
    assert message.startswith(f"field '{param}'") and words in message.lower()
    assert _text(http.post("/v1/completions", json={"model": "a", "prompt": "hello", "max_tokens": 2}))


def test_lone_surrogate_in_chat_content_is_a_400(live):
    _, http = live
    body = {"model": "a", "messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 2}
    message = _error(_post(http, "/v1/chat/completions", body), 400, "messages")
    assert "messages.0.content" in message and "lone surrogate" in message


def test_integer_temperature_is_still_a_number(live):
    _, http = live
    assert _text(http.post("/v1/completions", json={"model": "a", "prompt": "hi", "max_tokens": 2,
                                                    "temperature": 1, "top_p": 1}))


# --- limits ---------------------------------------------------------------------------------------------------

def test_oversized_body_is_a_413_before_it_is_read(live):
    from tunelab.serve.guard import MAX_BODY_BYTES

    service, http = live
    big = b'{"model": "a", "prompt": "' + b"x" * (MAX_BODY_BYTES + 1) + b'"}'
    message = _error(http.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413)
    assert f"more than {MAX_BODY_BYTES} bytes" in message

    def chunks():  # no Content-Length: refused as the count passes the limit
        for _ in range(MAX_BODY_BYTES // 2**16 + 2):
            yield b" " * 2**16

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "body_too_large" == r.json()["error"]["code"] and r.status_code == 413
    assert _text(http.post("/v1/completions", json={"model": "a", "prompt": "hello", "max_tokens": 2}))


def test_slow_body_is_a_408(make_service):
    import socket

    service = make_service()
    with running(create_app(service, body_timeout_s=0.5)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: 100\r\n\r\n{\"model\"")
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in reply


# --- who may use the server -------------------------------------------------------------------------------------

def test_api_key_is_required_on_every_v1_route(make_service, adapter_root):
    service = make_service(adapter_root=adapter_root)
    with running(create_app(service, api_key="s3cret")) as url, httpx.Client(base_url=url, timeout=60) as http:
        ask = {"model": "a", "prompt": "hi", "max_tokens": 2}
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            assert "invalid_api_key" == http.post("/v1/completions", json=ask, headers=headers).json()["error"]["code"]
            assert http.get("/v1/models", headers=headers).status_code == 401
            assert http.post("/v1/chat/completions", json=ask, headers=headers).status_code == 401
        assert service.registry.loaded() == []  # nobody without the key triggered a load
        good = {"authorization": "Bearer s3cret"}
        assert _text(http.post("/v1/completions", json=ask, headers=good))
        assert http.get("/health").status_code == 200 and http.get("/ready").status_code == 200


def test_docs_are_served_only_when_asked(make_service):
    service = make_service()
    with running(create_app(service)) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert [http.get(p).status_code for p in ("/docs", "/redoc", "/openapi.json")] == [404] * 3
    with running(create_app(service, docs=True)) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert [http.get(p).status_code for p in ("/docs", "/redoc", "/openapi.json")] == [200] * 3


@pytest.mark.parametrize("host, env_key, warned", [("0.0.0.0", None, True), ("0.0.0.0", "k", False),
                                                   ("127.0.0.1", None, False), ("::1", None, False)])
def test_open_host_without_a_key_warns_in_one_line(monkeypatch, caplog, host, env_key, warned):
    from tunelab.serve import server

    keys = []

    def stop_here(*a, **k):  # the key and the warning are settled before the model loads
        raise SystemExit

    monkeypatch.setattr(server, "build_service", stop_here)
    monkeypatch.setattr(server, "create_app", lambda service, **kw: keys.append(kw["api_key"]))
    if env_key:
        monkeypatch.setenv("TUNELAB_API_KEY", env_key)
    else:
        monkeypatch.delenv("TUNELAB_API_KEY", raising=False)
    with caplog.at_level("WARNING", logger="tunelab.serve"), pytest.raises(SystemExit):
        server.serve("m", {}, host=host)
    lines = [r.getMessage() for r in caplog.records if "no --api-key" in r.getMessage()]
    assert len(lines) == int(warned) and all("\n" not in line and host in line for line in lines)


# --- connections that hold descriptors --------------------------------------------------------------------------

@pytest.mark.parametrize("sent", [b"", b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-"])
def test_stalled_headers_close_the_connection(make_service, monkeypatch, sent):
    import socket

    from tunelab.serve import server

    monkeypatch.setattr(server.HeaderDeadlineProtocol, "header_timeout_s", 0.5)
    with running(create_app(make_service())) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(sent)
            assert sock.recv(4096) == b""  # closed by the server, well before the 5 s socket timeout
        with httpx.Client(base_url=url, timeout=10) as http:  # a prompt client is served as before
            assert http.get("/health").status_code == 200


# --- adapters whose numbers are not finite ----------------------------------------------------------------------

@pytest.fixture
def non_finite_root(tmp_path, adapter_root):
    """Copies of adapter a: one with a NaN in a weight, one with lora_alpha = Infinity in its config."""
    import shutil

    from safetensors.torch import load_file, save_file

    root = tmp_path / "root"
    for name in ("fine", "nanweights", "infalpha"):
        shutil.copytree(adapter_root / "a", root / name)
    weights = root / "nanweights" / "adapter_model.safetensors"
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, weights)
    cfg = root / "infalpha" / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "lora_alpha": float("inf")}))
    return root, first


def test_non_finite_adapters_are_refused_naming_the_tensor_or_key(make_service, non_finite_root):
    root, tensor = non_finite_root
    service = make_service(adapter_root=root)
    with running(create_app(service)) as url, httpx.Client(base_url=url, timeout=60) as http:
        ask = {"prompt": "hello", "max_tokens": 4, "temperature": 0.8}
        message = _error(http.post("/v1/completions", json={**ask, "model": "nanweights"}), 400, "model")
        assert f"tensor {tensor!r}" in message and "NaN or infinite" in message
        message = _error(http.post("/v1/completions", json={**ask, "model": "infalpha"}), 400, "model")
        assert "key 'lora_alpha' is not a finite number" in message
        assert [a.name for a in service.registry.loaded()] == []
        assert _text(http.post("/v1/completions", json={**ask, "model": "fine"}))


def test_cli_takes_the_key_from_the_option_or_the_environment(monkeypatch):
    from tunelab import cli
    from tunelab.serve import server

    seen = []
    monkeypatch.setattr(server, "serve", lambda model, adapters, **kw: seen.append((kw["api_key"], kw["docs"])))
    monkeypatch.setenv("TUNELAB_API_KEY", "from-env")
    assert cli.main(["serve", "--model", "m"]) == 0
    assert cli.main(["serve", "--model", "m", "--api-key", "given", "--docs"]) == 0
    assert seen == [("from-env", False), ("given", True)]
