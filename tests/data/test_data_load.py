"""load_data: empty rows, truncation and drop counts, the train/validation split, packing, the defaults."""

from __future__ import annotations

import pytest
import torch
from builders import write_jsonl

from tunelab import defaults
from tunelab.data import IGNORE_INDEX, load_data
from tunelab.data.load import split_indices
from tunelab.errors import ConfigError, DataError


def _texts(n, words=3):
    return [{"text": " ".join(["fox"] * words) + f" {i}"} for i in range(n)]


def test_empty_text_skipped_and_counted(tmp_path, tokenizer):
    rows = [{"text": "a fox"}, {"text": ""}, {"text": "   "}, {"text": "a dog"}]
    ds = load_data(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, "causal-lm", 64, val_fraction=0)
    assert ds.stats == {"rows": 4, "skipped_empty": 2, "truncated": 0, "dropped": 0}
    assert len(ds.train) == 2


def test_no_usable_rows_is_an_error_before_training(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"prompt": "x", "text": " "}])
    with pytest.raises(DataError, match=r"d\.jsonl: no usable rows \(2 read, 2 empty, 0 dropped"):
        load_data(path, tokenizer, "causal-lm", 64)
    long = write_jsonl(tmp_path / "l.jsonl", _texts(3, words=40))
    with pytest.raises(DataError, match=r"l\.jsonl: no usable rows \(3 read, 0 empty, 3 dropped as longer than seq_len=8"):
        load_data(long, tokenizer, "causal-lm", 8, truncation="drop")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"e\.jsonl: no rows"):
        load_data(tmp_path / "e.jsonl", tokenizer, "causal-lm", 8)


def test_truncate_and_drop_counts(tmp_path, tokenizer):
    rows = _texts(3, words=1) + _texts(2, words=40)  # 3 short, 2 long
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    short_len = max(len(tokenizer(r["text"])["input_ids"]) + 1 for r in rows[:3])
    seq_len = short_len + 2
    cut = load_data(path, tokenizer, "causal-lm", seq_len, val_fraction=0)
    assert (cut.stats["truncated"], cut.stats["dropped"]) == (2, 0)
    assert sorted(len(e["input_ids"]) for e in cut.train)[-2:] == [seq_len, seq_len]
    full = tokenizer(rows[3]["text"])["input_ids"]
    assert cut.train[3]["input_ids"] == full[:seq_len] == cut.train[3]["labels"]
    dropped = load_data(path, tokenizer, "causal-lm", seq_len, truncation="drop", val_fraction=0)
    assert (dropped.stats["truncated"], dropped.stats["dropped"]) == (0, 2)
    assert len(dropped.train) == 3 and all(len(e["input_ids"]) <= seq_len for e in dropped.train)


def test_response_cut_away_entirely_is_dropped(tmp_path, tokenizer):
    rows = [{"prompt": "the quick brown fox jumps over the lazy dog " * 3, "response": "yes"},
            {"prompt": "hi", "response": "hello"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    short = load_data(path, tokenizer, "causal-lm", 512, val_fraction=0).train[1]
    ds = load_data(path, tokenizer, "causal-lm", len(short["input_ids"]), val_fraction=0)
    assert ds.train == [short]
    assert ds.stats["dropped"] == 1 and ds.stats["truncated"] == 0 and len(ds.train) == 1
    assert any(t != IGNORE_INDEX for t in ds.train[0]["labels"][1:])


def test_split_is_deterministic_and_independent_of_the_seed(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", _texts(50))
    torch.manual_seed(1)
    a = load_data(path, tokenizer, "causal-lm", 64, val_fraction=0.2)
    torch.manual_seed(999)
    b = load_data(path, tokenizer, "causal-lm", 64, val_fraction=0.2)
    assert a.train == b.train and a.val == b.val
    assert (len(a.train), len(a.val)) == (40, 10)
    train_idx, val_idx = split_indices(50, 0.2, "x")
    assert val_idx != list(range(40, 50))  # shuffled, not the tail
    assert sorted(train_idx + val_idx) == list(range(50))
    assert [e["input_ids"] for e in a.val] == [tokenizer(f"fox fox fox {i}")["input_ids"] + [0] for i in val_idx]


def test_split_sizes_never_empty_train(tmp_path, tokenizer):
    assert split_indices(5, 0.0, "x") == ([0, 1, 2, 3, 4], [])
    assert [len(s) for s in split_indices(10, 0.01, "x")] == [9, 1]  # val_fraction > 0: at least one row
    assert [len(s) for s in split_indices(2, 0.9, "x")] == [1, 1]  # train keeps at least one row
    with pytest.raises(DataError, match=r"one\.jsonl: 1 usable row; a validation split needs at least 2"):
        load_data(write_jsonl(tmp_path / "one.jsonl", _texts(1)), tokenizer, "causal-lm", 64, val_fraction=0.1)


def test_packing_concatenates_and_cuts(tmp_path, tokenizer):
    rows = [{"prompt": f"what is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(12)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    plain = load_data(path, tokenizer, "causal-lm", 512, val_fraction=0)
    seq_len = max(len(e["input_ids"]) for e in plain.train) + 5  # no example is cut; chunks straddle examples
    packed = load_data(path, tokenizer, "causal-lm", seq_len, packing=True, val_fraction=0)
    stream = [t for e in plain.train for t in e["input_ids"]]
    labels = [t for e in plain.train for t in e["labels"]]
    n = sum(len(c["input_ids"]) for c in packed.train)
    assert [t for c in packed.train for t in c["input_ids"]] == stream[:n]
    assert [t for c in packed.train for t in c["labels"]] == labels[:n]
    # only a last chunk with nothing to predict (labels shift: its first token is never a target) is left out
    assert len(stream) - n < seq_len and all(t == IGNORE_INDEX for t in labels[n + 1:])
    assert all(len(c["input_ids"]) == seq_len for c in packed.train[:-1])
    assert 0 < len(packed.train[-1]["input_ids"]) <= seq_len
    assert len(packed.train) < len(plain.train)
    with pytest.raises(ConfigError, match="packing: applies to task causal-lm only"):
        load_data(path, tokenizer, "classification", 16, packing=True)


@pytest.mark.parametrize("kw, msg", [
    ({"seq_len": 0}, "seq_len: expected a positive number"),
    ({"truncation": "cut"}, "truncation: expected one of truncate, drop, found 'cut'"),
    ({"val_fraction": 1.0}, r"val_fraction: expected a value in \[0, 1\)"),
    ({"task": "seq2seq"}, "task: expected one of causal-lm, classification, found 'seq2seq'"),
])
def test_arguments_validated(tmp_path, tokenizer, kw, msg):
    args = {"task": "causal-lm", "seq_len": 32, **kw}
    with pytest.raises(ConfigError, match=msg):
        load_data(write_jsonl(tmp_path / "d.jsonl", _texts(3)), tokenizer, args.pop("task"), args.pop("seq_len"), **args)


def test_default_specs(tokenizer):
    pairs = load_data("default", tokenizer, "causal-lm", 64)
    assert pairs.format == "prompt-response" and pairs.stats["rows"] == len(defaults.instruction_pairs())
    assert len(pairs.train) + len(pairs.val) + pairs.stats["dropped"] + pairs.stats["skipped_empty"] == pairs.stats["rows"]
    assert abs(len(pairs.val) - 0.1 * (len(pairs.train) + len(pairs.val))) <= 1
    news = load_data("default", tokenizer, "classification", 32)
    assert news.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert news.stats["rows"] == 2225 and len(news.train) + len(news.val) == 2225
    prose = load_data("default:prose", tokenizer, "causal-lm", 32, val_fraction=0)
    assert prose.format == "text" and len(prose.train) == 2225 and prose.stats["truncated"] == 2225
