"""Readers: JSONL, CSV, Parquet; every error names the file, line/row and field."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import write_jsonl

from tunelab.data import load_data
from tunelab.data.sources import read_source
from tunelab.errors import DataError

PAIRS = [{"prompt": f"what is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(5)]


def _csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _load(path, tokenizer, task="causal-lm"):
    return load_data(path, tokenizer, task, 128, val_fraction=0)


def test_three_readers_give_the_same_examples(tmp_path, tokenizer):
    jsonl = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    csv_path = _csv(tmp_path / "p.csv", ["prompt", "response"], [[r["prompt"], r["response"]] for r in PAIRS])
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(PAIRS), parquet)
    datasets = [_load(p, tokenizer) for p in (jsonl, csv_path, parquet)]
    assert datasets[0].train == datasets[1].train == datasets[2].train
    assert len(datasets[0].train) == 5 and datasets[0].format == "prompt-response"


def test_jsonl_blank_lines_skipped_and_bad_line_named(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a fox"}\n\n   \n{"text": "a dog"}\n')
    table = read_source(path, "causal-lm")
    assert [w for w, _ in table.rows] == [f"{path} line 1", f"{path} line 4"]
    path.write_text('{"text": "a fox"}\n\n{"text": "a dog"\n')
    with pytest.raises(DataError, match=r"d\.jsonl line 3: not valid JSON"):
        _load(path, tokenizer)
    path.write_text('{"text": "a fox"}\n["a", "list"]\n')
    with pytest.raises(DataError, match=r"d\.jsonl line 2: expected a JSON object, found list"):
        _load(path, tokenizer)


def test_jsonl_missing_field_and_wrong_type_named(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [PAIRS[0], {"prompt": "hi"}])
    with pytest.raises(DataError, match=r"d\.jsonl line 2: missing field 'response'$"):
        _load(path, tokenizer)
    path = write_jsonl(tmp_path / "d.jsonl", [PAIRS[0], PAIRS[1], {"prompt": "hi", "response": 7}])
    with pytest.raises(DataError, match=r"d\.jsonl line 3: field 'response' expected str, found int"):
        _load(path, tokenizer)


def test_csv_wrong_columns_listed(tmp_path, tokenizer):
    path = _csv(tmp_path / "d.csv", ["question", "answer"], [["a", "b"]])
    with pytest.raises(DataError) as e:
        _load(path, tokenizer)
    msg = str(e.value)
    assert "d.csv" in msg and "columns found: question, answer" in msg
    assert "expected one of: text | prompt + response | messages" in msg


def test_csv_short_row_is_a_missing_field(tmp_path, tokenizer):
    path = tmp_path / "d.csv"
    path.write_text("prompt,response\nhello,hi there\nonly a prompt\n")
    with pytest.raises(DataError, match=r"d\.csv row 2: missing field 'response'"):
        _load(path, tokenizer)


def test_csv_messages_cell_holds_json(tmp_path, tokenizer):
    conv = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    path = _csv(tmp_path / "d.csv", ["messages"], [[json.dumps(conv)], ["not json"]])
    with pytest.raises(DataError, match=r"d\.csv row 2: field 'messages' expected a JSON list"):
        _load(path, tokenizer)
    path = _csv(tmp_path / "d.csv", ["messages"], [[json.dumps(conv)]])
    assert _load(path, tokenizer).format == "messages"


def test_parquet_wrong_columns_null_and_type(tmp_path, tokenizer):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["a"], "y": [1]}), path)
    with pytest.raises(DataError, match=r"d\.parquet: columns found: body, y; expected text and label"):
        _load(path, tokenizer, "classification")
    pq.write_table(pa.table({"text": ["a fox", None], "label": ["x", "y"]}), path)
    with pytest.raises(DataError, match=r"d\.parquet row 2: missing field 'text'"):
        _load(path, tokenizer, "classification")
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(DataError, match=r"d\.parquet row 1: field 'text' expected str, found int"):
        _load(path, tokenizer)


def test_parquet_messages_as_list_of_structs(tmp_path, tokenizer):
    conv = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": conv}]), path)
    jsonl = write_jsonl(tmp_path / "m.jsonl", [{"messages": conv}])
    assert _load(path, tokenizer).train == _load(jsonl, tokenizer).train


def test_corrupt_parquet_and_non_utf8_named(tmp_path, tokenizer):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        _load(bad, tokenizer)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.jsonl: not UTF-8 text"):
        _load(latin, tokenizer)


def test_missing_file_directory_and_unknown_suffix_named(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"nope\.jsonl: data file not found"):
        _load(tmp_path / "nope.jsonl", tokenizer)
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match=r"dir\.jsonl: is a directory; expected a \.jsonl, \.csv or \.parquet file"):
        _load(tmp_path / "dir.jsonl", tokenizer)
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match=r"d\.txt: unsupported file type '\.txt'"):
        _load(tmp_path / "d.txt", tokenizer)
    with pytest.raises(DataError, match=r"data spec 'default:poems' is unknown"):
        _load("default:poems", tokenizer)
