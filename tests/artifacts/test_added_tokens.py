"""Added tokens (`add_tokens`, `methods/tokens.py`): the tokenizer grows, the embeddings are resized, and a LoRA-family
adapter trains only the new rows, saved as HF PEFT's `trainable_token_indices`. Parity with PEFT both ways (an
untied head with its own rows, a tied head reading the embedding's), training through the one loop with a chat
template that uses the new tokens, merging, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from builders import CHAT_TEMPLATE, build_tiny, write_jsonl
from test_artifacts import LORA, randomize

from tunelab.artifacts import load_adapter, merge_and_unload, save_artifact
from tunelab.config import RunConfig
from tunelab.errors import ConfigError
from tunelab.methods import tokens
from tunelab.methods.base import adapter_state

NEW = ["<|tool|>", "<|/tool|>"]
TEXT = "hello <|tool|> the quick brown fox <|/tool|> hello"
TOOL_TEMPLATE = CHAT_TEMPLATE.replace("'<|im_start|>' + message['role']",
                                      "('<|tool|>' if message['role'] == 'tool' else '<|im_start|>' + message['role'])")


def base_dir(tmp_path, tokenizer, tied: bool):
    """A tiny Llama model dir (tied or untied head) with the plain test tokenizer."""
    model = build_tiny("llama", tokenizer)
    if tied:
        from transformers import AutoModelForCausalLM

        model.config.tie_word_embeddings = True
        model = AutoModelForCausalLM.from_config(model.config)
    path = tmp_path / ("tied" if tied else "untied")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_base(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def logits_of(model, tokenizer, text=TEXT):
    batch = tokenizer([text, "hello <|/tool|>"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("tied", [False, True])
def test_tunelab_token_rows_load_in_peft(tied, tokenizer, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel

    path = base_dir(tmp_path, tokenizer, tied)
    model, tok = load_base(path)
    ids = tokens.add_tokens(tok, model, NEW)
    assert tok(TEXT).input_ids.count(ids[0]) == 1  # one token, not pieces
    LORA.inject(model, LORA.Options(r=4), "default")
    tokens.attach_tokens(model, "default", tokens.training_rows(model, ids))
    trainable = LORA.parameters(model, "default")
    assert sum(".trainable_tokens_delta." in k for k in trainable) == (1 if tied else 2)
    randomize(trainable, seed=3)
    want = logits_of(model, tok)
    save_artifact(model, tok, "default", tmp_path / "a", base_model=str(path))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == (ids if tied else {"embed_tokens": ids, "lm_head": ids})
    assert (tmp_path / "a" / "tokenizer.json").is_file()
    fresh, _ = load_base(path)
    fresh.resize_token_embeddings(len(tok))  # PEFT's documented step: resize the base, then load
    theirs = PeftModel.from_pretrained(fresh, tmp_path / "a").eval()
    assert torch.allclose(logits_of(theirs, tok), want, atol=1e-5)
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a").eval()  # resizes from the saved tokenizer
    assert torch.allclose(logits_of(auto, tok), want, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_peft_token_rows_load_in_tunelab(tied, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    path = base_dir(tmp_path, tokenizer, tied)
    model, tok = load_base(path)
    tok.add_tokens(NEW, special_tokens=True)
    model.resize_token_embeddings(len(tok))
    ids = tok.convert_tokens_to_ids(NEW)
    indices = ids if tied else {"embed_tokens": ids, "lm_head": ids}
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                  trainable_token_indices=indices))
    randomize({n: p for n, p in peft_model.named_parameters() if p.requires_grad}, seed=4)
    peft_model.eval()
    want = logits_of(peft_model, tok)
    peft_model.save_pretrained(tmp_path / "p")
    tok.save_pretrained(tmp_path / "p")
    ours, _ = load_base(path)  # not resized: the loader resizes it from the adapter's tokenizer
    load_adapter(ours, tmp_path / "p")
    assert ours.get_input_embeddings().weight.shape[0] == len(tok)
    assert torch.allclose(logits_of(ours, tok), want, atol=1e-5)
    merged = merge_and_unload(ours, "default")  # the rows go into the base weights
    assert not adapter_state(merged).methods
    assert torch.allclose(logits_of(merged, tok), want, atol=1e-5)


@pytest.fixture
def trained_with_tokens(tiny_dirs, tmp_path):
    """A LoRA run of 3 steps whose chat template writes the new `<|tool|>` token; returns (summary, artifact)."""
    from tunelab.train import train

    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "tool", "content": f"add {i} {i}"},
                          {"role": "assistant", "content": f"{2 * i}"}]} for i in range(16)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    (tmp_path / "tool.jinja").write_text(TOOL_TEMPLATE)
    (tmp_path / "tokens.txt").write_text("\n".join(NEW) + "\n")
    cfg = RunConfig(model=str(tiny_dirs["llama"]), data=str(data), method="lora", max_steps=3, batch_size=4,
                    seq_len=64, lr=1e-2, chat_template=str(tmp_path / "tool.jinja"), add_tokens=NEW, seed=0,
                    output=str(tmp_path / "run"), val_fraction=0.0)
    return train(cfg, progress=False), tmp_path / "run" / "artifact", data


def test_training_trains_only_the_new_rows_and_the_adapter(trained_with_tokens, tiny_dirs):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    summary, artifact, _ = trained_with_tokens
    config = json.loads((artifact / "adapter_config.json").read_text())
    ids = config["trainable_token_indices"]["embed_tokens"]
    model, tok = load_base(tiny_dirs["llama"])
    rows = 2 * 2 * 32  # 2 new tokens, embedding and untied head, hidden 32
    assert summary["params_trainable"] == LORA.own_trainable(model, LORA.Options()) + rows
    saved = AutoTokenizer.from_pretrained(artifact)
    assert saved.convert_tokens_to_ids(NEW) == ids and len(saved) == len(tok) + 2
    assert "<|tool|>" in saved.chat_template  # the run's template travels with the tokenizer
    load_adapter(model, artifact)
    auto = AutoPeftModelForCausalLM.from_pretrained(artifact).eval()
    assert torch.allclose(logits_of(auto, saved), logits_of(model.eval(), saved), atol=1e-5)


def test_eval_and_serve_encode_the_new_tokens_with_the_adapter(trained_with_tokens, tiny_dirs):
    from tunelab.evaluation import evaluate_spec
    from tunelab.serve.service import build_service

    _, artifact, data = trained_with_tokens
    result = evaluate_spec(str(tiny_dirs["llama"]), str(data), adapter=artifact, seq_len=64)
    assert result["examples"] == 16 and result["loss"] > 0
    service = build_service(str(tiny_dirs["llama"]), {"tool": artifact}, device="cpu", dtype="float32")
    try:
        ids = service.encode_chat([{"role": "user", "content": "hi"}, {"role": "tool", "content": "add 1 1"}])
        assert service.tokenizer.convert_tokens_to_ids("<|tool|>") in ids
    finally:
        service.close()


def test_full_fine_tuning_writes_the_resized_model(tiny_dirs, instruction_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.train import train

    cfg = RunConfig(model=str(tiny_dirs["llama"]), data=str(instruction_jsonl), method="full", max_steps=1,
                    batch_size=2, seq_len=32, add_tokens=NEW, output=str(tmp_path / "run"), val_fraction=0.0)
    train(cfg, progress=False)
    out = tmp_path / "run" / "artifact"
    tok = AutoTokenizer.from_pretrained(out)
    assert AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().weight.shape[0] == len(tok)
    assert tok.convert_tokens_to_ids(NEW[0]) == len(tok) - 2


@pytest.mark.parametrize("values, message", [
    ({"method": "ia3"}, "method 'ia3' cannot train the new tokens' rows"),
    ({"task": "classification"}, "add_tokens applies to causal-lm runs only"),
    ({"add_tokens": ["<|a|>", "<|a|>"]}, "expected distinct, non-blank tokens"),
])
def test_bad_add_tokens_refused_before_loading(values, message):
    with pytest.raises(ConfigError, match=message):
        from tunelab.validation import parse_model

        parse_model(RunConfig, {"add_tokens": NEW, **values}, where="train")


def test_existing_token_refused(tokenizer):
    model = build_tiny("llama", tokenizer)
    with pytest.raises(ConfigError, match=r"'<\|im_start\|>' is already token \d+ of the tokenizer"):
        tokens.add_tokens(tokenizer, model, ["<|im_start|>"])


def test_cli_reads_tokens_from_a_file_and_a_list(tmp_path):
    from tunelab.config import parse_tokens

    (tmp_path / "t.txt").write_text("<|a|>\n\n<|b|>\n")
    assert parse_tokens([str(tmp_path / "t.txt"), "<|c|>,<|d|>"]) == ["<|a|>", "<|b|>", "<|c|>", "<|d|>"]
