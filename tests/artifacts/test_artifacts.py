"""save_artifact / load_adapter: the files written, a round trip into a fresh base, atomic replacement, and a
failed write that leaves the previous artifact intact. The helpers at the top serve this folder's tests."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from builders import build_tiny, sample_batch

import tunelab.artifacts.peft_format as peft_format
from tunelab.artifacts import (
    artifact_bytes, load_adapter, read_adapter_config, read_label_names, save_artifact, save_merged,
)
from tunelab.errors import ConfigError, ResourceError
from tunelab.methods import get_method
from tunelab.methods.base import adapter_state

LORA = get_method("lora")
FULL = get_method("full")
LABELS = ["sports", "tech", "politics"]


def logits(model, batch=None, tokenizer=None) -> torch.Tensor:
    batch = batch if batch is not None else sample_batch(tokenizer)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def randomize(params: dict, seed: int, std: float = 0.1) -> None:
    """Seeded non-zero values for every given parameter (LoRA's B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def lora_model(kind, tokenizer, seed=0, **options):
    model = build_tiny(kind, tokenizer)
    LORA.inject(model, LORA.Options(**options), "default")
    randomize(LORA.parameters(model, "default"), seed)
    return model


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_lora_round_trip_and_files(kind, tokenizer, tmp_path):
    model = lora_model(kind, tokenizer, r=4, target_modules="all-linear")
    want = logits(model, tokenizer=tokenizer)
    labels = LABELS if kind == "bert" else None
    written = save_artifact(model, tokenizer, "default", tmp_path / "a", base_model="base/dir", label_names=labels)
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert files == {"adapter_config.json", "adapter_model.safetensors", "tunelab.json"}
    assert written == artifact_bytes(tmp_path / "a") == sum((tmp_path / "a" / f).stat().st_size for f in files)
    config = read_adapter_config(tmp_path / "a")
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "base/dir"
    assert config["task_type"] == ("SEQ_CLS" if kind == "bert" else "CAUSAL_LM")
    assert config["label_names"] == labels == read_label_names(tmp_path / "a")
    fresh = build_tiny(kind, tokenizer)
    assert load_adapter(fresh, tmp_path / "a", name="task") == "task"
    assert adapter_state(fresh).active == ("task",)
    assert torch.allclose(logits(fresh, tokenizer=tokenizer), want, atol=1e-6)


def test_two_artifacts_on_one_base(tokenizer, tmp_path):
    outs = {}
    for seed in (1, 2):
        model = lora_model("llama", tokenizer, seed=seed)
        outs[seed] = logits(model, tokenizer=tokenizer)
        save_artifact(model, tokenizer, "default", tmp_path / str(seed))
    base = build_tiny("llama", tokenizer)
    for seed in (1, 2):
        load_adapter(base, tmp_path / str(seed), name=f"s{seed}")
    for seed in (1, 2):
        adapter_state(base).active = (f"s{seed}",)
        assert torch.allclose(logits(base, tokenizer=tokenizer), outs[seed], atol=1e-6)


def test_existing_dir_is_replaced_whole(tokenizer, tmp_path):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    save_artifact(lora_model("llama", tokenizer), tokenizer, "default", out)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]  # no temp or old dirs left


def test_failed_write_keeps_previous_artifact(tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "artifact"
    save_artifact(lora_model("llama", tokenizer, seed=1), tokenizer, "default", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(peft_format, "write_json", disk_full)  # after the weights file was written
    with pytest.raises(ResourceError, match=f"{out}: disk full"):
        save_artifact(lora_model("llama", tokenizer, seed=2), tokenizer, "default", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_full_artifact_is_an_hf_dir_with_labels(tokenizer, tmp_path):
    model = build_tiny("bert", tokenizer)
    FULL.inject(model, FULL.Options(), "default")
    randomize({"w": model.classifier.weight}, seed=3)
    want = logits(model, tokenizer=tokenizer)
    save_artifact(model, tokenizer, "default", tmp_path / "full", label_names=LABELS)
    files = {p.name for p in (tmp_path / "full").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tunelab.json"} <= files
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["id2label"] == {"0": "sports", "1": "tech", "2": "politics"}
    assert read_label_names(tmp_path / "full") == LABELS
    assert read_adapter_config(tmp_path / "full") == {"task_type": "SEQ_CLS", "label_names": LABELS}
    fresh = build_tiny("bert", tokenizer)
    load_adapter(fresh, tmp_path / "full")
    assert torch.allclose(logits(fresh, tokenizer=tokenizer), want, atol=1e-6)


def test_unknown_adapter_and_attached_adapters_are_refused(tokenizer, tmp_path):
    model = lora_model("llama", tokenizer)
    with pytest.raises(ConfigError, match="unknown adapter 'other'"):
        save_artifact(model, tokenizer, "other", tmp_path / "x")
    LORA.inject(model, LORA.Options(), "second")
    with pytest.raises(ConfigError, match=r"adapters \['second'\] are still attached"):
        save_merged(model, tokenizer, "default", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
