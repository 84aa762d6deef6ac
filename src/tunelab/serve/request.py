"""One generation request, its result, and the decoding state of its row inside a batch (`Row`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from tunelab.serve.errors import ClientGone
from tunelab.serve.logits import TokenLogprob
from tunelab.serve.sampling import MIN_TEMPERATURE, SamplingError, StopText, next_token, row_generator


@dataclass
class GenerationRequest:
    """One completion to generate: prompt token ids, the adapter (None: base) and sampling parameters.

    `frequency_penalty`, `presence_penalty` and `logit_bias` (token id -> bias) change the scores as OpenAI's API
    does. `logprobs`: report each generated token's log-probability and this many most likely alternatives
    (None: none). `prompt_logprobs`: the same for every prompt token (echo scoring); with it, `max_tokens` may be
    0 (score the prompt, generate nothing).

    `on_text`, when given, receives the completion's text in pieces as it becomes final (for streaming);
    it is called on the engine thread and must not block for long. `on_logprobs`, with `on_text` and `logprobs`,
    receives just before each piece (and at the end) the logprobs of the tokens generated since the last piece.
    `cancel()` (a client that hung up) drops the request from the queue, or from its batch at the next decode
    step.
    """

    prompt_ids: list[int]
    adapter: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    on_text: Callable[[str], None] | None = None
    on_logprobs: Callable[[list[TokenLogprob]], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def cancel(self) -> None:
        """Stop generating this request (thread-safe); its future then fails with `ClientGone`."""
        self.cancelled.set()


@dataclass
class GenerationResult:
    """A finished completion. `finish_reason` is "stop" (EOS or a stop string) or "length" (max_tokens).

    `token_ids` excludes the EOS token; `completion_tokens` counts every generated token, EOS included, and so
    does `logprobs` (one per generated token, when asked). `prompt_logprobs` has one entry per prompt token, the
    first None (when asked).
    """

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class StepRead:
    """What the step's one host transfer says about one row: its argmax, whether its scores are finite, and
    (when the batch reports logprobs) the argmax's raw log-probability and the top (id, logprob) pairs."""

    greedy: int
    finite: bool = True
    greedy_logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


class Row:
    """The decoding state of one request inside a wave."""

    def __init__(self, request: GenerationRequest, future: Future, tokenizer, eos_ids: set[int]):
        self.request, self.future, self.tokenizer, self.eos_ids = request, future, tokenizer, eos_ids
        self.token_ids: list[int] = []
        self.generated = 0
        self.text = StopText(request.stop)
        self.gen = row_generator(request.seed)
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] | None = [] if request.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # set by the engine at prefill
        self.logprobs_sent = 0  # how many of `logprobs` went to `on_logprobs`
        self.queued = time.monotonic()  # for the time to first token

    def step(self, scores: torch.Tensor, raw: torch.Tensor, i: int, read: StepRead) -> int:
        """Choose this row's next token from row `i` of the batch's `scores` (B, vocab) (after penalties; `raw`:
        before), update its text; return the token.

        `read` holds what is already on the host (the step's one sync); a greedy row touches no tensor. Any
        error (a row's numbers that cannot be sampled, a failing `on_text`) ends this row alone: its future gets
        the error and the row leaves the batch with the others untouched.
        """
        try:
            token = self._step(scores, raw, i, read)
            if self.finish_reason in ("stop", "length"):
                settle(self.future, result=self.result())
            return token
        except Exception as err:
            self.finish_reason = "error"
            settle(self.future, error=err)
            return 0

    def _step(self, scores: torch.Tensor, raw: torch.Tensor, i: int, read: StepRead) -> int:
        req = self.request
        if req.cancelled.is_set():
            self.finish_reason = "cancelled"
            settle(self.future, error=ClientGone("the client disconnected"))
            return 0
        if req.max_tokens == 0:  # echo scoring: the prefill gave the prompt's logprobs, nothing is generated
            self.finish_reason = "length"
            return 0
        if not read.finite:
            raise SamplingError("the model's next-token scores for this request are NaN or infinite")
        sampled = req.temperature >= MIN_TEMPERATURE and req.top_p > 0
        token = next_token(scores[i], req.temperature, req.top_p, self.gen) if sampled else read.greedy
        self.generated += 1
        if self.logprobs is not None:
            self._log(token, raw[i], read)
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

    def _log(self, token: int, raw: torch.Tensor, read: StepRead) -> None:
        """Record `token`'s raw log-probability: from the step's transfer when it is the argmax; a sampled
        token's is read from its row (sampled rows read their scores anyway)."""
        if token == read.greedy:
            logprob = read.greedy_logprob
        else:
            logprob = float(torch.log_softmax(raw.float(), dim=-1)[token])
        self.logprobs.append(TokenLogprob(token, logprob, read.top[:self.request.logprobs]))

    def _emit(self, final: bool) -> None:
        req = self.request
        if req.on_text is None:
            return
        chunk = self.text.new_text(final=final)
        if req.on_logprobs is not None and self.logprobs is not None and (chunk or final):
            entries, self.logprobs_sent = self.logprobs[self.logprobs_sent:], len(self.logprobs)
            if entries:
                req.on_logprobs(entries)
        if chunk:
            req.on_text(chunk)

    def result(self) -> GenerationResult:
        """The finished completion (after any text still held back is handed out)."""
        self._emit(final=True)
        return GenerationResult(self.token_ids, self.text.text, self.finish_reason or "length",
                                len(self.request.prompt_ids), self.generated, self.logprobs, self.prompt_logprobs)


def settle(future: Future, *, result=None, error: Exception | None = None) -> None:
    """Give `future` its result or error unless it already has one."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

