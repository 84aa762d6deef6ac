"""Loss masking and gradient accumulation normalised over the whole window."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from builders import build_tiny

from tunelab.train import causal_lm_loss_sum
from tunelab.train.loop import accumulate_window
from tunelab.train.loss import classification_loss_sum, count_targets


def test_causal_lm_loss_sum_is_shifted_and_ignores_masked_labels():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, -100, 4, 5], [-100, -100, 3, -100, -100]])
    loss_sum, n = causal_lm_loss_sum(logits, labels)
    # position t predicts token t+1: targets are labels[:, 1:], 3 + 1 of them are not -100
    expected, count = 0.0, 0
    for b in range(2):
        for t in range(4):
            target = int(labels[b, t + 1])
            if target != -100:
                expected += float(F.cross_entropy(logits[b, t][None], torch.tensor([target])))
                count += 1
    assert n == count == 4
    assert loss_sum.dtype == torch.float32
    assert float(loss_sum) == pytest.approx(expected, rel=1e-6)


def test_causal_lm_loss_sum_is_fp32_for_bf16_logits():
    logits = torch.randn(1, 4, 9).bfloat16()
    labels = torch.tensor([[0, 1, 2, 3]])
    loss_sum, n = causal_lm_loss_sum(logits, labels)
    assert loss_sum.dtype == torch.float32 and n == 3
    ref = F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], reduction="sum")
    assert torch.equal(loss_sum, ref)


def test_loss_changes_only_where_labels_are_not_masked():
    torch.manual_seed(1)
    logits = torch.randn(1, 6, 5)
    labels = torch.tensor([[-100, -100, -100, 2, 3, 4]])
    base, _ = causal_lm_loss_sum(logits, labels)
    poked = logits.clone()
    poked[0, 0] += 10.0  # predicts labels[1] = -100: no effect
    assert torch.equal(causal_lm_loss_sum(poked, labels)[0], base)
    poked[0, 3] += 10.0  # predicts labels[4] = 3: changes the loss
    assert not torch.equal(causal_lm_loss_sum(poked, labels)[0], base)


def test_classification_loss_sum_counts_examples():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    loss_sum, n = classification_loss_sum(logits, labels)
    assert n == 3
    assert float(loss_sum) == pytest.approx(float(F.cross_entropy(logits, labels, reduction="sum")))


def _examples(tokenizer, n=8):
    """Examples of different lengths, some with a masked prompt, as tunelab.data produces them."""
    rng = random.Random(0)
    out = []
    for i in range(n):
        length = rng.randint(4, 20)
        ids = [rng.randrange(5, len(tokenizer)) for _ in range(length)]
        masked = rng.randint(0, length // 2) if i % 2 else 0
        out.append({"input_ids": ids, "labels": [-100] * masked + ids[masked:]})
    return out


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulation_4x2_equals_batch_8(tokenizer):
    from tunelab.data.collate import collate

    examples = _examples(tokenizer)
    pad = tokenizer.pad_token_id
    one = build_tiny("llama", tokenizer, seed=3).train()
    four = build_tiny("llama", tokenizer, seed=3).train()
    big = accumulate_window(one, [collate(examples, pad)], "causal-lm")
    micro = [collate(examples[i:i + 2], pad) for i in range(0, 8, 2)]
    assert len({b["input_ids"].shape[1] for b in micro}) > 1  # micro-batches really differ in padded length
    small = accumulate_window(four, micro, "causal-lm")
    assert big.targets == small.targets == sum(count_targets(b, "causal-lm") for b in micro)
    assert torch.allclose(big.loss_sum, small.loss_sum, rtol=1e-6, atol=1e-6)
    g1, g4 = _grads(one), _grads(four)
    assert g1.keys() == g4.keys() and len(g1) > 10
    for name in g1:
        assert torch.allclose(g1[name], g4[name], atol=1e-6), name
    # and one identical SGD step leaves the same weights
    for m in (one, four):
        torch.optim.SGD(m.parameters(), lr=1.0).step()
    for (n1, p1), (_, p4) in zip(one.named_parameters(), four.named_parameters()):
        assert torch.allclose(p1, p4, atol=1e-6), n1


def test_per_microbatch_mean_would_differ(tokenizer):
    """Guard that the test above has teeth: averaging per micro-batch gives different gradients here."""
    from tunelab.data.collate import collate
    from tunelab.train.loss import batch_loss_sum

    examples = _examples(tokenizer)
    pad = tokenizer.pad_token_id
    one = build_tiny("llama", tokenizer, seed=3).train()
    naive = build_tiny("llama", tokenizer, seed=3).train()
    accumulate_window(one, [collate(examples, pad)], "causal-lm")
    for i in range(0, 8, 2):
        s, n = batch_loss_sum(naive, collate(examples[i:i + 2], pad), "causal-lm")
        (s / n / 4).backward()
    diffs = [float((p1.grad - p2.grad).abs().max()) for p1, p2 in zip(one.parameters(), naive.parameters())]
    assert max(diffs) > 1e-4


def test_classification_window_normalises_by_examples(tokenizer):
    from tunelab.data.collate import collate

    rng = random.Random(1)
    examples = [{"input_ids": [rng.randrange(5, 200) for _ in range(rng.randint(3, 12))], "label": i % 3}
                for i in range(6)]
    pad = tokenizer.pad_token_id
    one = build_tiny("bert", tokenizer, seed=2).eval()  # eval: no dropout, so both runs see the same function
    three = build_tiny("bert", tokenizer, seed=2).eval()
    big = accumulate_window(one, [collate(examples, pad, "classification")], "classification")
    small = accumulate_window(three, [collate(examples[i:i + 2], pad, "classification") for i in (0, 2, 4)],
                              "classification")
    assert big.targets == small.targets == 6
    for (name, p1), (_, p3) in zip(one.named_parameters(), three.named_parameters()):
        if p1.grad is not None:
            assert torch.allclose(p1.grad, p3.grad, atol=1e-6), name
