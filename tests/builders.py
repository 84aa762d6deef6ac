"""Builders shared by the tests of every folder: a tokenizer made locally, tiny Llama, GPT-2 and
BERT-classification models from configs, padded sample batches and JSONL files. Nothing is downloaded.

Tests import these from here (`from builders import build_tiny`); `conftest.py` turns them into fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a language model predicts the next token from the tokens before it",
    "low rank adapters train a small number of parameters beside frozen weights",
    "what is the capital of france? the capital of france is paris.",
    "hello, how are you today? i am fine, thank you for asking.",
    "fine tuning adapts a pre-trained model to a new task with little data",
] * 20


def make_tokenizer(path: Path):
    """A byte-level BPE tokenizer with ChatML special tokens and a chat template, saved at `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<pad>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def _config(kind: str, vocab_size: int, pad_id: int, eos_id: int):
    from transformers import BertConfig, GPT2Config, LlamaConfig

    if kind == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           pad_token_id=pad_id, bos_token_id=eos_id, eos_token_id=eos_id,
                           tie_word_embeddings=False)
    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                          pad_token_id=pad_id, bos_token_id=eos_id, eos_token_id=eos_id)
    if kind == "bert":
        return BertConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=128, num_labels=3, pad_token_id=pad_id)
    raise ValueError(kind)


def build_tiny(kind: str, tokenizer, path: Path | None = None, seed: int = 0):
    """A tiny model of `kind` (llama, gpt2, bert) with random weights; saved with the tokenizer when `path`."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = _config(kind, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    auto = AutoModelForSequenceClassification if kind == "bert" else AutoModelForCausalLM
    model = auto.from_config(config).eval()
    if path is not None:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return model


def sample_batch(tokenizer, texts=("the quick brown fox", "hello, how are you today? i am fine")):
    """A padded batch (input_ids, attention_mask) of a few texts."""
    return tokenizer(list(texts), return_tensors="pt", padding=True)


def arithmetic_pairs(n: int) -> list[dict]:
    """`n` instruction pairs ("what is i plus i?" -> "i plus i is 2i."): the tests' small instruction data."""
    return [{"prompt": f"what is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
