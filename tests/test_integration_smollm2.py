"""Integration on the real default model (smollm2-135m, converted once from the packaged GGUF file):
every registered method trains a few steps through the one training loop and its training loss goes down,
and `eval` runs on the LoRA result. The training split is one batch, so every step sees the same examples
and the loss must fall if the method learns at all."""

from __future__ import annotations

import json
import math

import pytest

from tunelab.config import RunConfig
from tunelab.methods import all_methods
from tunelab.train import train

pytestmark = pytest.mark.integration

PAIRS = [
    {"prompt": "What colour is the sky on a clear day?", "response": "The sky is blue on a clear day."},
    {"prompt": "Name a fruit that is yellow.", "response": "A banana is a yellow fruit."},
    {"prompt": "How many legs does a spider have?", "response": "A spider has eight legs."},
    {"prompt": "What do bees make?", "response": "Bees make honey and wax."},
    {"prompt": "What is frozen water called?", "response": "Frozen water is called ice."},
]
# Larger steps than the methods' defaults: a handful of steps must visibly move every method.
LR = {"full": 1e-4, "prompt": 3e-2, "prefix": 1e-2, "adapter": 3e-3}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("smol-data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


def losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r and "val_loss" not in r]


@pytest.mark.parametrize("method", sorted(all_methods()))
def test_every_method_lowers_the_training_loss_on_smollm2(method, data_file, tmp_path):
    options = {"include_norms": True} if method == "bitfit" else {}  # Llama has no biases (see `tunelab methods`)
    lr = LR.get(method, 10 * all_methods()[method].default_lr)
    cfg = RunConfig(model="smollm2-135m", data=str(data_file), method=method, method_options=options,
                    max_steps=4, batch_size=4, seq_len=48, lr=lr, val_fraction=0.2, warmup_steps=0,
                    schedule="constant", output=str(tmp_path / method))
    summary = train(cfg, progress=False)
    curve = losses(tmp_path / method)
    assert len(curve) == 4 and all(math.isfinite(x) for x in curve)
    assert curve[-1] < curve[0], f"{method}: training loss did not fall: {curve}"
    assert summary["params_trainable"] > 0 and summary["artifact_bytes"] > 0
    assert (tmp_path / method / "run.json").is_file()


def test_eval_runs_on_a_lora_result(data_file, tmp_path):
    from tunelab.evaluation import evaluate_spec

    out = tmp_path / "lora"
    train(RunConfig(model="smollm2-135m", data=str(data_file), method="lora", max_steps=3, batch_size=4,
                    seq_len=48, lr=2e-3, val_fraction=0.2, output=str(out)), progress=False)
    base = evaluate_spec("smollm2-135m", str(data_file), seq_len=48)
    tuned = evaluate_spec("smollm2-135m", str(data_file), adapter=out / "artifact", seq_len=48)
    assert tuned["examples"] == base["examples"] == len(PAIRS)
    assert math.isfinite(tuned["loss"]) and tuned["perplexity"] == pytest.approx(math.exp(tuned["loss"]), rel=1e-6)
    assert tuned["loss"] != base["loss"]  # the adapter was applied
