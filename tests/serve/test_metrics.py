"""`/metrics`: Prometheus text with requests, tokens, queue depth, batch sizes, adapter loads, evictions and TTFT."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient
from serve.helpers import adapter_root, base_dir, make_service  # noqa: F401  (fixtures)

from tunelab.serve.api import create_app
from tunelab.serve.metrics import Histogram


def _values(text: str) -> dict[str, float]:
    """`name{labels} value` lines of a Prometheus text page (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_count_requests_tokens_loads_and_evictions(make_service, adapter_root):
    service = make_service(adapter_root=adapter_root, max_adapters=1, max_tokens_limit=8)
    with TestClient(create_app(service)) as client:
        for model in ("a", "b", "b"):  # b evicts a (one slot)
            body = {"model": model, "prompt": "hello there", "max_tokens": 3, "temperature": 0}
            assert client.post("/v1/completions", json=body).status_code == 200
        page = client.get("/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    assert re.search(r"^# TYPE tunelab_time_to_first_token_seconds histogram$", page.text, re.MULTILINE)
    got = _values(page.text)
    assert got["tunelab_requests_total"] == 3
    assert got["tunelab_adapter_loads_total"] == 2 and got["tunelab_adapter_evictions_total"] == 1
    assert got["tunelab_adapter_load_seconds_count"] == 2 and got["tunelab_adapter_load_seconds_sum"] > 0
    assert got["tunelab_time_to_first_token_seconds_count"] == 3
    assert 3 <= got["tunelab_completion_tokens_total"] <= 9 and got["tunelab_prompt_tokens_total"] > 0
    # counted step by step, the same tokens once every request has finished
    assert got["tunelab_generation_tokens_total"] == got["tunelab_completion_tokens_total"]
    assert got["tunelab_batch_rows_count"] >= 3 and got['tunelab_batch_rows_bucket{le="+Inf"}'] >= 3
    assert got["tunelab_queue_depth"] == 0 and got["tunelab_adapters_resident"] == 1


def test_histogram_buckets_are_cumulative():
    hist = Histogram((1, 2, 4))
    for v in (0.5, 1.5, 3, 9):
        hist.observe(v)
    assert hist.lines("x") == ['x_bucket{le="1"} 1', 'x_bucket{le="2"} 2', 'x_bucket{le="4"} 3',
                               'x_bucket{le="+Inf"} 4', "x_sum 14.000000", "x_count 4"]
