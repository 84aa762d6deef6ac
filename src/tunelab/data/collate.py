"""Batches, packing and the sample order of an epoch."""

from __future__ import annotations

import hashlib

import torch

from tunelab.data.formats import IGNORE_INDEX, has_target


def collate(examples: list[dict], pad_id: int, task: str = "causal-lm") -> dict[str, torch.Tensor]:
    """Right-pad a list of examples to the longest one.

    Returns `input_ids` and `attention_mask` (batch, seq) LongTensors, and `labels`: (batch, seq) with -100 on
    padding for causal-lm, or (batch,) class indices for classification.
    """
    if not examples:
        raise ValueError("collate: got no examples; a batch must hold at least one")
    longest = max(len(e["input_ids"]) for e in examples)
    if longest == 0:
        raise ValueError("collate: every example is empty; a batch must hold at least one token")
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)  # (batch, seq)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
    if task == "classification":
        labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)  # (batch,)
    else:
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)  # (batch, seq)
        for row, example in enumerate(examples):
            labels[row, : len(example["labels"])] = torch.tensor(example["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack(examples: list[dict], seq_len: int) -> list[dict]:
    """Concatenate causal-lm examples (ids and labels together) and cut the stream into `seq_len` chunks.

    Attention is not masked between packed documents: a token may attend to the end of the previous document
    in its chunk (each text ends with EOS, which marks the boundary). The last, shorter chunk is kept; chunks
    with nothing to predict are left out.
    """
    ids = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    chunks = [{"input_ids": ids[i:i + seq_len], "labels": labels[i:i + seq_len]} for i in range(0, len(ids), seq_len)]
    return [c for c in chunks if has_target(c)]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a permutation of range(n), the same in every process for (seed, epoch).

    The generator seed is derived from (seed, epoch) with SHA-256, not Python's per-process `hash`.
    """
    digest = hashlib.sha256(f"tunelab-epoch:{seed}:{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)  # < 2**63
    return torch.randperm(n, generator=generator).tolist()
