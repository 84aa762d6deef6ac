"""The tokenizer of a GGUF model file, as llama.cpp's converter (`convert_hf_to_gguf.py`) writes it.

Byte-level BPE vocabularies (GPT-2 style: SmolLM2, Llama 3, the test tokenizers) are written as
`tokenizer.ggml.model = gpt2`: every id up to the model's vocab size with its token type (NORMAL, CONTROL for
special added tokens, USER_DEFINED for other added tokens, UNUSED for padding rows the tokenizer lacks), the
merges and special ids (`gguf.SpecialVocab`), and the chat template. `tokenizer.ggml.pre` names llama.cpp's
pre-tokenizer; it is read from the HF tokenizer's own pre-tokenizer, since a wrong one tokenizes silently wrong.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gguf

from tunelab.errors import ConfigError

# llama.cpp's regex of Llama 3's pre-tokenizer (its `llama-bpe`)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer_name(tokenizer_json: dict, where: str) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json, from its pre-tokenizer steps."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    raise ConfigError(f"{where}: pre-tokenizer {kinds} has no llama.cpp equivalent tunelab knows (GPT-2 "
                      f"ByteLevel, SmolLM's Digits + ByteLevel, Llama 3's split); expected one of those")


def check_byte_level_bpe(tokenizer_json: dict, where: str) -> None:
    """Refuse a tokenizer that is not byte-level BPE (SentencePiece, WordPiece, ...), naming its model type."""
    model = tokenizer_json.get("model") or {}
    decoder = (tokenizer_json.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise ConfigError(f"{where}: a {model.get('type', 'unknown')} tokenizer (decoder {decoder}); GGUF export "
                          f"writes byte-level BPE vocabularies (llama.cpp's gpt2 model) only")


def vocab_entries(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0 .. vocab_size - 1, the way llama.cpp's `get_vocab_base` lists them."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            special = decoder[i].special if i in decoder else True
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def add_vocab(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, where: str) -> None:
    """Write the tokenizer keys of a byte-level BPE `tokenizer` (an HF fast tokenizer) for `vocab_size` rows."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)  # SpecialVocab reads merges and special ids from the saved files
        tokenizer_json = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
        check_byte_level_bpe(tokenizer_json, where)
        pre = pre_tokenizer_name(tokenizer_json, where)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    tokens, types = vocab_entries(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    if "bos" not in special.add_special_token:  # as the HF tokenizer encodes: llama.cpp must add BOS exactly then
        probe, plain = tokenizer("a").input_ids, tokenizer("a", add_special_tokens=False).input_ids
        special.add_special_token["bos"] = len(probe) > len(plain) and probe[0] == tokenizer.bos_token_id
    writer.add_add_space_prefix(False)  # byte-level BPE encodes spaces itself
    special.add_to_gguf(writer, quiet=True)
