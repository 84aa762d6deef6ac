"""Shared fixtures: a tokenizer made locally and tiny Llama, GPT-2 and BERT-classification models built from
configs and saved as local HF model dirs. Nothing is downloaded. The builders live in `builders.py` (tests import
them from there); they are re-exported here for tests that still import them from conftest."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from builders import (  # noqa: F401  (re-exported)
    arithmetic_pairs, build_tiny, make_tokenizer, sample_batch, write_jsonl,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

# a suite started with SIGINT ignored (a background job of a non-interactive shell inherits SIG_IGN, and Python then
# installs no KeyboardInterrupt handler) still tests the Ctrl-C handling, which expects Python's default handler
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Local HF model dirs: {'llama': ..., 'gpt2': ..., 'bert': ...}.

    They are saved with a tokenizer of their own: the shared `tokenizer` fixture's backend keeps the padding
    state of tests that called it with `padding=True`, and that state would be saved into tokenizer.json.
    """
    from transformers import AutoTokenizer

    fresh = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = {}
    for kind in ("llama", "gpt2", "bert"):
        path = tmp_path_factory.mktemp(f"tiny-{kind}")
        build_tiny(kind, fresh, path)
        out[kind] = path
    return out


@pytest.fixture
def tiny_llama(tokenizer):
    return build_tiny("llama", tokenizer)


@pytest.fixture
def tiny_gpt2(tokenizer):
    return build_tiny("gpt2", tokenizer)


@pytest.fixture
def tiny_bert(tokenizer):
    return build_tiny("bert", tokenizer)


@pytest.fixture
def instruction_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", arithmetic_pairs(40))
