"""collate (padding, masks, labels), pack, and the per-epoch sample order."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tunelab.data import IGNORE_INDEX, collate, epoch_order, pack


def test_collate_causal_lm_right_pads():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(examples, pad_id=0, task="causal-lm")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_classification_labels_are_a_vector():
    batch = collate([{"input_ids": [1, 2], "label": 3}, {"input_ids": [4], "label": 0}], pad_id=9,
                    task="classification")
    assert batch["labels"].shape == (2,) and batch["labels"].tolist() == [3, 0]
    assert batch["input_ids"].tolist() == [[1, 2], [4, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_collate_never_makes_an_empty_batch():
    with pytest.raises(ValueError, match="no examples"):
        collate([], pad_id=0, task="causal-lm")
    with pytest.raises(ValueError, match="every example is empty"):
        collate([{"input_ids": [], "labels": []}], pad_id=0, task="causal-lm")


def test_pack_cuts_and_leaves_out_chunks_without_targets():
    examples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]},
                {"input_ids": [4, 5, 6, 7, 8], "labels": [IGNORE_INDEX] * 5},
                {"input_ids": [9], "labels": [9]}]
    chunks = pack(examples, 3)
    # [1,2,3] [4,5,6] (no targets: left out) [7,8,9] (9 is a target at position 2)
    assert chunks == [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]},
                      {"input_ids": [7, 8, 9], "labels": [IGNORE_INDEX, IGNORE_INDEX, 9]}]


def test_epoch_order_is_a_deterministic_permutation():
    a = epoch_order(100, seed=3, epoch=0)
    assert sorted(a) == list(range(100)) and a != list(range(100))
    assert a == epoch_order(100, seed=3, epoch=0)
    assert a != epoch_order(100, seed=3, epoch=1)
    assert a != epoch_order(100, seed=4, epoch=0)
    torch.manual_seed(123)  # the global RNG plays no part
    assert a == epoch_order(100, seed=3, epoch=0)
    assert epoch_order(0, 0, 0) == []


def test_epoch_order_same_in_another_process():
    code = "from tunelab.data import epoch_order; print(epoch_order(50, 7, 2))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(epoch_order(50, 7, 2))
