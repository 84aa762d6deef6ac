"""Data as LLaMA-Factory users write it: Alpaca and ShareGPT rows detected by their columns, the `columns`
mapping, and `chat_template` for a tokenizer without one; errors name the file, row and field."""

from __future__ import annotations

import copy
import json

import pytest
from builders import CHAT_TEMPLATE, write_jsonl

from tunelab.cli import main
from tunelab.config import RunConfig, build_config
from tunelab.data import load_data
from tunelab.errors import ConfigError, DataError


def _load(tmp_path, tokenizer, rows, name="d.jsonl", **kw):
    return load_data(write_jsonl(tmp_path / name, rows), tokenizer, "causal-lm", 512, val_fraction=0, **kw)


def _same(a, b) -> bool:
    return a.train == b.train and a.stats == b.stats


@pytest.mark.parametrize("extra, prompt", [({"input": "of france"}, "the capital\nof france"),
                                           ({"input": ""}, "the capital"), ({}, "the capital")])
def test_alpaca_is_a_prompt_response(extra, prompt, tmp_path, tokenizer):
    ds = _load(tmp_path, tokenizer, [{"instruction": "the capital", "output": "paris.", **extra}])
    want = _load(tmp_path, tokenizer, [{"prompt": prompt, "response": "paris."}], name="w.jsonl")
    assert ds.format == "alpaca" and _same(ds, want)


def test_alpaca_with_system_and_history_is_a_conversation(tmp_path, tokenizer):
    row = {"instruction": "and spain?", "input": "", "output": "madrid.", "system": "be brief",
           "history": [["capital of france?", "paris."]]}
    ds = _load(tmp_path, tokenizer, [row])
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "capital of france?"},
                {"role": "assistant", "content": "paris."}, {"role": "user", "content": "and spain?"},
                {"role": "assistant", "content": "madrid."}]
    assert _same(ds, _load(tmp_path, tokenizer, [{"messages": messages}], name="w.jsonl"))


def test_sharegpt_is_a_conversation(tmp_path, tokenizer):
    turns = [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hello"},
             {"from": "gpt", "value": "hi."}, {"from": "human", "value": "bye"}, {"from": "gpt", "value": "bye."}]
    ds = _load(tmp_path, tokenizer, [{"conversations": turns}])
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    messages = [{"role": roles[t["from"]], "content": t["value"]} for t in turns]
    assert ds.format == "sharegpt"
    assert _same(ds, _load(tmp_path, tokenizer, [{"messages": messages}], name="w.jsonl"))
    (ex,) = ds.train
    assert tokenizer.decode([t for t in ex["labels"] if t != -100]) == "hi.<|im_end|>\nbye.<|im_end|>\n"


@pytest.mark.parametrize("row, expect", [
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
     r"d.jsonl line 2 conversations\[1\]: field 'from' expected one of human, gpt, system, found 'bot'"),
    ({"conversations": [{"from": "human"}]}, r"d.jsonl line 2 conversations\[0\]: missing field 'value'"),
    ({"conversations": "nope"}, r"d.jsonl line 2: field 'conversations' expected a JSON list, found text"),
    ({"instruction": "a", "output": 3}, r"d.jsonl line 2: field 'output' expected str, found int"),
    ({"instruction": "a", "output": "b", "history": [["x"]]}, r"d.jsonl line 2: field 'history\[0\]' expected"),
])
def test_dialect_errors_name_file_row_and_field(row, expect, tmp_path, tokenizer):
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]} \
        if "conversations" in row else {"instruction": "q", "output": "a"}
    with pytest.raises(DataError, match=expect):
        _load(tmp_path, tokenizer, [good, row])


def test_columns_map_a_file_onto_a_format(tmp_path, tokenizer):
    rows = [{"question": "the capital?", "answer": "paris.", "prompt": "ignored"}]
    ds = _load(tmp_path, tokenizer, rows, columns={"prompt": "question", "response": "answer"})
    want = _load(tmp_path, tokenizer, [{"prompt": "the capital?", "response": "paris."}], name="w.jsonl")
    assert ds.format == "prompt-response" and _same(ds, want)
    with pytest.raises(DataError, match=r"d.jsonl: columns maps response to 'reply', which is not a column here; "
                                        r"columns found: question, answer, prompt"):
        _load(tmp_path, tokenizer, rows, columns={"prompt": "question", "response": "reply"})


def test_columns_keys_are_checked():
    with pytest.raises(ConfigError, match=r"columns.*unknown column 'promt' \(did you mean 'prompt'\?\)"):
        build_config({}, {"columns": {"promt": "question"}})


@pytest.mark.parametrize("spec", ["chatml", "file"])
def test_chat_template_for_a_base_without_one(spec, tmp_path, tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    rows = [{"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi."}]}]
    with pytest.raises(DataError, match="d.jsonl line 1: the messages format needs a tokenizer with a chat template"):
        _load(tmp_path, plain, rows)
    if spec == "file":
        (tmp_path / "t.jinja").write_text(CHAT_TEMPLATE)
        spec = str(tmp_path / "t.jinja")
    ds = _load(tmp_path, plain, rows, chat_template=spec)
    assert _same(ds, _load(tmp_path, tokenizer, rows, name="w.jsonl"))  # the builders' template is ChatML


def test_alpaca_template_ends_the_reply_with_eos(tmp_path, tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    ds = _load(tmp_path, plain, [{"instruction": "hi", "output": "hello.", "system": "be kind"}],
               chat_template="alpaca")
    (ex,) = ds.train
    assert plain.decode(ex["input_ids"]) == "be kind\n\n### Instruction:\nhi\n\n### Response:\nhello.<|endoftext|>\n\n"
    assert plain.decode([t for t in ex["labels"] if t != -100]) == "hello.<|endoftext|>\n\n"


@pytest.mark.parametrize("spec, expect", [("chatm", r"chat_template 'chatm': not found; expected a Jinja file "
                                                    r"or one of chatml, alpaca \(did you mean 'chatml'\?\)"),
                                          (".", r"chat_template '\.': is a directory")])
def test_chat_template_errors_before_any_model_loads(spec, expect):
    with pytest.raises(ConfigError, match=expect):
        build_config({}, {"chat_template": spec})


def test_cli_columns_and_chat_template(tiny_dirs, tmp_path):
    rows = [{"question": f"what is {i} plus {i}?", "answer": f"{2 * i}."} for i in range(12)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    argv = ["train", "--model", str(tiny_dirs["llama"]), "--data", str(data), "--max-steps", "2", "--batch-size",
            "2", "--output", str(tmp_path / "run"), "--quiet", "--columns", "prompt=question,response=answer",
            "--chat-template", "alpaca"]
    assert main(argv) == 0
    config = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert config["columns"] == {"prompt": "question", "response": "answer"} and config["chat_template"] == "alpaca"
    assert main(argv[:-4] + ["--columns", "prompt"]) == 2
    assert RunConfig().columns is None
