"""OpenAI's response bodies: text and chat completion objects, their stream chunks, logprobs and usage."""

from __future__ import annotations

import functools
import time

from tunelab.serve.logits import TokenLogprob
from tunelab.serve.request import GenerationResult


class TokenText:
    """Each token id's own text, as logprobs show it (decoded alone; cached)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=65536)(self._decode)

    def _decode(self, token: int) -> str:
        return self.tokenizer.decode([token])


def completion_logprobs(ids: list[int], entries: list[TokenLogprob | None], words: TokenText,
                        offset: int = 0) -> dict:
    """The completions `logprobs` object for tokens `ids`, one entry each (None: no logprob, a prompt's first
    token). `top_logprobs` maps token text to logprob and always holds the chosen token (as vLLM does), so a
    client can tell a greedy token by comparing it with the dict's maximum."""
    tokens = [words.text(t) for t in ids]
    tops = []
    for entry in entries:
        if entry is None:
            tops.append(None)
            continue
        top = {words.text(t): lp for t, lp in entry.top}
        top.setdefault(words.text(entry.token), entry.logprob)
        tops.append(top)
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": [e.logprob if e else None for e in entries], "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprob], words: TokenText) -> dict:
    """The chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    def one(token: int, logprob: float) -> dict:
        text = words.text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


class TextShape:
    """OpenAI's text completion objects."""

    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def choice(self, index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def delta(self, index: int, text: str | None, finish: str | None, logprobs: dict | None = None) -> dict:
        return self.choice(index, text or "", finish, logprobs)

    def opening(self, index: int) -> dict | None:
        return None


class ChatShape:
    """OpenAI's chat completion objects."""

    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def choice(self, index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish}

    def delta(self, index: int, text: str | None, finish: str | None, logprobs: dict | None = None) -> dict:
        delta = {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def opening(self, index: int) -> dict:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}


def envelope(rid: str, model: str, obj: str) -> dict:
    """The fields every response object and chunk opens with."""
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model}


def usage(results: list[GenerationResult], per_prompt: int) -> dict:
    """Token counts of a request: each prompt once (its `per_prompt` choices share it), every completion."""
    prompt = sum(r.prompt_tokens for r in results[::per_prompt])
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
