"""Formats: which tokens carry labels, exactly, for text, prompt/response, messages and classification."""

from __future__ import annotations

import copy

import pytest
from builders import write_jsonl

from tunelab.data import IGNORE_INDEX, load_data
from tunelab.data.load import split_indices
from tunelab.errors import DataError


def _only(tmp_path, tokenizer, rows, task="causal-lm", **kw):
    """Load rows as one JSONL file with no validation split; return the dataset."""
    return load_data(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, task, 512, val_fraction=0, **kw)


def _ids(tokenizer, text, special=False):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def test_text_every_token_is_a_target_and_eos_is_appended(tmp_path, tokenizer):
    ds = _only(tmp_path, tokenizer, [{"text": "the quick brown fox"}])
    (ex,) = ds.train
    assert ds.format == "text"
    assert ex["input_ids"] == tokenizer("the quick brown fox")["input_ids"] + [tokenizer.eos_token_id]
    assert ex["labels"] == ex["input_ids"]


def test_prompt_response_with_chat_template_masks_the_prompt(tmp_path, tokenizer):
    ds = _only(tmp_path, tokenizer, [{"prompt": "what is the capital of france?", "response": "paris."}])
    (ex,) = ds.train
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "what is the capital of france?"}],
                                             tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    prompt_ids = _ids(tokenizer, rendered)
    response_ids = _ids(tokenizer, "paris.") + [tokenizer.eos_token_id]
    assert ex["input_ids"] == prompt_ids + response_ids
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    targets = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(targets) == "paris.<|endoftext|>"


def test_prompt_response_without_chat_template_is_prompt_newline_response(tmp_path, tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    (ex,) = _only(tmp_path, plain, [{"prompt": "hello", "response": "how are you"}]).train
    prompt_ids = plain("hello\n")["input_ids"]
    assert ex["input_ids"][: len(prompt_ids)] == prompt_ids
    assert ex["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert ex["labels"][len(prompt_ids):] == _ids(plain, "how are you") + [plain.eos_token_id]


CONVERSATION = [
    {"role": "system", "content": "you are a fox"},
    {"role": "user", "content": "hello, how are you today?"},
    {"role": "assistant", "content": "i am fine, thank you"},
    {"role": "user", "content": "what is the capital of france?"},
    {"role": "assistant", "content": "the capital of france is paris."},
]


def test_messages_loss_on_assistant_turns_only(tmp_path, tokenizer):
    ds = _only(tmp_path, tokenizer, [{"messages": CONVERSATION}])
    (ex,) = ds.train
    assert ds.format == "messages"
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    # the turn-by-turn tokenization agrees with tokenizing the whole conversation: boundaries are token boundaries
    assert ex["input_ids"] == _ids(tokenizer, full)
    labelled = [i for i, t in enumerate(ex["labels"]) if t != IGNORE_INDEX]
    runs = _runs(labelled)
    assert len(runs) == 2
    texts = [tokenizer.decode(ex["input_ids"][a:b]) for a, b in runs]
    assert texts == ["i am fine, thank you<|im_end|>\n", "the capital of france is paris.<|im_end|>\n"]
    # labels equal the input ids where they are set
    assert all(ex["labels"][i] == ex["input_ids"][i] for i in labelled)
    # the token before each run is the end of the generation prompt "<|im_start|>assistant\n"
    for a, _ in runs:
        assert tokenizer.decode(ex["input_ids"][:a]).endswith("<|im_start|>assistant\n")


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    runs: list[list[int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    return [tuple(r) for r in runs]


def test_messages_without_assistant_turn_is_skipped_as_empty(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "hello"}]}, {"messages": CONVERSATION[1:3]}]
    ds = _only(tmp_path, tokenizer, rows)
    assert ds.stats["skipped_empty"] == 1 and len(ds.train) == 1


@pytest.mark.parametrize("bad, expect", [
    ([{"role": "user", "content": "hi"}, "hello"], "messages[1]' expected a dict with role and content, found str"),
    ([{"content": "hi"}], "messages[0]: missing field 'role'"),
    ([{"role": "user", "content": 3}], "messages[0]: field 'content' expected str, found int"),
    ("hello", "field 'messages' expected a JSON list"),
    ({"role": "user"}, "field 'messages' expected list or str, found dict"),
])
def test_messages_items_are_validated(tmp_path, tokenizer, bad, expect):
    rows = [{"messages": CONVERSATION[1:3]}, {"messages": bad}]
    with pytest.raises(DataError) as e:
        _only(tmp_path, tokenizer, rows)
    assert "d.jsonl line 2" in str(e.value) and expect in str(e.value)


def test_messages_need_a_chat_template(tmp_path, tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(DataError, match=r"d.jsonl line 1: the messages format needs a tokenizer with a chat template"):
        _only(tmp_path, plain, [{"messages": CONVERSATION}])


def test_classification_string_labels_sorted(tmp_path, tokenizer):
    rows = [{"text": f"text {i}", "label": lab} for i, lab in enumerate(["pos", "neg", "neutral", "neg", "pos"])]
    ds = _only(tmp_path, tokenizer, rows, task="classification")
    assert ds.label_names == ["neg", "neutral", "pos"]
    assert [e["label"] for e in ds.train] == [2, 0, 1, 0, 2]
    assert ds.train[0]["input_ids"] == tokenizer("text 0")["input_ids"]
    assert "labels" not in ds.train[0]


def test_classification_integer_labels_sort_numerically(tmp_path, tokenizer):
    rows = [{"text": f"t{i}", "label": lab} for i, lab in enumerate([10, 2, 0, 2])]
    ds = _only(tmp_path, tokenizer, rows, task="classification")
    assert ds.label_names == ["0", "2", "10"]
    assert [e["label"] for e in ds.train] == [2, 1, 0, 1]


def test_classification_given_label_names_fix_the_mapping(tmp_path, tokenizer):
    rows = [{"text": "a", "label": "b"}, {"text": "b", "label": "a"}]
    ds = _only(tmp_path, tokenizer, rows, task="classification", label_names=["b", "a", "c"])
    assert ds.label_names == ["b", "a", "c"] and [e["label"] for e in ds.train] == [0, 1]
    with pytest.raises(DataError, match=r"d.jsonl line 2: label 'a' is not among the given label_names \(b, c\)"):
        _only(tmp_path, tokenizer, rows, task="classification", label_names=["b", "c"])


def test_classification_label_only_in_validation_names_the_row(tmp_path, tokenizer):
    n = 20
    _, val = split_indices(n, 0.2, "x")
    rows = [{"text": f"text {i}", "label": "common"} for i in range(n)]
    rows[val[0]]["label"] = "rare"
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_data(path, tokenizer, "classification", 64, val_fraction=0.2)
    assert f"c.jsonl line {val[0] + 1}: label 'rare' is not among the labels of the training rows (common)" in str(e.value)


def test_classification_label_type_is_checked(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"d.jsonl line 1: field 'label' expected str or int, found bool"):
        _only(tmp_path, tokenizer, [{"text": "a", "label": True}], task="classification")
    with pytest.raises(DataError, match=r"columns found: text; expected text and label for task classification"):
        _only(tmp_path, tokenizer, [{"text": "a"}], task="classification")


def test_classification_truncation_keeps_the_closing_special_token(tmp_path, tokenizer):
    bert_like = copy.deepcopy(tokenizer)
    from tokenizers.processors import TemplateProcessing

    bert_like.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A <|im_end|>", special_tokens=[("<|im_start|>", 1), ("<|im_end|>", 2)])
    ids = bert_like("the quick brown fox jumps over the lazy dog")["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) > 6
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "the quick brown fox jumps over the lazy dog", "label": "x"}])
    ds = load_data(path, bert_like, "classification", 6, val_fraction=0)
    assert ds.train[0]["input_ids"] == ids[:5] + [2]
    assert ds.stats["truncated"] == 1
