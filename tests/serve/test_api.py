"""The OpenAI-compatible HTTP API: response and error shapes, chat template, streaming, a real server."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient
from serve.helpers import PROMPTS, adapter_root, base_dir, make_service, one_thread  # noqa: F401  (fixtures)

from tunelab.serve.api import create_app
from tunelab.serve.server import running


@pytest.fixture
def client(make_service, adapter_root):
    service = make_service({"a": adapter_root / "a"}, adapter_root=adapter_root, max_tokens_limit=64)
    with TestClient(create_app(service)) as c:
        c.service = service
        yield c


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "\n" not in body["error"]["message"]
    return body["error"]


def test_models_lists_the_base_and_loaded_adapters(client):
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == [client.service.base_name, "a"]
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in data["data"])
    client.post("/v1/completions", json={"model": "b", "prompt": "hi", "max_tokens": 1})  # loads b on demand
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [client.service.base_name, "b", "a"]


def test_completion_shape_and_usage(client, tokenizer):
    r = client.post("/v1/completions", json={"model": "a", "prompt": PROMPTS[0], "max_tokens": 5,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "a" and body["id"].startswith("cmpl-")
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(tokenizer(PROMPTS[0]).input_ids)
    assert 1 <= usage["completion_tokens"] <= 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    again = client.post("/v1/completions", json={"model": "a", "prompt": PROMPTS[0], "max_tokens": 5,
                                                 "temperature": 0}).json()
    assert again["choices"][0]["text"] == choice["text"]  # greedy is deterministic


def test_chat_uses_the_chat_template(client, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPTS[1]}]
    r = client.post("/v1/chat/completions", json={"model": "a", "messages": messages, "max_tokens": 4,
                                                  "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert body["usage"]["prompt_tokens"] == len(tokenizer(text, add_special_tokens=False).input_ids)
    # the template writes the special tokens itself: none are added on top
    assert client.service.encode_chat(messages) == tokenizer(text, add_special_tokens=False).input_ids


def test_stop_strings_and_seeds_through_the_api(client):
    ask = {"model": "a", "prompt": PROMPTS[2], "max_tokens": 12, "temperature": 0}
    full = client.post("/v1/completions", json=ask).json()["choices"][0]["text"]
    assert len(full) >= 6
    stop = full[4:6]
    cut = client.post("/v1/completions", json={**ask, "stop": stop}).json()["choices"][0]
    assert cut == {"index": 0, "text": full[: full.find(stop)], "logprobs": None, "finish_reason": "stop"}
    longer = client.post("/v1/completions", json={**ask, "stop": ["never in a tiny model's text", full[4:9]]})
    assert longer.json()["choices"][0]["text"] == full[: full.find(full[4:9])]
    seeded = {**ask, "temperature": 1.2, "seed": 5}
    texts = [client.post("/v1/completions", json=seeded).json()["choices"][0]["text"] for _ in range(2)]
    assert texts[0] == texts[1]


def test_streaming_sends_the_same_text_as_events(client):
    ask = {"model": "a", "prompt": PROMPTS[3], "max_tokens": 8, "temperature": 0}
    whole = client.post("/v1/completions", json=ask).json()["choices"][0]
    with client.stream("POST", "/v1/completions", json={**ask, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]


def test_chat_streaming_opens_with_the_role(client):
    ask = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=ask).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**ask, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line and line != "data: [DONE]"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole


@pytest.mark.parametrize("body, status, param, words", [
    ({"model": "a"}, 400, "prompt", "Field required"),
    ({"model": "a", "prompt": "x", "max_tokens": -1}, 400, "max_tokens", "greater than or equal to 0"),
    ({"model": "a", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "0 only to score the prompt"),
    ({"model": "a", "prompt": "x", "max_tokens": 65}, 400, "max_tokens", "expected 1 to 64"),
    ({"model": "a", "prompt": "x", "temprature": 1}, 400, "temprature", "Extra inputs"),
    ({"model": "a", "prompt": "x", "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"model": "a", "prompt": "x", "n": 0}, 400, "n", "greater than or equal to 1"),
    ({"model": "a", "prompt": ["x"] * 5, "n": 30}, 400, "n", "at most 128"),
    ({"model": "a", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
    ({"model": "a", "prompt": "x", "logit_bias": {"x": 1}}, 400, "logit_bias", "should match pattern"),
    ({"model": "a", "prompt": "x", "logit_bias": {"999999": 1}}, 400, "logit_bias", "outside the model's vocab"),
    ({"model": "a", "prompt": "x", "logit_bias": {"1": 101}}, 400, "logit_bias", "less than or equal to 100"),
    ({"model": "a", "prompt": "x", "frequency_penalty": 2.5}, 400, "frequency_penalty", "less than or equal to 2"),
    ({"model": "a", "prompt": [1, 999999]}, 400, "prompt", "outside the model's vocabulary"),
    ({"model": "a", "prompt": []}, 400, "prompt", "at least 1 item"),
    ({"model": "a", "prompt": "x", "logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
    ({"model": "a", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4 items"),
    ({"model": "nope", "prompt": "x"}, 404, "model", "'nope'"),
    ({"model": "../a", "prompt": "x"}, 400, "model", "'..'"),
])
def test_bad_requests_get_openai_errors(client, body, status, param, words):
    err = _error(client.post("/v1/completions", json=body), status)
    assert err["param"] == param and words in err["message"]


def test_bad_json_and_unknown_routes(client):
    r = client.post("/v1/completions", content=b'{"model": "a",', headers={"content-type": "application/json"})
    err = _error(r, 400)
    assert "not valid JSON" in err["message"]
    _error(client.post("/v1/chat/completions", json={"model": "a", "messages": []}), 400)
    _error(client.get("/v1/nothing"), 404)


def test_chat_without_template_is_a_clear_400(client, monkeypatch):
    monkeypatch.setattr(client.service.tokenizer, "chat_template", None)
    r = client.post("/v1/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": "hi"}]})
    err = _error(r, 400)
    assert "no chat template" in err["message"] and err["param"] == "messages"


def test_real_server_on_a_free_port(make_service, adapter_root):
    service = make_service({"a": adapter_root / "a"})
    with running(create_app(service)) as url:
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/health").json() == {"status": "ok"}
            r = http.post("/v1/completions", json={"model": "a", "prompt": PROMPTS[0], "max_tokens": 4,
                                                   "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
            assert http.post("/v1/completions", content=b"not json").status_code == 400
    with pytest.raises(httpx.TransportError):  # shut down: nothing listens any more
        httpx.get(url + "/health", timeout=2)


@pytest.mark.parametrize("content, words", [
    ([{"type": "text", "text": "\ud800"}], "lone surrogate"),
    ([{"type": "text", "text": "hi", "extra": 1}], "Extra inputs"),
    ([{"type": "image_url", "image_url": {"url": "x"}}], "messages"),
    ([], "at least 1 item"),
])
def test_bad_text_parts_are_400s_naming_messages(client, content, words):
    body = json.dumps({"model": "a", "messages": [{"role": "user", "content": content}]})
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    err = _error(r, 400)
    assert err["param"] == "messages" and words in err["message"], err
