"""One served model: the frozen base, its tokenizer, the adapter registry and the generation engine.

`build_service` loads the base once (frozen, eval mode), attaches the start-up adapters, optionally folds one
adapter into the base (`merge`), and starts the batching loop. The HTTP layer (`api.py`) only turns requests
into `Service.submit` calls and results into OpenAI response bodies.
"""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.artifacts.peft_format import tokenizer_for
from tunelab.data.templates import resolve_chat_template
from tunelab.defaults import MODEL_ALIASES
from tunelab.errors import ConfigError
from tunelab.models import load_model
from tunelab.serve.engine import PREFILL_CHUNK, Engine, GenerationRequest
from tunelab.serve.errors import BadRequest
from tunelab.serve.metrics import ServeMetrics
from tunelab.serve.registry import SLOT_WAIT_S, AdapterRegistry, check_name
from tunelab.serve.responses import TokenText


@dataclass
class Service:
    """The served base model (`base_name`), its tokenizer, adapters and engine."""

    base_name: str
    tokenizer: object
    registry: AdapterRegistry
    engine: Engine
    created: int = field(default_factory=lambda: int(time.time()))

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a completion prompt (with the tokenizer's usual special tokens, e.g. BOS)."""
        self._check_length(prompt, "prompt")
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` rendered by the tokenizer's chat template, ending with the assistant turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadRequest(f"messages: the model {self.base_name!r} has no chat template; "
                             "use /v1/completions", param="messages")
        self._check_length("".join(m["content"] for m in messages), "messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # the template's own checks (e.g. role order) fail with jinja errors
            raise BadRequest(f"messages: the chat template refused them ({err})", param="messages") from None
        # the template writes any BOS itself, so the tokenizer must not add special tokens again
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _check_length(self, text: str, param: str) -> None:
        limit = 16 * (self.engine.context_length or 8192)  # far more characters than fit in the context
        if len(text) > limit:
            raise BadRequest(f"{param}: {len(text)} characters, expected at most {limit} (the model's context "
                             f"is {self.engine.context_length} tokens)", param=param)

    def submit(self, model: str, req: GenerationRequest) -> Future:
        """Queue `req` on adapter or base `model`; the adapter is held until the result is ready."""
        return self.submit_all(model, [req])[0]

    def submit_all(self, model: str, requests: list[GenerationRequest]) -> list[Future]:
        """Queue `requests` (the choices of one API request) on adapter or base `model`, all or none; the adapter
        is held until the last result is ready. A non-resident adapter may wait for a slot (`slot_wait_s`)."""
        for req in requests:
            self.engine.check(req)  # before any adapter loads
        key = self.registry.acquire(model)
        for req in requests:
            req.adapter = key
        try:
            futures = self.engine.submit_all(requests)
        except BaseException:
            self.registry.release(key)
            raise
        left = [len(futures)]
        lock = threading.Lock()

        def done(_) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self.registry.release(key)

        for future in futures:
            future.add_done_callback(done)
        self.engine.metrics.add("tunelab_requests_total")
        return futures

    @functools.cached_property
    def token_text(self) -> TokenText:
        """Each token's own text, for logprobs."""
        return TokenText(self.tokenizer)

    def close(self) -> None:
        """Stop the batching loop (queued requests fail with a clear error)."""
        self.engine.stop()


def base_name_of(spec: str | Path) -> str:
    """The public name of the base model: the alias, or the model directory's name."""
    return str(spec) if str(spec) in MODEL_ALIASES else Path(spec).name


def build_service(model, adapters: dict[str, Path] | None = None, *, adapter_root: Path | None = None,
                  max_adapters: int = 8, max_rank: int = 64, max_batch_size: int = 16,
                  max_tokens_limit: int = 512, merge: str | None = None, device: str = "auto",
                  dtype: str = "auto", served_model_name: str | None = None,
                  slot_wait_s: float = SLOT_WAIT_S, chat_template: str | None = None,
                  prefill_chunk: int = PREFILL_CHUNK, cuda_graphs: bool = True) -> Service:
    """Load `model` (a local HF model dir or an alias) and its adapters, and start the engine.

    `merge` folds that one adapter (of a mergeable method) into the base at start; it is then served under its
    own name with no adapter overhead, and no other adapter may be given. `served_model_name`: the name requests
    give for the base (default: the alias or the directory's name; with `merge`, the merged adapter's name).
    `slot_wait_s`: how long a request for a non-resident adapter waits for a free slot. `device`, `dtype`: as for
    `load_model`. `chat_template`: a Jinja file or a shipped template's name, for a tokenizer without one.
    `prefill_chunk`: prompt tokens (over the rows joining a running batch) prefilled between two of its decode steps.
    `cuda_graphs`: on a GPU, replay decode steps as CUDA graphs (False: eager steps, as `--no-cuda-graphs`).
    Errors are `TunelabError`s naming the adapter or option.
    """
    adapters = dict(adapters or {})
    _check_limits(max_adapters, max_rank, max_batch_size, max_tokens_limit, len(adapters), prefill_chunk)
    if served_model_name is not None:
        check_name(served_model_name)
    if not slot_wait_s >= 0:
        raise ConfigError(f"--slot-wait: expected a number of seconds >= 0, found {slot_wait_s}")
    if merge is not None and (set(adapters) != {merge} or adapter_root is not None):
        raise ConfigError(f"--merge {merge}: expected exactly one --adapter named {merge!r} and no "
                          f"--adapter-root; found adapters {sorted(adapters) or 'none'}")
    if adapter_root is not None and not Path(adapter_root).is_dir():
        raise ConfigError(f"--adapter-root {adapter_root}: not a directory")
    template = resolve_chat_template(chat_template) if chat_template is not None else None
    loaded = load_model(str(model), task="causal-lm", device=device, dtype=dtype)
    if template is not None:
        loaded.tokenizer.chat_template = template
    base = loaded.model.eval().requires_grad_(False)
    base_name = served_model_name or base_name_of(model)
    lock = threading.RLock()
    metrics = ServeMetrics()
    registry = AdapterRegistry(base, lock, base_name=base_name, adapter_root=adapter_root,
                               max_adapters=max_adapters, max_rank=max_rank, metrics=metrics,
                               slot_wait_s=slot_wait_s)
    for name, path in adapters.items():
        registry.add(name, Path(path))
    if merge is not None:
        base_name = served_model_name or merge
        registry.merge_into_base(merge, base_name)
    tokenizer = tokenizer_for(loaded.tokenizer, adapters.values())  # adapters that added tokens carry their own
    if template is not None:
        tokenizer.chat_template = template  # --chat-template wins over the one an adapter carries
    engine = Engine(base, tokenizer, lock=lock, mixed_batch=registry.mixed_batch,
                    max_batch_size=max_batch_size, max_tokens_limit=max_tokens_limit, prefill_chunk=prefill_chunk,
                    metrics=metrics, cuda_graphs=None if cuda_graphs else False)
    engine.start()
    return Service(base_name, tokenizer, registry, engine)


def _check_limits(max_adapters: int, max_rank: int, max_batch_size: int, max_tokens_limit: int,
                  given: int, prefill_chunk: int = 1) -> None:
    for flag, value in (("--max-adapters", max_adapters), ("--max-rank", max_rank),
                        ("max_batch_size", max_batch_size), ("max_tokens_limit", max_tokens_limit),
                        ("--prefill-chunk", prefill_chunk)):
        if value < 1:
            raise ConfigError(f"{flag}: expected a positive number, found {value}")
    if given > max_adapters:
        raise ConfigError(f"--max-adapters {max_adapters}: {given} adapters were given with --adapter; "
                          "raise the limit or give fewer")
