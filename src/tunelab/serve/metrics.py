"""The server's counters, gauges and histograms, rendered in Prometheus' text format (version 0.0.4) for `/metrics`.

One `ServeMetrics` per served model, shared by the service (requests), the engine (tokens, batch sizes, time to
first token, queue depth) and the adapter registry (loads, evictions, load time). Updates take a lock and a few
additions, so the engine thread can record every step; nothing here touches the GPU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class Histogram:
    """Cumulative-bucket histogram: `counts[i]` observations <= `bounds[i]`, and all of them in `count`."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self):
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.bounds, self.counts)]
        return [*out, f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total:.6f}",
                f"{name}_count {self.count}"]


COUNTERS = {
    "tunelab_requests_total": "completion requests accepted into the queue",
    "tunelab_prompt_tokens_total": "prompt tokens of finished requests",
    "tunelab_completion_tokens_total": "tokens generated for finished requests",
    "tunelab_generation_tokens_total": "tokens generated, counted at each decode step (running requests too)",
    "tunelab_adapter_loads_total": "adapters loaded onto the base",
    "tunelab_adapter_evictions_total": "idle adapters removed to make room (--max-adapters)",
}
HISTOGRAMS = {
    "tunelab_batch_rows": ("rows in each forward of the batching loop", ROWS),
    "tunelab_time_to_first_token_seconds": ("from queueing a request to its first token", SECONDS),
    "tunelab_adapter_load_seconds": ("time to read and attach one adapter", SECONDS),
}


class ServeMetrics:
    """Thread-safe counters and histograms; `gauges` are read when rendered (name -> (help, callable))."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.histograms = {name: Histogram(bounds) for name, (_, bounds) in HISTOGRAMS.items()}
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def add(self, name: str, value: int = 1) -> None:
        """Add `value` to counter `name` (one of `COUNTERS`)."""
        with self._lock:
            self.counters[name] += value

    def observe(self, name: str, value: float) -> None:
        """Record `value` in histogram `name` (one of `HISTOGRAMS`)."""
        with self._lock:
            self.histograms[name].observe(value)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Report `read()` as gauge `name` at each render."""
        self.gauges[name] = (help_text, read)

    def render(self) -> str:
        """Everything in Prometheus' text exposition format."""
        lines = []
        with self._lock:
            for name, value in self.counters.items():
                lines += [f"# HELP {name} {COUNTERS[name]}", f"# TYPE {name} counter", f"{name} {value}"]
            for name, hist in self.histograms.items():
                lines += [f"# HELP {name} {HISTOGRAMS[name][0]}", f"# TYPE {name} histogram", *hist.lines(name)]
        for name, (help_text, read) in self.gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {read():g}"]
        return "\n".join(lines) + "\n"
