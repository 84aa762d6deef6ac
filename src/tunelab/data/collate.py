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
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if "position_ids" in examples[0]:  # document-packed chunks (`pack(..., documents=True)`)
        batch["position_ids"] = _positions(examples, longest)
    return batch


def _positions(examples: list[dict], longest: int) -> torch.Tensor:
    """(batch, seq) position ids of packed chunks; padding continues its row's last document (its labels are
    -100 and it comes after every real token, so causal attention keeps it out of the real tokens' outputs)."""
    positions = torch.empty((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["position_ids"])
        positions[row, :n] = torch.tensor(example["position_ids"], dtype=torch.long)
        start = example["position_ids"][-1] + 1 if n else 0
        positions[row, n:] = torch.arange(start, start + longest - n)
    return positions


def forward_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's keyword inputs for a collated batch.

    Document-packed batches give `position_ids` that restart at each document, no attention mask and no cache:
    transformers then builds a causal mask that also keeps each token inside its own document (its packed
    sequence detection, as for `DataCollatorWithFlattening`). Other batches give the padding mask.
    """
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def pack(examples: list[dict], seq_len: int, documents: bool = False) -> list[dict]:
    """Concatenate causal-lm examples (ids and labels together) and cut the stream into `seq_len` chunks.

    With `documents`, each chunk also carries `position_ids` that restart at 0 where a document starts, and the
    label of a document's first token is -100 (nothing of its own precedes it): attention then stays inside each
    document (see `forward_inputs`), and no token is predicted from another document. Without it, a token may
    attend to the end of the previous document in its chunk (each text ends with EOS, which marks the boundary).
    The last, shorter chunk is kept; chunks with nothing to predict are left out.
    """
    ids = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    if documents:
        labels = [IGNORE_INDEX if i == 0 else t for e in examples for i, t in enumerate(e["labels"])]
        positions = [i for e in examples for i in range(len(e["input_ids"]))]
    chunks = []
    for start in range(0, len(ids), seq_len):
        chunk = {"input_ids": ids[start:start + seq_len], "labels": labels[start:start + seq_len]}
        if documents:
            chunk["position_ids"] = positions[start:start + seq_len]
        chunks.append(chunk)
    return [c for c in chunks if has_target(c)]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a permutation of range(n), the same in every process for (seed, epoch).

    The generator seed is derived from (seed, epoch) with SHA-256, not Python's per-process `hash`.
    """
    digest = hashlib.sha256(f"tunelab-epoch:{seed}:{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)  # < 2**63
    return torch.randperm(n, generator=generator).tolist()
