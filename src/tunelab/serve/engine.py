"""Batched generation on one frozen base with many adapters, rows of different adapters in one batch.

A background thread takes waves of queued requests (up to `max_batch_size` rows), left-pads their prompts
and decodes them together: one forward per step for the whole batch, with the transformers KV cache, and
`adapter_state(model).row_adapters` naming each row's adapter (None: the base) so every row gets only its own
adapter's delta. A row leaves the batch at its own EOS, stop string or `max_tokens`, and queued rows join it
between steps (continuous batching). Adapters whose method cannot give each row its own adapter (see
`adapter_files.mixed_batch_ok`) are served in waves of their own, with the adapter active for every row and
no joining; such a wave ends when its last row does.

Forwards hold `lock`, the lock the adapter registry holds while it attaches or removes adapters, so the set of
adapters only changes between decode steps.
"""

from __future__ import annotations

import inspect
import itertools
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from tunelab.methods.base import adapter_state
from tunelab.models import pad_token_id
from tunelab.serve.batch import Batch, can_merge, merge, next_step, prefill_batch
from tunelab.serve.errors import BadRequest, ClientGone, QueueFull
from tunelab.serve.metrics import ServeMetrics
from tunelab.serve.sampling import (
    MIN_TEMPERATURE,
    SamplingError,
    StopText,
    next_token,
    row_generator,
)

_MIXED = object()  # the group key of rows that can share a batch through row_adapters


@dataclass
class GenerationRequest:
    """One completion to generate: prompt token ids, the adapter (None: base) and sampling parameters.

    `on_text`, when given, receives the completion's text in pieces as it becomes final (for streaming);
    it is called on the engine thread and must not block for long. `cancel()` (a client that hung up) drops
    the request from the queue, or from its batch at the next decode step.
    """

    prompt_ids: list[int]
    adapter: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    on_text: Callable[[str], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def cancel(self) -> None:
        """Stop generating this request (thread-safe); its future then fails with `ClientGone`."""
        self.cancelled.set()


@dataclass
class GenerationResult:
    """A finished completion. `finish_reason` is "stop" (EOS or a stop string) or "length" (max_tokens).

    `token_ids` excludes the EOS token; `completion_tokens` counts every generated token, EOS included.
    """

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class _Row:
    """The decoding state of one request inside a wave."""

    def __init__(self, request: GenerationRequest, future: Future, tokenizer, eos_ids: set[int]):
        self.request, self.future, self.tokenizer, self.eos_ids = request, future, tokenizer, eos_ids
        self.token_ids: list[int] = []
        self.generated = 0
        self.text = StopText(request.stop)
        self.gen = row_generator(request.seed)
        self.finish_reason: str | None = None
        self.queued = time.monotonic()  # for the time to first token

    def step(self, logits: torch.Tensor, greedy: int, finite: bool = True) -> int:
        """Choose this row's next token from its logits (vocab,), update its text; return the token.

        `greedy` is their argmax and `finite` whether they hold no NaN/+inf, both already on the host (the step's
        one sync). Any error (a row's numbers that cannot be sampled, a failing `on_text`) ends this row alone:
        its future gets the error and the row leaves the batch with the others untouched.
        """
        try:
            token = self._step(logits, greedy, finite)
            if self.finish_reason in ("stop", "length"):
                _settle(self.future, result=self.result())
            return token
        except Exception as err:
            self.finish_reason = "error"
            _settle(self.future, error=err)
            return 0

    def _step(self, logits: torch.Tensor, greedy: int, finite: bool) -> int:
        req = self.request
        if req.cancelled.is_set():
            self.finish_reason = "cancelled"
            _settle(self.future, error=ClientGone("the client disconnected"))
            return 0
        if not finite:
            raise SamplingError("the model's next-token scores for this request are NaN or infinite")
        sampled = req.temperature >= MIN_TEMPERATURE and req.top_p > 0
        token = next_token(logits, req.temperature, req.top_p, self.gen) if sampled else greedy
        self.generated += 1
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return token
        self.token_ids.append(token)
        self.text.update(self.tokenizer.decode(self.token_ids, skip_special_tokens=True))
        if self.text.stopped:
            self.finish_reason = "stop"
        elif self.generated >= req.max_tokens:
            self.finish_reason = "length"
        self._emit(final=self.finish_reason is not None)
        return token

    def _emit(self, final: bool) -> None:
        if self.request.on_text is not None:
            chunk = self.text.new_text(final=final)
            if chunk:
                self.request.on_text(chunk)

    def result(self) -> GenerationResult:
        self._emit(final=True)
        return GenerationResult(self.token_ids, self.text.text, self.finish_reason or "length",
                                len(self.request.prompt_ids), self.generated)


class Engine:
    """The request queue and the background batching loop over one model.

    `mixed_batch(name)` says whether adapter `name`'s method applies per-row adapters (`row_adapters`).
    """

    def __init__(self, model, tokenizer, *, lock: threading.RLock, mixed_batch: Callable[[str], bool],
                 max_batch_size: int = 16, max_tokens_limit: int = 512, max_queue: int = 256,
                 metrics: ServeMetrics | None = None):
        self.model, self.tokenizer, self.lock, self.mixed_batch = model, tokenizer, lock, mixed_batch
        self.max_batch_size, self.max_tokens_limit, self.max_queue = max_batch_size, max_tokens_limit, max_queue
        self.context_length = _context_length(model)
        self.pad_id = pad_token_id(tokenizer, model)
        self.eos_ids = _eos_ids(model, tokenizer)
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._pending: list[_Row] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.waves = itertools.count()  # next(waves) numbers each wave (a new batch, not a join)
        self.running = 0  # rows in the batch being decoded now
        self.dropped = 0  # rows dropped because their client hung up
        self.metrics = metrics or ServeMetrics()
        self.metrics.gauge("tunelab_queue_depth", "requests waiting for a batch", lambda: len(self._pending))
        # phases ("prefill", "decode") in which a batch on one adapter takes the stacked path rather than the
        # active-adapter path: on an H200 (bench/results/serve_gpu_h200.json) stacked prefill took 0.66x the
        # time of the active path's, and a stacked decode step 1.09x
        self.stack_one_adapter = {"prefill"}

    # --- queue ----------------------------------------------------------------------------------------
    def check(self, req: GenerationRequest) -> None:
        """Raise `BadRequest` naming the field when `req` cannot be generated within the server's limits."""
        if not (math.isfinite(req.temperature) and req.temperature >= 0):
            raise BadRequest(f"temperature: expected a finite number >= 0, found {req.temperature}",
                             param="temperature")
        if not 0 < req.top_p <= 1:
            raise BadRequest(f"top_p: expected a number in (0, 1], found {req.top_p}", param="top_p")
        if not req.prompt_ids:
            raise BadRequest("prompt: expected at least one token, found an empty prompt", param="prompt")
        if not 1 <= req.max_tokens <= self.max_tokens_limit:
            raise BadRequest(f"max_tokens: expected 1 to {self.max_tokens_limit} (the server limit), "
                             f"found {req.max_tokens}", param="max_tokens")
        total = len(req.prompt_ids) + req.max_tokens
        if self.context_length and total > self.context_length:
            raise BadRequest(f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.max_tokens}) = {total}: "
                             f"expected at most the model's context length {self.context_length}",
                             param="max_tokens")

    def submit(self, req: GenerationRequest) -> Future:
        """Queue `req` and return a Future of its `GenerationResult` (or of the error that stopped it)."""
        self.check(req)
        future: Future = Future()
        with self._cv:
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting, the server limit; retry later")
            self._pending.append(_Row(req, future, self.tokenizer, self.eos_ids))
            self._cv.notify()
        return future

    @property
    def alive(self) -> bool:
        """Whether the batching loop is running."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the batching loop on a daemon thread (idempotent)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="tunelab-serve-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the wave in progress, fail the queued requests, and stop the loop."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cv:
            rows, self._pending = self._pending, []
        for row in rows:
            row.future.set_exception(QueueFull("the server is shutting down"))

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Generate `requests` now on the calling thread as one batch (they must be batch-compatible)."""
        rows = []
        for req in requests:
            self.check(req)
            rows.append(_Row(req, Future(), self.tokenizer, self.eos_ids))
        self._run_wave(rows, group=None)
        return [row.future.result() for row in rows]

    # --- the loop -------------------------------------------------------------------------------------
    def _group(self, adapter: str | None):
        return _MIXED if adapter is None or self.mixed_batch(adapter) else adapter

    def queue_depth(self) -> int:
        """Requests waiting for a place in a batch."""
        with self._cv:
            return len(self._pending)

    def _take(self, group, limit: int) -> list[_Row]:
        """Up to `limit` queued rows of `group`, oldest first, out of the queue (call with `_cv` held).

        Requests cancelled while queued leave the queue here, failed with `ClientGone`.
        """
        gone = [r for r in self._pending if r.request.cancelled.is_set()]
        for row in gone:
            _settle(row.future, error=ClientGone("the client disconnected"))
        self.dropped += len(gone)
        self._pending = [r for r in self._pending if r not in gone]
        taken = [r for r in self._pending if self._group(r.request.adapter) == group][:limit]
        self._pending = [r for r in self._pending if r not in taken]
        return taken

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                group = self._group(self._pending[0].request.adapter)  # the oldest request leads
                wave = self._take(group, self.max_batch_size)
            self._run_wave(wave, group)

    def _run_wave(self, rows: list[_Row], group) -> None:
        """Decode `rows` (and rows of `group` that join) to the end; each row's future gets its result or error."""
        next(self.waves)
        wave = list(rows)  # grows as rows join
        try:
            with torch.inference_mode():
                batch = self._start(rows)
                while batch is not None:
                    batch = self._join(batch, group, wave)
                    self.running = len(batch.rows)
                    batch = self._advance(batch, self._forward(batch))
        except Exception as err:  # one failed wave (e.g. a forward that raises) must not stop the server
            _fail(wave, err)
        finally:
            self.running = 0

    def _start(self, rows: list[_Row]) -> Batch | None:
        """Prefill `rows` and choose their first tokens; the batch is then ready for its first decode step."""
        batch = prefill_batch(rows, [r.request.prompt_ids for r in rows], self.pad_id, _device(self.model),
                              self.model.config)
        return self._advance(batch, self._forward(batch))

    def _advance(self, batch: Batch, logits: torch.Tensor) -> Batch | None:
        """Each row picks its next token from `logits` (B, vocab); finished, failed and cancelled rows leave."""
        # the step's one host sync: every row's argmax and whether its scores are finite (-inf is probability 0)
        bad = (torch.isnan(logits) | torch.isposinf(logits)).any(-1)
        greedy, bad = torch.stack([logits.argmax(-1), bad.long()]).tolist()
        tokens = [row.step(logits[i], greedy[i], not bad[i]) for i, row in enumerate(batch.rows)]
        self._record(batch.rows)
        self.dropped += sum(row.finish_reason == "cancelled" for row in batch.rows)
        keep = [i for i, row in enumerate(batch.rows) if row.finish_reason is None]
        return next_step(batch, tokens, keep) if keep else None

    def _record(self, rows: list[_Row]) -> None:
        """Metrics of one step: the batch size, first tokens (time since queueing), finished rows' tokens."""
        m = self.metrics
        m.observe("tunelab_batch_rows", len(rows))
        now = time.monotonic()
        for row in rows:
            if row.generated == 1:
                m.observe("tunelab_time_to_first_token_seconds", now - row.queued)
            if row.finish_reason is not None:
                m.add("tunelab_prompt_tokens_total", len(row.request.prompt_ids))
                m.add("tunelab_completion_tokens_total", row.generated)

    def _join(self, batch: Batch, group, wave: list[_Row]) -> Batch:
        """Continuous batching: queued rows of a mixed-adapter `group` join the running batch between steps."""
        room = self.max_batch_size - len(batch.rows)
        if group is not _MIXED or room <= 0 or not self._pending or not can_merge(batch):
            return batch
        with self._cv:
            joiners = self._take(group, room)
        if not joiners:
            return batch
        wave.extend(joiners)
        try:
            extra = self._start(joiners)
        except Exception as err:  # a failing newcomer fails alone; the running rows go on
            _fail(joiners, err)
            return batch
        return batch if extra is None else merge(batch, extra, self.model.config)

    def _routed(self, names: list[str | None], phase: str) -> bool:
        """Whether this batch goes through `row_adapters` (the stacked path, `methods/stacked.py`) rather than
        the active-adapter path: mixed batches always; one adapter for every row when `phase` ("prefill" or
        "decode") is in `stack_one_adapter` and its method serves mixed batches (docs/serve.md)."""
        first = names[0]
        if any(n != first for n in names):
            return True
        return first is not None and phase in self.stack_one_adapter and self.mixed_batch(first)

    def _forward(self, batch: Batch) -> torch.Tensor:
        """One forward of the batch with each row's adapter; returns the last position's logits (B, vocab)."""
        names = [row.request.adapter for row in batch.rows]
        used = tuple(sorted({n for n in names if n is not None}))
        with self.lock:
            state = adapter_state(self.model)
            state.active = used
            phase = "prefill" if batch.ids.shape[1] > 1 else "decode"
            state.row_adapters = list(names) if self._routed(names, phase) else None
            try:
                out = self.model(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.pos,
                                 use_cache=True, logits_to_keep=1, **{self._cache_kw: batch.cache})
            finally:
                state.row_adapters, state.active = None, ()
        return out.logits[:, -1, :]


def _fail(rows: list[_Row], err: Exception) -> None:
    for row in rows:
        _settle(row.future, error=err)


def _settle(future: Future, *, result=None, error: Exception | None = None) -> None:
    """Give `future` its result or error unless it already has one."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _context_length(model) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return None


def _eos_ids(model, tokenizer) -> set[int]:
    """The tokens that end a completion: the tokenizer's EOS and the model's generation_config EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    return ids
