"""The tensors of rows decoding together: left-padded prompts, the attention mask, positions, the KV cache.

A `Batch` is always ready for its next forward. Rows that finish leave it (and its cache); a batch of rows
just prefilled can be merged into a running one (continuous batching) by left-padding the shorter cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tunelab.serve.logits import Controls
from tunelab.serve.slots import SlotCache


@dataclass
class Batch:
    """Rows decoding together. `ids` (B, L) is what the next forward feeds: the prompts, then one token per row;
    `mask` (B, S + L) covers the cache's S positions and `ids`; `pos` (B, L) are the position ids of `ids`
    (both None on a `SlotCache`, which holds each row's length itself).
    `controls`: the rows' penalties and biases (None: no row has any); `top_k`: how many alternatives the step
    reports with each token's logprob (None: no row asks for logprobs)."""

    rows: list
    ids: torch.Tensor
    mask: torch.Tensor | None
    pos: torch.Tensor | None
    cache: DynamicCache | SlotCache
    controls: Controls | None = None
    top_k: int | None = None


def prefill_batch(rows: list, prompts: list[list[int]], pad_id: int, device, config) -> Batch:
    """Left-pad `prompts` into one batch with an empty cache."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row's positions start at 0
    return Batch(rows, ids.to(device), mask.to(device), pos.to(device), DynamicCache(config=config))


class Prefill:
    """A prefilled-to-be `batch` fed in chunks of at most `budget` tokens over its rows (chunked prefill).

    Each `next_chunk()` is the next forward's view: a slice of the prompt columns, the mask up to its end, their
    positions, and the shared cache, which fills chunk by chunk. When `done`, the cache holds every prompt
    position and `batch` (full mask, last positions) is where a one-shot prefill of the same prompts would be.
    """

    def __init__(self, batch: Batch, budget: int):
        self.batch, self.offset = batch, 0
        self.width = max(1, budget // len(batch.rows))  # prompt columns per chunk

    @property
    def done(self) -> bool:
        return self.offset >= self.batch.ids.shape[1]

    def next_chunk(self) -> Batch:
        b, start = self.batch, self.offset
        self.offset = end = min(start + self.width, b.ids.shape[1])
        return Batch(b.rows, b.ids[:, start:end], b.mask[:, :end], b.pos[:, start:end], b.cache, b.controls,
                     b.top_k)


def next_step(batch: Batch, tokens: list[int], keep: list[int]) -> Batch:
    """After a forward: keep rows `keep` (finished ones leave the cache too) and feed each its new token."""
    if isinstance(batch.cache, SlotCache):  # rows at their own lengths: no mask or positions to carry
        return _next_slot_step(batch, tokens, keep)
    controls = batch.controls
    if len(keep) < len(batch.rows):
        sel = torch.tensor(keep, device=batch.mask.device)
        batch.cache.batch_select_indices(sel)
        batch.mask, batch.pos = batch.mask[sel], batch.pos[sel]
        controls = controls.select(sel) if controls is not None else None
    ids = torch.tensor([[tokens[i]] for i in keep], device=batch.mask.device)  # (B', 1)
    if controls is not None:
        controls.observe(ids)  # the penalties count generated tokens
    mask = torch.cat([batch.mask, batch.mask.new_ones(len(keep), 1)], dim=-1)  # (B', S + 1)
    return Batch([batch.rows[i] for i in keep], ids, mask, batch.pos[:, -1:] + 1, batch.cache, controls,
                 batch.top_k)


def _next_slot_step(batch: Batch, tokens: list[int], keep: list[int]) -> Batch:
    controls = batch.controls
    if len(keep) < len(batch.rows):
        batch.cache.keep(keep)
        if controls is not None:
            controls = controls.select(torch.tensor(keep, device=batch.ids.device))
    ids = torch.tensor([[tokens[i]] for i in keep], device=batch.ids.device)  # (B', 1)
    if controls is not None:
        controls.observe(ids)
    return Batch([batch.rows[i] for i in keep], ids, None, None, batch.cache, controls, batch.top_k)


def can_merge(batch: Batch) -> bool:
    """Whether another batch can join this one: one token per row next, and a plain (non-sliding) cache."""
    if isinstance(batch.cache, SlotCache):
        return True
    return batch.ids.shape[1] == 1 and all(type(layer) is DynamicLayer for layer in batch.cache.layers)


def merge(a: Batch, b: Batch, config) -> Batch:
    """One batch of the rows of `a` then `b` (both `can_merge`): the shorter cache is left-padded and masked."""
    len_a, len_b = a.mask.shape[1], b.mask.shape[1]
    width = max(len_a, len_b)

    def pad(t: torch.Tensor, missing: int, dim_from_end: int) -> torch.Tensor:
        # F.pad takes (left, right) pairs from the last dim backwards; zeros on the left of the sequence dim
        return F.pad(t, (0, 0) * dim_from_end + (missing, 0)) if missing else t

    layers = [(torch.cat([pad(la.keys, width - len_a, 1), pad(lb.keys, width - len_b, 1)]),
               torch.cat([pad(la.values, width - len_a, 1), pad(lb.values, width - len_b, 1)]))
              for la, lb in zip(a.cache.layers, b.cache.layers)]  # keys/values: (B, heads, S, head_dim)
    mask = torch.cat([pad(a.mask, width - len_a, 0), pad(b.mask, width - len_b, 0)])  # (Ba + Bb, width)
    tops = [k for k in (a.top_k, b.top_k) if k is not None]
    return Batch(a.rows + b.rows, torch.cat([a.ids, b.ids]), mask, torch.cat([a.pos, b.pos]),
                 DynamicCache(layers, config=config),
                 Controls.concat(a.controls, len(a.rows), b.controls, len(b.rows)), max(tops) if tops else None)
