"""`compare --combine`: the plain-LoRA strategies of a comparison are combined and scored against their parts."""

from __future__ import annotations

import json
import math

import torch

from tunelab.artifacts import save_artifact
from tunelab.cli import main
from tunelab.measure.combined import combined_quality
from tunelab.methods import get_method


def fake_compare_dir(tmp_path, tiny_dirs, tokenizer, names):
    """`<out>/runs/<name>/artifact` as a comparison leaves them: LoRA adapters (random B) and one ia3 adapter."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "cmp"
    for i, name in enumerate(names):
        method = get_method("ia3" if name == "ia3" else "lora")
        model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
        method.inject(model, method.Options(), "default")
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in method.parameters(model, "default").values():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        save_artifact(model, tokenizer, "default", out / "runs" / name / "artifact", base_model=str(tiny_dirs["llama"]))
    return out


def test_combined_adapter_is_scored_against_its_parts(tiny_dirs, tokenizer, instruction_jsonl, tmp_path):
    out = fake_compare_dir(tmp_path, tiny_dirs, tokenizer, ["lora", "lora_b", "ia3"])
    record = combined_quality(out, ["lora", "lora_b", "ia3", "full"], "svd", model=str(tiny_dirs["llama"]),
                              data=str(instruction_jsonl), seq_len=32, batch_size=4, max_examples=8)
    assert set(record["parts"]) == {"lora", "lora_b"}  # ia3 is no LoRA; full never ran
    assert all(math.isfinite(v) for v in [*record["parts"].values(), record["combined_loss"]])
    assert record["combined_minus_best"] == record["combined_loss"] - min(record["parts"].values())
    assert json.loads((out / "combined.json").read_text()) == record
    assert (out / "combined" / "svd" / "adapter_config.json").is_file()


def test_one_lora_part_is_recorded_as_skipped(tiny_dirs, tokenizer, instruction_jsonl, tmp_path):
    out = fake_compare_dir(tmp_path, tiny_dirs, tokenizer, ["lora", "ia3"])
    record = combined_quality(out, ["lora", "ia3"], "linear", model=str(tiny_dirs["llama"]),
                              data=str(instruction_jsonl), seq_len=32, batch_size=4, max_examples=8)
    assert "needs two or more finished plain-LoRA strategies; found ['lora']" in record["skipped"]


def test_unknown_combination_refused_before_training(tmp_path, capsys):
    code = main(["compare", "--combine", "svdd", "--output", str(tmp_path / "c")])
    assert code == 2 and "--combine 'svdd': unknown (did you mean 'svd'?)" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
