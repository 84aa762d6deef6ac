"""Bad adapter dirs give one-line errors naming the file (and the key, parameter or field), and a failed load
leaves the model as it was (RELIABILITY.md cases 9, 10, 12, 13, 15)."""

from __future__ import annotations

import json

import pytest
import torch
from builders import build_tiny
from safetensors.torch import load_file, save_file
from test_artifacts import lora_model

from tunelab.artifacts import load_adapter, method_for_config, save_artifact
from tunelab.errors import ArtifactError, ConfigError
from tunelab.methods.base import adapter_state


@pytest.fixture
def saved(tokenizer, tmp_path):
    """A valid LoRA artifact of the tiny Llama."""
    save_artifact(lora_model("llama", tokenizer), tokenizer, "default", tmp_path / "a")
    return tmp_path / "a"


def load_fails(tokenizer, path, error=ArtifactError, match=None):
    """Load into a fresh base: the error must be one line, and the model left without any adapter."""
    model = build_tiny("llama", tokenizer)
    names_before = {n for n, _ in model.named_parameters()}
    with pytest.raises(error, match=match) as err:
        load_adapter(model, path)
    assert "\n" not in str(err.value)
    assert adapter_state(model).methods == {} and {n for n, _ in model.named_parameters()} == names_before
    return str(err.value)


def edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not ...}
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_config_not_json(saved, tokenizer):
    (saved / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8,')
    msg = load_fails(tokenizer, saved, match="not valid JSON")
    assert str(saved / "adapter_config.json") in msg


def test_config_not_an_object(saved, tokenizer):
    (saved / "adapter_config.json").write_text("[1, 2]")
    load_fails(tokenizer, saved, match="expected a JSON object, found list")


def test_config_without_peft_type(saved, tokenizer):
    edit_config(saved, peft_type=...)
    msg = load_fails(tokenizer, saved, match="no 'peft_type' field")
    assert "LORA" in msg and str(saved / "adapter_config.json") in msg


def test_unknown_peft_type_lists_supported(saved, tokenizer):
    edit_config(saved, peft_type="VERA")
    load_fails(tokenizer, saved, match=r"peft_type 'VERA' is not supported; supported: .*LORA")
    with pytest.raises(ArtifactError, match="VERA"):
        method_for_config({"peft_type": "VERA"})


def test_unsupported_peft_feature_is_a_config_error(saved, tokenizer):
    edit_config(saved, use_dora=True)
    load_fails(tokenizer, saved, ConfigError, match=r"adapter_config.json: field 'use_dora' = True")


def test_bad_option_value_names_the_file(saved, tokenizer):
    edit_config(saved, r=0)
    load_fails(tokenizer, saved, ConfigError, match=r"adapter_config.json: .*'r'")


def test_targets_missing_in_base(saved, tokenizer):
    edit_config(saved, target_modules=["attention.wq"])
    load_fails(tokenizer, saved, ConfigError, match=r"adapter_config.json: target_modules \['attention.wq'\]")


def test_missing_keys_are_listed(saved, tokenizer):
    weights = load_file(saved / "adapter_model.safetensors")
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    save_file({k: v for k, v in weights.items() if k != gone}, saved / "adapter_model.safetensors")
    msg = load_fails(tokenizer, saved, match=f"missing keys {gone}")
    assert str(saved / "adapter_model.safetensors") in msg


def test_wrong_shape_names_parameter_and_both_shapes(saved, tokenizer):
    weights = load_file(saved / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    weights[key] = torch.zeros(8, 31)
    save_file(weights, saved / "adapter_model.safetensors")
    load_fails(tokenizer, saved, match=rf"{key} has shape \(8, 31\), the base model needs \(8, 32\)")


def test_rank_of_file_differs_from_config(saved, tokenizer):
    edit_config(saved, r=4)  # the weights are rank 8
    load_fails(tokenizer, saved, match=r"has shape \(8, 32\), the base model needs \(4, 32\)")


def test_unexpected_keys_are_listed(saved, tokenizer):
    weights = load_file(saved / "adapter_model.safetensors")
    weights["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(8, 32)
    save_file(weights, saved / "adapter_model.safetensors")
    load_fails(tokenizer, saved, match="unexpected keys base_model.model.model.layers.0.mlp.up_proj.lora_A.weight")


@pytest.mark.parametrize("cut", [4, 40, -10])
def test_truncated_safetensors(saved, tokenizer, cut):
    data = (saved / "adapter_model.safetensors").read_bytes()
    (saved / "adapter_model.safetensors").write_bytes(data[:cut])
    msg = load_fails(tokenizer, saved, match="not a readable safetensors file")
    assert str(saved / "adapter_model.safetensors") in msg


def test_lying_header_never_allocates(saved, tokenizer):
    data = (saved / "adapter_model.safetensors").read_bytes()
    (saved / "adapter_model.safetensors").write_bytes((2**62).to_bytes(8, "little") + data[8:])
    load_fails(tokenizer, saved, match="not a readable safetensors file")


def test_pickle_weights_are_never_loaded(saved, tokenizer):
    (saved / "adapter_model.safetensors").unlink()
    (saved / "adapter_model.bin").write_bytes(b"not to be unpickled")
    load_fails(tokenizer, saved, match=r"weights file not found; pickle-based adapter_model.bin is never loaded")


def test_missing_dir_and_file_instead_of_dir(tokenizer, tmp_path):
    load_fails(tokenizer, tmp_path / "nope", match="adapter directory not found")
    (tmp_path / "file").write_text("x")
    load_fails(tokenizer, tmp_path / "file", match="is a file, expected an adapter directory")
    (tmp_path / "empty").mkdir()
    load_fails(tokenizer, tmp_path / "empty", match="neither adapter_config.json nor config.json")
