"""Forgetting for classification: a linear probe on a held-out general labelled task, before and after training.

A classifier has no prose perplexity, so compare asks instead how much of the encoder's general knowledge the
training kept: how well a linear classifier on the model's features still separates a *different* labelled task
(`default:topics`, conversations in 6 topics, or the user's `--reference-data`: a labelled `text`/`label` file in
any format `--data` reads).

- The probe set: at most `PROBE_EXAMPLES` rows, the same number from each class (the first rows of each class in
  file order), split per class with every `TEST_EVERY`-th row held out for testing. The baseline worker tokenizes
  it once (truncated to the run's `seq_len`) and saves the token ids, which each strategy's worker reads back.
- The features: the mean over the real tokens (attention mask) of the model's last hidden state, with the trained
  adapter active (or the full-FT model). A task head never enters: only what the encoder computes.
- The classifier: closed-form ridge regression onto one-hot targets over standardized features (train-split
  mean and spread), `RIDGE` x the number of training rows as the penalty, in float64: no seed, no iterations, the
  same answer in every process. The figure is its accuracy on the held-out rows.

"Before" is the base model's accuracy, once; "after" each strategy's. Forgetting is `before - after`: positive
means the encoder lost general knowledge (the same sign as the causal LM's perplexity rise).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunelab.data import collate, forward_inputs, load_data
from tunelab.errors import DataError
from tunelab.train.evaluate import model_device, to_device

PROBE_EXAMPLES = 240  # at most, over every class
TEST_EVERY = 4  # in each class, rows 4, 8, 12, ... (1-based) are held out: a 3:1 split
RIDGE = 1.0  # the penalty, per training row, on standardized features
MEASURE = "probe_accuracy"


def probe_examples(spec: str, tokenizer, seq_len: int) -> dict:
    """The probe set of `spec` as `{"measure", "labels", "train", "test"}`, examples as `{"input_ids", "label"}`.

    Raises DataError naming `spec` when it is not a labelled task of at least 2 classes with a held-out row.
    """
    try:
        ds = load_data(spec, tokenizer, "classification", seq_len, truncation="truncate", val_fraction=0.0)
    except DataError as e:
        raise DataError(f"forgetting probe (--reference-data {spec}): {e}; for classification it must be a "
                        f"labelled task (text and label columns), such as default:topics") from None
    names = ds.label_names or []
    per_class = PROBE_EXAMPLES // max(len(names), 1)
    train, test, seen = [], [], [0] * len(names)
    for ex in ds.train:  # file order
        i = seen[ex["label"]] = seen[ex["label"]] + 1
        if i <= per_class:
            (test if i % TEST_EVERY == 0 else train).append({"input_ids": ex["input_ids"], "label": ex["label"]})
    if len(names) < 2 or not test:
        raise DataError(f"forgetting probe (--reference-data {spec}): {len(names)} classes, {len(test)} held-out "
                        f"rows; expected at least 2 classes and {TEST_EVERY} rows in one of them (at most "
                        f"{PROBE_EXAMPLES} rows are used, the same number from each class)")
    return {"measure": MEASURE, "labels": names, "train": train, "test": test}


def save_probe(probe: dict, path: Path) -> None:
    """Write the probe set's token ids, so that every worker scores exactly the same examples."""
    Path(path).write_text(json.dumps(probe))


def is_probe(reference) -> bool:
    """Whether a reference read back from its file is a probe set (else a list of prose sequences)."""
    return isinstance(reference, dict) and reference.get("measure") == MEASURE


def pooled_features(model, examples: list[dict], pad_id: int, batch_size: int) -> torch.Tensor:
    """(N, hidden) float64: the mean of the last hidden state over each example's real tokens."""
    was_training, device = model.training, model_device(model)
    model.eval()
    rows = []
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = to_device(collate(examples[start:start + batch_size], pad_id, "classification"), device)
                out = model(**forward_inputs(batch), output_hidden_states=True)
                hidden = out.hidden_states[-1].double()  # (B, L', H); L' = L unless virtual tokens are kept
                mask = batch["attention_mask"].double()  # (B, L)
                hidden = hidden[:, hidden.shape[1] - mask.shape[1]:]  # virtual tokens stand in front
                rows.append((hidden * mask[..., None]).sum(1).cpu() / mask.sum(1, keepdim=True).cpu())
    finally:
        model.train(was_training)
    return torch.cat(rows)


def ridge_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                   n_classes: int) -> float:
    """Held-out accuracy of a ridge classifier (one-hot targets) fit in closed form on standardized features."""
    mean, std = x_train.mean(0), x_train.std(0, correction=0).clamp_min(1e-6)
    xs, xt = (x_train - mean) / std, (x_test - mean) / std  # (N, H), centred on the train split
    targets = torch.nn.functional.one_hot(y_train, n_classes).double()  # (N, C)
    bias = targets.mean(0)
    gram = xs.T @ xs + RIDGE * len(xs) * torch.eye(xs.shape[1], dtype=xs.dtype)  # (H, H)
    weights = torch.linalg.solve(gram, xs.T @ (targets - bias))  # (H, C)
    predicted = (xt @ weights + bias).argmax(1)
    return float((predicted == y_test).double().mean())


def probe_accuracy(model, probe: dict, pad_id: int, batch_size: int) -> float:
    """The probe's held-out accuracy on `model`'s pooled features (the model as it is: adapters as active)."""
    def split(name):
        examples = probe[name]
        return (pooled_features(model, examples, pad_id, batch_size),
                torch.tensor([e["label"] for e in examples], dtype=torch.long))

    (x_train, y_train), (x_test, y_test) = split("train"), split("test")
    return ridge_accuracy(x_train, y_train, x_test, y_test, len(probe["labels"]))
