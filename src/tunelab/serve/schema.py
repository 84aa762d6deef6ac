"""The request bodies of the OpenAI-compatible API, as strict pydantic models.

Types are strict, as OpenAI's API is: `"8"` or `true` is not a `max_tokens`, `"yes"` is not a `stream` (an
integer is still a valid `temperature`). Unknown fields are errors. Text fields must be Unicode text a
tokenizer can take (no lone surrogates such as `"\\ud800"`), and the fields a client could make huge have
limits: `model` names, stop strings and `seed` (a 64-bit integer).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from tunelab.serve.engine import GenerationRequest

MAX_MODEL_CHARS = 256  # an adapter name is a short relative path; the OS refuses paths past PATH_MAX anyway
MAX_STOP_CHARS = 256  # each stop string is compared against the text's tail at every step
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


class _Params(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's names and defaults)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: ModelName
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = None  # OpenAI allows up to 4
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    stream: bool = False
    n: Literal[1] = 1
    user: Text | None = None

    def generation(self, prompt_ids: list[int], max_tokens: int) -> GenerationRequest:
        """The engine request for these parameters, generating at most `max_tokens`."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return GenerationRequest(prompt_ids, max_tokens=max_tokens,
                                 temperature=self.temperature, top_p=self.top_p, stop=stops, seed=self.seed)


class CompletionRequest(_Params):
    """POST /v1/completions."""

    prompt: Text


class ChatMessage(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text


class ChatCompletionRequest(_Params):
    """POST /v1/chat/completions (`max_completion_tokens` is OpenAI's newer name for `max_tokens`)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
