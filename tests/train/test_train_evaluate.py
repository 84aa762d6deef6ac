"""evaluate(): token-weighted loss and perplexity, accuracy, eval mode and no gradients."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tunelab.data import collate
from tunelab.train import causal_lm_loss_sum, evaluate


def _examples(n=7, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ids = [rng.randrange(5, 250) for _ in range(rng.randint(3, 16))]
        masked = rng.randint(0, len(ids) - 2)
        out.append({"input_ids": ids, "labels": [-100] * masked + ids[masked:]})
    return out


def test_loss_is_token_weighted_not_a_mean_of_batch_means(tiny_llama, tokenizer):
    examples = _examples()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:  # one example at a time: no padding at all
            batch = collate([e], tokenizer.pad_token_id)
            s, n = causal_lm_loss_sum(tiny_llama(input_ids=batch["input_ids"]).logits, batch["labels"])
            total, count = total + float(s), count + n
    for batch_size in (1, 3, 7):
        result = evaluate(tiny_llama, examples, "causal-lm", tokenizer.pad_token_id, batch_size)
        assert result["loss"] == pytest.approx(total / count, rel=1e-5)
        assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_max_batches_limits_the_examples(tiny_llama, tokenizer):
    examples = _examples()
    first = evaluate(tiny_llama, examples[:2], "causal-lm", tokenizer.pad_token_id, 2)
    limited = evaluate(tiny_llama, examples, "causal-lm", tokenizer.pad_token_id, 2, max_batches=1)
    assert limited == pytest.approx(first)


def test_eval_mode_no_grad_and_mode_restored(tiny_bert, tokenizer):
    calls = []
    hook = tiny_bert.register_forward_hook(lambda m, a, o: calls.append((m.training, torch.is_grad_enabled())))
    tiny_bert.train()
    examples = [{"input_ids": [10 + i, 20, 30 + i], "label": i % 3} for i in range(5)]
    evaluate(tiny_bert, examples, "classification", tokenizer.pad_token_id, 2)
    hook.remove()
    assert calls and all(c == (False, False) for c in calls)
    assert tiny_bert.training  # restored
    tiny_bert.eval()
    evaluate(tiny_bert, examples, "classification", tokenizer.pad_token_id, 2)
    assert not tiny_bert.training


def test_classification_accuracy_and_loss(tiny_bert, tokenizer):
    tiny_bert.eval()
    examples = [{"input_ids": [10 + i, 20 + 2 * i, 30], "label": i % 3} for i in range(6)]
    with torch.no_grad():
        logits = torch.cat([tiny_bert(input_ids=torch.tensor([e["input_ids"]])).logits for e in examples])
    labels = torch.tensor([e["label"] for e in examples])
    result = evaluate(tiny_bert, examples, "classification", tokenizer.pad_token_id, 4)
    assert set(result) == {"loss", "accuracy"}
    assert result["accuracy"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    assert result["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)


def test_gradient_checkpointing_helper_enables_it_for_frozen_bases(tiny_llama):
    from tunelab.train.setup import enable_gradient_checkpointing

    for p in tiny_llama.parameters():
        p.requires_grad_(False)
    enable_gradient_checkpointing(tiny_llama)
    assert getattr(tiny_llama, "is_activation_checkpointing", None) or tiny_llama.is_gradient_checkpointing
    embeds = tiny_llama.get_input_embeddings()(torch.tensor([[1, 2, 3]]))
    assert embeds.requires_grad  # frozen embeddings still feed a graph that checkpointing can recompute
