"""Shared pieces of the serving tests: adapters with random non-zero weights, an adapter root, a service
factory, and greedy references from transformers' own `generate` with one adapter loaded alone.

Imported by tests/serve/* and tests/reliability/test_serving.py (`from serve.helpers import ...`).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

PROMPTS = ["the quick brown fox", "hello, how are you", "what is the capital", "a language model predicts",
           "fine tuning adapts"]


def make_adapter(base_dir: Path, tokenizer, out_dir: Path, *, method: str = "lora", seed: int = 0,
                 scale: float = 0.5, **options) -> Path:
    """Inject `method` into a fresh base, give every adapter weight random non-zero values, save it."""
    from transformers import AutoModelForCausalLM

    from tunelab.artifacts import save_artifact
    from tunelab.methods import get_method

    impl = get_method(method)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.random.fork_rng():  # the init draws from the global generator: seed it, so fixtures do not
        torch.manual_seed(seed)     # depend on which test created them first
        impl.inject(model, impl.Options(**options), "default")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in impl.parameters(model, "default").values():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    save_artifact(model, tokenizer, "default", out_dir)
    return out_dir


def reference_greedy(base_dir: Path, adapter_dir: Path | None, prompts: list[list[int]], n: int, *,
                     as_method: str | None = None) -> list[list[int]]:
    """Greedy tokens from transformers' `generate` on a fresh base with only `adapter_dir` loaded (as `as_method`
    when given), one prompt (token ids) at a time, ignoring EOS (always `n` tokens)."""
    from transformers import AutoModelForCausalLM

    from tunelab.artifacts import load_adapter

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if adapter_dir is not None:
        load_adapter(model, adapter_dir, "ref", as_method=as_method)
    out = []
    for prompt_ids in prompts:
        ids = torch.tensor([prompt_ids])
        with torch.inference_mode():
            tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                    eos_token_id=[], pad_token_id=0)
        out.append(tokens[0, ids.shape[1]:].tolist())
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny model gains nothing from more, and the engine thread runs beside the test."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def base_dir(tiny_dirs) -> Path:
    return tiny_dirs["llama"]


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory, base_dir, tokenizer) -> Path:
    """An adapter root with LoRA adapters a, b, c (rank 4, all linears), d (rank 16) and a prompt-tuning one."""
    root = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate("abc"):
        make_adapter(base_dir, tokenizer, root / name, seed=i, r=4, alpha=8, target_modules="all-linear")
    make_adapter(base_dir, tokenizer, root / "d", seed=3, r=16, alpha=16, target_modules="all-linear")
    make_adapter(base_dir, tokenizer, root / "soft", method="prompt", seed=4)
    return root


@pytest.fixture
def make_service(base_dir):
    """`make_service(adapters={}, **kw)`: a started `Service` on the tiny Llama, closed after the test."""
    from tunelab.serve.service import build_service

    made = []

    def make(adapters=None, **kw):
        made.append(build_service(base_dir, adapters or {}, **kw))
        return made[-1]

    yield make
    for service in made:
        service.close()


class ForwardGate:
    """A forward pre-hook on a model: while closed, forwards wait (requests queue up behind them); `delay_s`
    slows every forward, so a decode step costs a known time. Remove it with `close()`/`remove()`."""

    def __init__(self, model, delay_s: float = 0.0):
        self.open_, self.delay_s, self.waiting = threading.Event(), delay_s, 0
        self.open_.set()
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.waiting += 1
        try:
            assert self.open_.wait(60), "the test never opened the gate"
        finally:
            self.waiting -= 1
        if self.delay_s:
            time.sleep(self.delay_s)

    def close(self) -> None:
        self.open_.clear()

    def open(self) -> None:
        self.open_.set()

    def remove(self) -> None:
        self.open_.set()
        self.handle.remove()


def wait_until(condition, timeout: float = 30.0, what: str = "condition") -> float:
    """Poll `condition()` until it is true; the seconds it took. Fails the test after `timeout`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what}: not reached within {timeout:.0f} s"
        time.sleep(0.005)
    return time.monotonic() - start
