"""Batched generation on one frozen base with many adapters, rows of different adapters in one batch.

A background thread takes waves of queued requests (up to `max_batch_size` rows), left-pads their prompts
and decodes them together: one forward per step for the whole batch, with the transformers KV cache, and
`adapter_state(model).row_adapters` naming each row's adapter (None: the base) so every row gets only its own
adapter's delta. A row leaves the batch at its own EOS, stop string or `max_tokens`, and queued rows join it
between steps (continuous batching). A joining request's prompt is prefilled in chunks of at most
`prefill_chunk` tokens (over all joining rows), one chunk between two decode steps of the running rows, so a long
prompt delays the running rows by one chunk's forward at a time rather than by its whole prefill. Adapters whose method cannot give each row its own adapter (see
`adapter_files.mixed_batch_ok`) are served in waves of their own, with the adapter active for every row and
no joining; such a wave ends when its last row does. Rows that score their prompt (echo with logprobs) keep every
position's logits at prefill, so they are batched only with each other, within `SCORING_LOGITS`, and never join.

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

import torch

from tunelab.methods.base import adapter_state
from tunelab.models import pad_token_id
from tunelab.serve.batch import Batch, Prefill, can_merge, merge, next_step, prefill_batch
from tunelab.serve.errors import BadRequest, ClientGone, QueueFull
from tunelab.serve.logits import Controls, prompt_logprobs, read_step, step_numbers
from tunelab.serve.metrics import ServeMetrics
from tunelab.serve.request import GenerationRequest, GenerationResult, Row, StepRead, settle
from tunelab.serve.slots import Decoder, SlotCache, positions_needed, slot_ready

__all__ = ["Engine", "GenerationRequest", "GenerationResult"]

_MIXED = object()  # the group key of rows that can share a batch through row_adapters
_SCORING = "scoring"  # first part of the group key of rows that score their prompt (echo + logprobs)
# a scoring prefill keeps every position's logits, (rows, longest prompt, vocab): at most this many numbers
# (1 GiB in float32), so one scoring request cannot make a batch of other clients' rows run out of memory
SCORING_LOGITS = 2**28
# tokens (over all joining rows) of one prefill chunk between two decode steps of a running batch
PREFILL_CHUNK = 2048


class Engine:
    """The request queue and the background batching loop over one model.

    `mixed_batch(name)` says whether adapter `name`'s method applies per-row adapters (`row_adapters`).
    """

    def __init__(self, model, tokenizer, *, lock: threading.RLock, mixed_batch: Callable[[str], bool],
                 max_batch_size: int = 16, max_tokens_limit: int = 512, max_queue: int = 256,
                 prefill_chunk: int = PREFILL_CHUNK, metrics: ServeMetrics | None = None,
                 cuda_graphs: bool | None = None):
        self.model, self.tokenizer, self.lock, self.mixed_batch = model, tokenizer, lock, mixed_batch
        self.max_batch_size, self.max_tokens_limit, self.max_queue = max_batch_size, max_tokens_limit, max_queue
        self.prefill_chunk = prefill_chunk
        self.context_length = _context_length(model)
        self.vocab_size = _vocab_size(model)
        self.pad_id = pad_token_id(tokenizer, model)
        self.eos_ids = _eos_ids(model, tokenizer)
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._pending: list[Row] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.waves = itertools.count()  # next(waves) numbers each wave (a new batch, not a join)
        self.running = 0  # rows in the batch being decoded now
        self.dropped = 0  # rows dropped because their client hung up
        self.metrics = metrics or ServeMetrics()
        self.metrics.gauge("tunelab_queue_depth", "requests waiting for a batch", lambda: len(self._pending))
        # phases ("prefill", "decode") in which a batch on one adapter takes the stacked path rather than the
        # active-adapter path: on an H200 (bench/results/serve_gpu_h200.json; 1B, 32 rows) a stacked prefill took
        # 0.67x the active path's time and a stacked decode step 0.80x (19.8 ms against 24.8)
        self.stack_one_adapter = {"prefill", "decode"}
        # decode steps of mixed-adapter waves replayed as CUDA graphs on a preallocated slot cache (slots.py):
        # by default on a GPU. None: waves decode eagerly on transformers' DynamicCache, which measured as fast as
        # eager steps on the slot cache for mixed batches (H200, 1B, 32 rows: 28.0 against 28.6 ms a step in
        # bench/results/serve_gpu_h200.json), and always when the model's attention cannot take the slot cache's
        # 4D mask
        graphs = _device(model).type == "cuda" if cuda_graphs is None else cuda_graphs
        self.decoder = (Decoder(model, rows=max_batch_size, context=self.context_length, cache_kw=self._cache_kw,
                                graphs=True) if graphs and slot_ready(model) else None)
        self.metrics.gauge("tunelab_cuda_graphs", "decode steps captured as CUDA graphs so far",
                           lambda: self.decoder.captures if self.decoder is not None else 0)

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
        if req.prompt_ids and not 0 <= min(req.prompt_ids) <= max(req.prompt_ids) < self.vocab_size:
            bad = next(t for t in req.prompt_ids if not 0 <= t < self.vocab_size)
            raise BadRequest(f"prompt: token id {bad} is outside the model's vocabulary (0 to "
                             f"{self.vocab_size - 1})", param="prompt")
        bad = next((t for t in req.logit_bias if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise BadRequest(f"logit_bias: token id {bad} is outside the model's vocabulary (0 to "
                             f"{self.vocab_size - 1})", param="logit_bias")
        least = 0 if req.prompt_logprobs is not None else 1  # scoring a prompt may generate nothing
        if not least <= req.max_tokens <= self.max_tokens_limit:
            raise BadRequest(f"max_tokens: expected {least} to {self.max_tokens_limit} (the server limit), "
                             f"found {req.max_tokens}", param="max_tokens")
        total = len(req.prompt_ids) + req.max_tokens
        if self.context_length and total > self.context_length:
            raise BadRequest(f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.max_tokens}) = {total}: "
                             f"expected at most the model's context length {self.context_length}",
                             param="max_tokens")

    def submit(self, req: GenerationRequest) -> Future:
        """Queue `req` and return a Future of its `GenerationResult` (or of the error that stopped it)."""
        return self.submit_all([req])[0]

    def submit_all(self, requests: list[GenerationRequest]) -> list[Future]:
        """Queue `requests` together (all or none: the queue must have room for every one); their Futures."""
        for req in requests:
            self.check(req)
        futures = [Future() for _ in requests]
        with self._cv:
            if len(self._pending) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting and the server holds at most "
                                f"{self.max_queue}; retry later")
            self._pending.extend(Row(r, f, self.tokenizer, self.eos_ids) for r, f in zip(requests, futures))
            self._cv.notify()
        return futures

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
            rows.append(Row(req, Future(), self.tokenizer, self.eos_ids))
        groups = {self._group(req) for req in requests}
        self._run_wave(rows, group=groups.pop() if len(groups) == 1 else None)
        return [row.future.result() for row in rows]

    # --- the loop -------------------------------------------------------------------------------------
    def _group(self, req: GenerationRequest):
        """The batches `req` may share: rows of mixed-batch adapters together, another adapter's alone; rows
        scoring their prompts only with each other (their prefill keeps every position's logits)."""
        adapters = _MIXED if req.adapter is None or self.mixed_batch(req.adapter) else req.adapter
        return (_SCORING, adapters) if req.prompt_logprobs is not None else adapters

    def queue_depth(self) -> int:
        """Requests waiting for a place in a batch."""
        with self._cv:
            return len(self._pending)

    def _take(self, group, limit: int) -> list[Row]:
        """Up to `limit` queued rows of `group`, oldest first, out of the queue (call with `_cv` held).

        Requests cancelled while queued leave the queue here, failed with `ClientGone`.
        """
        gone = [r for r in self._pending if r.request.cancelled.is_set()]
        for row in gone:
            settle(row.future, error=ClientGone("the client disconnected"))
        self.dropped += len(gone)
        self._pending = [r for r in self._pending if r not in gone]
        taken = [r for r in self._pending if self._group(r.request) == group][:limit]
        if isinstance(group, tuple):  # scoring rows: as many as SCORING_LOGITS allows, at least one
            longest = itertools.accumulate((len(r.request.prompt_ids) for r in taken), max)
            taken = [r for n, (r, width) in enumerate(zip(taken, longest))
                     if n == 0 or (n + 1) * width * self.vocab_size <= SCORING_LOGITS]
        self._pending = [r for r in self._pending if r not in taken]
        return taken

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                group = self._group(self._pending[0].request)  # the oldest request leads
                wave = self._take(group, self.max_batch_size)
            self._run_wave(wave, group)

    def _run_wave(self, rows: list[Row], group) -> None:
        """Decode `rows` (and rows of `group` that join) to the end; each row's future gets its result or error."""
        next(self.waves)
        wave = list(rows)  # grows as rows join
        slotted = self.decoder is not None and group in (_MIXED, (_SCORING, _MIXED)) and self.decoder.claim()
        try:
            with torch.inference_mode():
                batch, joining = self._start(rows), None
                while batch is not None or joining is not None:
                    if batch is None:  # the running rows finished first: the joiners' prefill runs on alone
                        batch, joining = self._finish(joining), None
                        continue
                    if (slotted and not isinstance(batch.cache, SlotCache) and can_merge(batch)
                            and self.decoder.capturable()):
                        batch = self.decoder.adopt(batch, positions_needed(batch.rows))
                    batch, joining = self._join(batch, group, wave, joining)
                    self.running = len(batch.rows)
                    batch = self._advance(batch, self._forward(batch))
        except Exception as err:  # one failed wave (e.g. a forward that raises) must not stop the server
            _fail(wave, err)
        finally:
            self.running = 0
            if slotted:
                self.decoder.release()

    def _prepare(self, rows: list[Row]) -> Batch:
        """The left-padded prompts of `rows` with an empty cache, their sampling controls and logprob width."""
        requests = [r.request for r in rows]
        device = _device(self.model)
        batch = prefill_batch(rows, [r.prompt_ids for r in requests], self.pad_id, device, self.model.config)
        batch.controls = Controls.for_requests(requests, self.vocab_size, device)
        tops = [r.logprobs for r in requests if r.logprobs is not None]
        batch.top_k = max(tops) if tops else None
        return batch

    def _start(self, rows: list[Row]) -> Batch | None:
        """Prefill `rows` and choose their first tokens; the batch is then ready for its first decode step."""
        requests = [r.request for r in rows]
        batch = self._prepare(rows)
        scoring = [i for i, r in enumerate(requests) if r.prompt_logprobs is not None]
        logits = self._forward(batch, every_position=bool(scoring))  # (B, V), or (B, L, V) when scoring
        if scoring:
            scored = prompt_logprobs(logits, batch.ids, scoring, [requests[i].prompt_ids for i in scoring],
                                     [requests[i].prompt_logprobs for i in scoring])
            for i, found in zip(scoring, scored):
                rows[i].prompt_logprobs = found
            logits = logits[:, -1, :]
        return self._advance(batch, logits)

    def _advance(self, batch: Batch, logits: torch.Tensor) -> Batch | None:
        """Each row picks its next token from `logits` (B, vocab); finished, failed and cancelled rows leave."""
        scores = logits if batch.controls is None else batch.controls.apply(logits)
        # the step's one host sync: every row's argmax, whether its scores are finite (-inf is probability 0),
        # and the logprobs when a row asks for them
        numbers = step_numbers(logits, scores, batch.top_k).tolist()
        tokens = [row.step(scores, logits, i, StepRead(*read_step(numbers[i], batch.top_k)))
                  for i, row in enumerate(batch.rows)]
        self._record(batch.rows)
        self.dropped += sum(row.finish_reason == "cancelled" for row in batch.rows)
        keep = [i for i, row in enumerate(batch.rows) if row.finish_reason is None]
        return next_step(batch, tokens, keep) if keep else None

    def _record(self, rows: list[Row]) -> None:
        """Metrics of one step: the batch size, first tokens (time since queueing), finished rows' tokens."""
        m = self.metrics
        m.observe("tunelab_batch_rows", len(rows))
        m.add("tunelab_generation_tokens_total", sum(row.finish_reason not in ("cancelled", "error")
                                                     for row in rows))
        now = time.monotonic()
        for row in rows:
            if row.generated == 1:
                m.observe("tunelab_time_to_first_token_seconds", now - row.queued)
            if row.finish_reason is not None:
                m.add("tunelab_prompt_tokens_total", len(row.request.prompt_ids))
                m.add("tunelab_completion_tokens_total", row.generated)

    def _join(self, batch: Batch, group, wave: list[Row], joining: Prefill | None) -> tuple[Batch, Prefill | None]:
        """Continuous batching: queued rows of a mixed-adapter `group` join the running batch between steps.

        Their prefill runs one chunk per call (`Prefill`); the rows merge into `batch` when it is done. Returns
        the batch for the next decode step and the prefill still in progress (None: none).
        """
        if joining is None:
            room = self.max_batch_size - len(batch.rows)
            if group is not _MIXED or room <= 0 or not self._pending or not can_merge(batch):
                return batch, None
            with self._cv:
                joiners = self._take(group, room)
            if not joiners:
                return batch, None
            wave.extend(joiners)
            try:
                joining = Prefill(self._prepare(joiners), self.prefill_chunk)
            except Exception as err:  # a failing newcomer fails alone; the running rows go on
                _fail(joiners, err)
                return batch, None
        try:
            logits = self._forward(joining.next_chunk()) if not joining.done else None
            if not joining.done:
                return batch, joining
            extra = self._advance(joining.batch, logits)
        except Exception as err:
            _fail(joining.batch.rows, err)
            return batch, None
        if extra is None:
            return batch, None
        if isinstance(batch.cache, SlotCache):
            return self.decoder.join(batch, extra, positions_needed(extra.rows)), None
        return merge(batch, extra, self.model.config), None

    def _finish(self, joining: Prefill) -> Batch | None:
        """The rest of `joining`'s prefill, chunk by chunk with nothing to interleave; its first tokens chosen."""
        try:
            logits = None
            while not joining.done:
                logits = self._forward(joining.next_chunk())
            return self._advance(joining.batch, logits)
        except Exception as err:
            _fail(joining.batch.rows, err)
            return None

    def _routed(self, names: list[str | None], phase: str) -> bool:
        """Whether this batch goes through `row_adapters` (the stacked path, `methods/stacked.py`) rather than
        the active-adapter path: mixed batches always; one adapter for every row when `phase` ("prefill" or
        "decode") is in `stack_one_adapter` and its method serves mixed batches (docs/serve.md)."""
        first = names[0]
        if any(n != first for n in names):
            return True
        return first is not None and phase in self.stack_one_adapter and self.mixed_batch(first)

    def _forward(self, batch: Batch, every_position: bool = False) -> torch.Tensor:
        """One forward of the batch with each row's adapter; returns the last position's logits (B, vocab), or
        every position's (B, L, vocab) when `every_position` (a prefill that scores its prompts)."""
        names = [row.request.adapter for row in batch.rows]
        used = tuple(sorted({n for n in names if n is not None}))
        with self.lock:
            state = adapter_state(self.model)
            state.active = used
            phase = "prefill" if batch.ids.shape[1] > 1 else "decode"
            state.row_adapters = list(names) if self._routed(names, phase) else None
            try:
                if isinstance(batch.cache, SlotCache):
                    return self.decoder.step(batch.ids, names)
                out = self.model(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.pos,
                                 use_cache=True, logits_to_keep=0 if every_position else 1,
                                 **{self._cache_kw: batch.cache})
            finally:
                state.row_adapters, state.active = None, ()
        return out.logits if every_position else out.logits[:, -1, :]


def _fail(rows: list[Row], err: Exception) -> None:
    for row in rows:
        settle(row.future, error=err)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _vocab_size(model) -> int:
    """The width of the model's logits (the output embedding's rows; the config's vocab_size without one)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


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
