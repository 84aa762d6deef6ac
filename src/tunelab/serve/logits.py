"""What the engine does to a batch's next-token scores between the forward and the choice of tokens.

- `Controls`: OpenAI's `frequency_penalty`, `presence_penalty` and `logit_bias`, as (rows, vocab) tensors on the
  model's device, so one step adjusts every row in three tensor operations (no loop over rows). It exists only
  for batches where some row asks for one of them; a batch without them pays nothing.
- `StepLogprobs`: the chosen token's log-probability and the top-k alternatives of each row, in the model's own
  distribution (the raw scores, before penalties and temperature, as vLLM reports them by default), fetched in
  the step's one host transfer.
- `prompt_logprobs`: the log-probability of every prompt token after the ones before it (echo + logprobs:
  loglikelihood scoring, as lm-eval-harness asks for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenLogprob:
    """One token's log-probability and the `top` most likely tokens at its position, as (token id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def wants_controls(req) -> bool:
    """Whether request `req` needs penalties or a logit bias applied to its scores."""
    return bool(req.frequency_penalty or req.presence_penalty or req.logit_bias)


@dataclass
class Controls:
    """Per-row penalties and biases of a batch. `counts` (B, V): how often each row generated each token;
    `frequency`, `presence` (B, 1): the penalties; `bias` (B, V): the logit bias (zeros where none is given)."""

    counts: torch.Tensor
    frequency: torch.Tensor
    presence: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def for_requests(cls, requests: list, vocab: int, device) -> Controls | None:
        """The controls of rows `requests` (None when no row needs any: the batch skips this step)."""
        if not any(wants_controls(r) for r in requests):
            return None
        bias = torch.zeros(len(requests), vocab)
        for i, req in enumerate(requests):  # once per row at prefill, never per step
            if req.logit_bias:
                ids = torch.tensor(list(req.logit_bias), dtype=torch.long)
                bias[i, ids] = torch.tensor(list(req.logit_bias.values()), dtype=torch.float)
        per_row = torch.tensor([[r.frequency_penalty, r.presence_penalty] for r in requests], dtype=torch.float)
        per_row, bias = per_row.to(device), bias.to(device)
        return cls(torch.zeros_like(bias), per_row[:, :1], per_row[:, 1:], bias)

    @classmethod
    def zeros(cls, rows: int, vocab: int, device) -> Controls:
        """Controls that change nothing, for `rows` rows joining a batch that has controls."""
        z = torch.zeros(rows, vocab, device=device)
        return cls(z, z[:, :1].clone(), z[:, :1].clone(), z.clone())

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores (B, V) after the penalties and the bias (OpenAI's formula): a token generated c times loses
        c * frequency + (c > 0) * presence, and gains its bias."""
        logits = logits.float()
        return logits - self.counts * self.frequency - (self.counts > 0) * self.presence + self.bias

    def observe(self, tokens: torch.Tensor) -> None:
        """Count each row's new token, `tokens` (B, 1) on the device."""
        self.counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=self.counts.dtype))

    def select(self, rows: torch.Tensor) -> Controls:
        """The controls of the rows kept, `rows` (B',) on the device."""
        return Controls(self.counts[rows], self.frequency[rows], self.presence[rows], self.bias[rows])

    @staticmethod
    def concat(a: Controls | None, rows_a: int, b: Controls | None, rows_b: int) -> Controls | None:
        """The controls of batch a's rows then batch b's (a side without controls gets zeros)."""
        if a is None and b is None:
            return None
        some = a if a is not None else b
        vocab, device = some.counts.shape[1], some.counts.device
        a = a if a is not None else Controls.zeros(rows_a, vocab, device)
        b = b if b is not None else Controls.zeros(rows_b, vocab, device)
        return Controls(*(torch.cat([x, y]) for x, y in zip(
            (a.counts, a.frequency, a.presence, a.bias), (b.counts, b.frequency, b.presence, b.bias))))


def step_numbers(raw: torch.Tensor, scores: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """What one step brings to the host in one transfer, as float32 (B, 3 + 2k) (token ids below 2^24, every real
    vocabulary, are exact in it; float64 is missing on some devices):
    the argmax of `scores`, whether `scores` hold NaN/+inf, and when `top_k` is not None the raw log-probability of
    that argmax then the k most likely tokens' log-probabilities and ids (`raw`: the model's scores (B, V))."""
    bad = (torch.isnan(scores) | torch.isposinf(scores)).any(-1)
    greedy = scores.argmax(-1)
    cols = [greedy.float(), bad.float()]
    if top_k is not None:
        logp = torch.log_softmax(raw.float(), dim=-1)
        top_v, top_i = logp.topk(top_k, dim=-1)  # k = 0: empty (B, 0)
        cols += [logp.gather(1, greedy[:, None])[:, 0]]
        return torch.cat([torch.stack(cols, 1), top_v, top_i.float()], 1)
    return torch.stack(cols, 1)


def read_step(numbers: list[float], top_k: int | None) -> tuple[int, bool, float | None, list[tuple[int, float]]]:
    """One row of `step_numbers` as (argmax, finite, argmax's logprob or None, top as [(id, logprob)])."""
    greedy, finite = int(numbers[0]), not numbers[1]
    if top_k is None:
        return greedy, finite, None, []
    values, ids = numbers[3:3 + top_k], numbers[3 + top_k:]
    return greedy, finite, numbers[2], [(int(i), v) for i, v in zip(ids, values)]


def prompt_logprobs(logits: torch.Tensor, ids: torch.Tensor, rows: list[int], prompts: list[list[int]],
                    top_ks: list[int]) -> list[list[TokenLogprob | None]]:
    """Each prompt token's log-probability given the tokens before it, for batch rows `rows`.

    `logits` (B, L, V) are the prefill's scores at every position, `ids` (B, L) its left-padded prompts on the
    device, `prompts` the same rows' prompts on the host (row i's prompt fills the last len(prompt) places), and
    `top_ks` how many alternatives each row reports. The first token has no context: None. One host transfer.
    """
    width, top_k = ids.shape[1], max(top_ks)
    parts = []
    for i, prompt in zip(rows, prompts):  # once per row at prefill, for the rows that asked
        start = width - len(prompt)
        logp = torch.log_softmax(logits[i, start:width - 1].float(), dim=-1)  # (n - 1, V): position t -> t + 1
        top_v, top_i = logp.topk(top_k, dim=-1)
        parts.append(torch.cat([logp.gather(1, ids[i, start + 1:, None]), top_v, top_i.float()], 1))
    numbers = torch.cat(parts).tolist() if parts else []
    out, at = [], 0
    for prompt, k in zip(prompts, top_ks):
        mine, at = numbers[at:at + len(prompt) - 1], at + len(prompt) - 1
        out.append([None] + [TokenLogprob(t, r[0], [(int(j), v) for v, j in zip(r[1:1 + k], r[1 + top_k:])])
                             for t, r in zip(prompt[1:], mine)])
    return out
