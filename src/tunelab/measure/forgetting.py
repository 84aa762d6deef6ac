"""Catastrophic forgetting: how much worse a fine-tuned model predicts general prose it never trained on.

The reference set is general prose (default `default:prose`, or the user's `--reference-data`), cut to a fixed
subset: the first N sequences, each truncated to the run's `seq_len`, so that every strategy and the base model
are scored on exactly the same tokens: the baseline worker tokenizes the subset once and saves the token ids, which
each strategy's worker reads back. "Before" is scored once on the base model; "after" inside each strategy's
worker, right after training. Forgetting is the change in perplexity, absolute and in percent.

A classifier has no prose perplexity: its forgetting is a linear probe's accuracy on a general labelled task
(`tunelab.measure.probe`); both come out of `forgetting_record` with the same sign (positive is worse).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tunelab.data import load_data
from tunelab.measure.schema import Forgetting
from tunelab.train import evaluate


def reference_examples(spec: str, tokenizer, seq_len: int, n_sequences: int) -> list[dict]:
    """The first `n_sequences` examples of the reference prose, each truncated to `seq_len` tokens.

    Loaded through `tunelab.data.load_data` as plain causal-LM text (loss on every token), with no validation
    split, so the subset is the same in every process.
    """
    ds = load_data(spec, tokenizer, "causal-lm", seq_len, truncation="truncate", val_fraction=0.0)
    examples = list(ds.train) + list(ds.val)
    return examples[:n_sequences]


def target_tokens(examples: list[dict]) -> int:
    """How many tokens are scored: labels other than -100 after the first position (labels are shifted by one)."""
    return sum(sum(1 for t in ex["labels"][1:] if t != -100) for ex in examples)


def reference_perplexity(model, examples: list[dict], pad_id: int, batch_size: int) -> float:
    """Perplexity of `model` on the reference `examples` (exp of the mean next-token loss)."""
    model.eval()
    result = evaluate(model, examples, "causal-lm", pad_id, batch_size)
    return float(result.get("perplexity", math.exp(result["loss"])))


def forgetting_record(before: float, after: float, measure: str = "prose_perplexity") -> Forgetting:
    """The change from `before` to `after`, signed so that positive is worse: a rise in prose perplexity, or a
    fall in the probe's accuracy (`measure` "probe_accuracy", `tunelab.measure.probe`)."""
    if measure == "probe_accuracy":
        delta = before - after
        return Forgetting(measure=measure, before_accuracy=before, after_accuracy=after, delta=delta,
                          delta_percent=100.0 * delta / before if before else 0.0)  # a probe at 0 before
    delta = after - before
    return Forgetting(measure=measure, before_perplexity=before, after_perplexity=after, delta=delta,
                      delta_percent=100.0 * delta / before)


def save_examples(examples: list[dict], path: Path) -> None:
    """Write the reference subset's token ids, so that every worker scores exactly the same tokens."""
    path.write_text(json.dumps([{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in examples]))


def load_examples(path: Path) -> list[dict] | dict:
    """The reference subset written by `save_examples` (or the probe set of `probe.save_probe`)."""
    return json.loads(Path(path).read_text())


def score_reference(loaded, examples: list[dict], batch_size: int) -> float:
    """Perplexity of a `LoadedModel` on the reference `examples` (its tokenizer gives the padding id)."""
    return reference_perplexity(loaded.model, examples, loaded.pad_id, batch_size)
