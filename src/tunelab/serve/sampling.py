"""Choosing the next token of one row, and following a row's text for stop strings.

Each row samples with its own `torch.Generator`, so a request with a `seed` gets the same tokens whatever
else shares its batch.
"""

from __future__ import annotations

import torch

_NO_MORE_TEXT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to
# Below this temperature sampling is greedy: logits / T would overflow float32 (a 1e-45 temperature turns every
# logit into +-inf and the probabilities into NaN), and the distribution is a one-hot at argmax long before.
MIN_TEMPERATURE = 1e-3


class SamplingError(ValueError):
    """One row's logits cannot be sampled from (NaN or +inf); that row alone fails."""


def row_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request: seeded by `seed`, or from the OS when the request gives none."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def next_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Pick a token from one row's next-token `logits` (vocab,).

    A temperature below `MIN_TEMPERATURE` (0 included) is greedy (argmax). Otherwise the logits are divided by
    the temperature and sampled from the smallest set of tokens whose probability reaches `top_p` (nucleus
    sampling, Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration"); a `top_p` of 0 or less (or
    NaN) is greedy too, one above 1 is 1. Raises `SamplingError` for NaN or +inf logits.
    """
    logits = logits.float()
    if bool((torch.isnan(logits) | torch.isposinf(logits)).any()):  # -inf is a token of probability 0
        raise SamplingError("the model's next-token scores for this request are NaN or infinite")
    if not (temperature >= MIN_TEMPERATURE and top_p > 0):  # NaN compares False: greedy too
        return int(torch.argmax(logits))
    top_p = min(top_p, 1.0)
    probs = torch.softmax(logits / temperature, dim=-1).cpu()
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep a token while the mass before it is below top_p, so the most likely token is always kept
        keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


class StopText:
    """The decoded text of one row so far, cut at the first stop string, with what is safe to stream.

    Text that might still become a stop string (a suffix equal to a stop string's prefix) or an incomplete
    UTF-8 character is held back from `new_text` until the next tokens decide it.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.stopped = False
        self.sent = 0

    def update(self, decoded: str) -> None:
        """Set the row's full decoded completion; cut it at the earliest stop string if one appeared."""
        hits = [i for i in (decoded.find(s) for s in self.stops) if i >= 0]
        if hits:
            decoded, self.stopped = decoded[: min(hits)], True
        self.text = decoded

    def new_text(self, final: bool = False) -> str:
        """The text not yet handed out that can no longer change; everything left when `final`."""
        end = len(self.text) if final or self.stopped else self._safe_end()
        chunk = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return chunk

    def _safe_end(self) -> int:
        end = len(self.text.rstrip(_NO_MORE_TEXT))
        for stop in self.stops:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if self.text[end - k:end] == stop[:k]:
                    end -= k
                    break
        return max(end, self.sent)
