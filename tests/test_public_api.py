"""The public Python API (`import tunelab`): a bring-your-own-model flow through that surface alone, training
through `tunelab.train`, and `import tunelab` staying light (its names load on first use)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from builders import build_tiny, sample_batch

import tunelab


def logits(model, tokenizer) -> torch.Tensor:
    batch = sample_batch(tokenizer)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def manual_steps(model, tokenizer, steps: int = 4) -> list[float]:
    """A user's own loop: AdamW over the trainable parameters, causal-LM loss on a sample batch."""
    batch = sample_batch(tokenizer)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_bring_your_own_model_flow(tokenizer, tmp_path, capsys):
    model = tunelab.attach(build_tiny("llama", tokenizer), "lora", r=4, dropout=0.05, target_modules="all-linear")
    tunelab.print_trainable_parameters(model)
    trainable, total = tunelab.trainable_parameters(model)
    assert 0 < trainable < total
    assert capsys.readouterr().out == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * trainable / total:.4f}\n")
    losses = manual_steps(model, tokenizer)
    assert losses[-1] < losses[0]
    model.eval()
    want = logits(model, tokenizer)
    assert tunelab.save(model, tmp_path / "adapter") > 0

    fresh = build_tiny("llama", tokenizer)  # same seed: the same base, in eval mode
    assert not torch.allclose(logits(fresh, tokenizer), want, atol=1e-4)
    loaded = tunelab.load_adapter(fresh, tmp_path / "adapter")
    assert loaded is fresh
    assert torch.allclose(logits(loaded, tokenizer), want, atol=1e-5)  # dropout 0.05 is off: eval mode followed
    with tunelab.disabled(loaded):
        assert not torch.allclose(logits(loaded, tokenizer), want, atol=1e-4)
    merged = tunelab.merge(loaded)
    assert not any("lora" in n for n, _ in merged.named_modules())
    assert torch.allclose(logits(merged, tokenizer), want, atol=1e-5)


def test_attach_refuses_bad_options_in_one_line(tokenizer):
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match="options of method 'lora': unknown key 'rank'.*; valid keys: r, "):
        tunelab.attach(build_tiny("llama", tokenizer), "lora", rank=8)


def test_train_then_load_through_the_api(tiny_dirs, instruction_jsonl, tmp_path):
    cfg = tunelab.RunConfig(model=str(tiny_dirs["llama"]), data=str(instruction_jsonl), method="lora",
                            output=str(tmp_path / "run"), batch_size=4, seq_len=32)
    summary = tunelab.train(cfg, max_steps=3, progress=False)  # keywords override the config
    assert summary["status"] == "completed" and summary["steps"] == 3
    loaded = tunelab.load_model(str(tiny_dirs["llama"]), dtype="float32", device="cpu")
    model = tunelab.load_adapter(loaded.model.eval(), tmp_path / "run" / "artifact", name="trained")
    assert tunelab.trainable_parameters(model)[0] == summary["params_trainable"]


def test_import_stays_light():
    code = ("import sys, tunelab; heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "print(heavy, sorted(n for n in tunelab.__all__ if n != '__version__'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("[] ")  # nothing heavy at import time; every exported name resolves
    for name in tunelab.__all__:
        assert getattr(tunelab, name) is not None
    assert callable(tunelab.train) and callable(tunelab.train.evaluate)  # the package is the function too
