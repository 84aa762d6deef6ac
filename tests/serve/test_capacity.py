"""Capacity goes to live clients (issue 15): dropped streams leave the batch, probes answer under any load.

Forwards are slowed or held by a `ForwardGate`, so the timings below measure scheduling, not the tiny model.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from serve.helpers import PROMPTS, ForwardGate, base_dir, make_service, one_thread, wait_until  # noqa: F401

from tunelab.serve.api import create_app
from tunelab.serve.server import running

STEP_S = 0.03  # one decode step, whatever the batch


@pytest.fixture
def slow_live(make_service):
    """A live server on the base whose every forward takes STEP_S; yields (service, url, gate)."""
    service = make_service(max_tokens_limit=100)
    service.engine.eos_ids = set()  # every answer is exactly max_tokens tokens
    gate = ForwardGate(service.engine.model, delay_s=STEP_S)
    try:
        with running(create_app(service)) as url:
            yield service, url, gate
    finally:
        gate.remove()


def test_dropped_streams_leave_the_batch_at_the_next_step(slow_live):
    service, url, _ = slow_live
    ask = {"model": service.base_name, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=url, timeout=60) as http:
        start = time.monotonic()
        assert http.post("/v1/completions", json=ask).status_code == 200
        idle = time.monotonic() - start

    opened = []

    def hang_up(i):  # read the first chunk of a 100-token stream, then close the connection
        with httpx.Client(base_url=url, timeout=60) as http:
            body = {**ask, "prompt": PROMPTS[i % 5], "max_tokens": 100, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as r:
                opened.append((r.status_code, next(r.iter_lines()).startswith("data: {")))

    threads = [threading.Thread(target=hang_up, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and opened == [(200, True)] * 16
    with httpx.Client(base_url=url, timeout=60) as http:
        start = time.monotonic()
        assert http.post("/v1/completions", json=ask).status_code == 200
        recovery = time.monotonic() - start
    # 16 rows decoding to the end would take 100 steps (3 s); dropped at the next step, they cost a few
    assert recovery < max(1.5, 4 * idle), (recovery, idle)
    wait_until(lambda: service.engine.running == 0, timeout=5, what="no rows left decoding")
    assert service.engine.dropped == 16


def test_clients_that_give_up_waiting_free_their_rows(slow_live):
    service, url, _ = slow_live
    body = {"model": service.base_name, "prompt": PROMPTS[2], "max_tokens": 100, "temperature": 0}

    def give_up():
        with httpx.Client(base_url=url, timeout=0.3) as http, pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=body)

    threads = [threading.Thread(target=give_up) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # 100 steps of 30 ms would take 3 s; the rows leave a step after their clients hang up
    wait_until(lambda: service.engine.dropped == 8 and service.engine.running == 0, timeout=2.0,
               what="all 8 rows dropped")


def test_health_answers_while_every_request_waits(slow_live):
    service, url, gate = slow_live
    ask = {"model": service.base_name, "prompt": PROMPTS[1], "max_tokens": 2, "temperature": 0}
    answers = []
    with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64)) as http:
        post = lambda: answers.append(http.post("/v1/completions", json=ask))  # noqa: E731
        threads = [threading.Thread(target=post) for _ in range(57)]
        gate.close()
        try:
            threads[0].start()  # a lead request holds the engine in its first forward; 56 queue behind it
            wait_until(lambda: gate.waiting == 1, what="the lead request's forward")
            for t in threads[1:]:
                t.start()
            # 39 queued fill the 40 worker threads with the lead: a synchronous handler would wait for one
            wait_until(lambda: len(service.engine._pending) >= 39, what="a full thread pool")
            with httpx.Client(base_url=url, timeout=2) as probe:
                start = time.monotonic()
                assert probe.get("/health").json() == {"status": "ok"}
                assert time.monotonic() - start < 1.0
                wait_until(lambda: len(service.engine._pending) == 56, what="all 56 queued")
                ready = probe.get("/ready").json()
                assert ready["queue_depth"] == 56 and ready["status"] == "ready"
                assert "tunelab_queue_depth 56" in probe.get("/metrics").text
                assert [m["id"] for m in probe.get("/v1/models").json()["data"]] == [service.base_name]
        finally:
            gate.open()
            for t in threads:
                t.join(60)
    assert [r.status_code for r in answers] == [200] * 57


def test_ready_is_503_when_the_engine_is_stopped(make_service):
    service = make_service()
    with running(create_app(service)) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/ready").status_code == 200
        service.close()
        r = http.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "not ready"
