"""The request bodies of the OpenAI-compatible API, as strict pydantic models.

Types are strict, as OpenAI's API is: `"8"` or `true` is not a `max_tokens`, `"yes"` is not a `stream` (an
integer is still a valid `temperature`). Unknown fields are errors. Text fields must be Unicode text a
tokenizer can take (no lone surrogates such as `"\\ud800"`), and the fields a client could make huge have
limits: `model` names, stop strings, `seed` (a 64-bit integer), `logit_bias` entries, and the choices one request
may ask for (prompts x `n`). Checks that join two fields (`echo` with `max_tokens: 0`, `stream_options` with
`stream`) are `check()`, a 400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from tunelab.serve.errors import BadRequest
from tunelab.serve.request import GenerationRequest

MAX_MODEL_CHARS = 256  # an adapter name is a short relative path; the OS refuses paths past PATH_MAX anyway
MAX_STOP_CHARS = 256  # each stop string is compared against the text's tail at every step
MAX_CHOICES = 128  # prompts x n of one request: each is a row in the queue (256 places)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat's top_logprobs (vLLM's default)
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
INT64 = (-(2**63), 2**63 - 1)


def _unicode_text(value: str) -> str:
    """Refuse strings holding lone UTF-16 surrogates: valid JSON, but not text (no tokenizer can encode them)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"expected Unicode text, found a lone surrogate {value[err.start]!r} at character "
                         f"{err.start}") from None
    return value


Text = Annotated[str, AfterValidator(_unicode_text)]
StopText = Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS), AfterValidator(_unicode_text)]
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_MODEL_CHARS), AfterValidator(_unicode_text)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
TokenKey = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,10}$")]  # a token id, as JSON object keys are
Bias = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=INT64[1])]], Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    """`stream_options`: `include_usage` adds a last chunk with no choices and the request's usage."""

    include_usage: bool = False


class _Params(_Strict):
    """Fields shared by completions and chat completions (OpenAI's names and defaults)."""

    model: ModelName
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = None  # OpenAI allows up to 4
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    logit_bias: Annotated[dict[TokenKey, Bias], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    user: Text | None = None

    def check(self, prompts: int = 1) -> None:
        """Refuse field combinations no single field's type can: a 400 naming the field."""
        if self.stream_options is not None and not self.stream:
            raise BadRequest("stream_options: expected only with stream: true", param="stream_options")
        if prompts * self.n > MAX_CHOICES:
            raise BadRequest(f"n: {prompts} prompt(s) x n {self.n} = {prompts * self.n} choices, expected at "
                             f"most {MAX_CHOICES} in one request", param="n")

    def generations(self, prompt_ids: list[int], max_tokens: int, *, logprobs: int | None = None,
                    prompt_logprobs: int | None = None) -> list[GenerationRequest]:
        """The `n` engine requests for one prompt, each generating at most `max_tokens`.

        With a `seed`, choice j samples with seed + j, so the n choices differ and each is reproducible.
        """
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        return [GenerationRequest(list(prompt_ids), max_tokens=max_tokens, temperature=self.temperature,
                                  top_p=self.top_p, stop=stops,
                                  seed=self.seed if self.seed is None or j == 0 else (self.seed + j) % 2**64,
                                  frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                                  logit_bias=bias, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
                for j in range(self.n)]

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage-only chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Params):
    """POST /v1/completions. `prompt`: a string, a list of strings, a list of token ids, or a list of those.

    `logprobs` k: each token's log-probability and the k most likely alternatives; `echo`: the answer starts with
    the prompt (and, with `logprobs`, the prompt tokens' log-probabilities: loglikelihood scoring, where
    `max_tokens: 0` generates nothing).
    """

    prompt: (Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_CHOICES)] | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_CHOICES)])
    max_tokens: int | None = Field(None, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)

    def check(self, prompts: int = 1) -> None:
        super().check(prompts)
        if self.max_tokens == 0 and not (self.echo and self.logprobs is not None):
            raise BadRequest("max_tokens: expected at least 1 (0 only to score the prompt, with echo: true and "
                             "logprobs)", param="max_tokens")
        if self.stream and self.echo and self.logprobs is not None:
            raise BadRequest("logprobs: with echo, not available with stream: true; ask without streaming",
                             param="logprobs")


class TextPart(_Strict):
    """One part of a message's content given as a list (text parts only)."""

    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    """One chat turn. `content` may be a list of text parts; they are joined with newlines (as vLLM does)."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | Annotated[list[TextPart], Field(min_length=1)]

    def text(self) -> str:
        """The content as one string."""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatCompletionRequest(_Params):
    """POST /v1/chat/completions (`max_completion_tokens` is OpenAI's newer name for `max_tokens`).

    `logprobs: true` reports each generated token's log-probability, with `top_logprobs` alternatives.
    """

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def check(self, prompts: int = 1) -> None:
        super().check(prompts)
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs: expected only with logprobs: true", param="top_logprobs")

    def logprobs_k(self) -> int | None:
        """How many alternatives each token reports (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None
