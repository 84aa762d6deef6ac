"""RELIABILITY.md cases 18-24, data errors, through the real CLI (`tunelab train`, and `tunelab eval`).

Every case runs over a family of variations: other ways a line is not JSON, other malformed rows, other ways a
data set can be empty or too long, other wrong files. Errors are one line naming the file and line/row and field;
what is skipped, cut or dropped is counted in run.json; a failure leaves no artifact, checkpoint or summary.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_cli_contract import cli, one_line_error, write_jsonl

GOOD = [{"prompt": f"what is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(6)]
CHAT = {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello, friend"}]}
TOPICS = [{"text": f"a text about topic {i}", "label": "ab"[i % 2]} for i in range(4)]
RUN_FILES = ("artifact", "checkpoints", "run.json", "metrics.jsonl")


def train_argv(model: Path, data: Path, out: Path, *extra) -> list:
    return ["train", "--model", model, "--data", data, "--output", out, "--max-steps", "2", "--batch-size", "4",
            "--quiet", *extra]


def nothing_written(out: Path) -> bool:
    """No artifact, checkpoint, summary or metrics in a run dir (the run stopped before training)."""
    return not any((out / name).exists() for name in RUN_FILES)


def trained(capsys, model: Path, data: Path, out: Path, *extra) -> dict:
    """Train through the CLI; return run.json with the metrics records under "metrics"."""
    code, err = cli(capsys, *train_argv(model, data, out, *extra))
    assert code == 0, err
    summary = json.loads((out / "run.json").read_text())
    summary["metrics"] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary


# --- case 18: a line that is not JSON ---------------------------------------------------------------------

def _lines(*extra: str, at: int = 4) -> str:
    good = [json.dumps(r) for r in GOOD]
    return "\n".join(good[:at - 1] + list(extra) + good[at - 1:]) + "\n"


NOT_JSON = {  # variant -> (file text, line number named, words of the message)
    "truncated-last-line": ("\n".join(json.dumps(r) for r in GOOD) + '\n{"prompt": "x", "resp', 7, "not valid JSON"),
    "binary-garbage": (_lines("\x00\x01\x02garbage\x7f"), 4, "not valid JSON"),
    "bare-string": (_lines('"just a string"'), 4, "expected a JSON object, found str"),
    "a-number": (_lines("42"), 4, "expected a JSON object, found int"),
    "a-list": (_lines('[{"prompt": "a", "response": "b"}]'), 4, "expected a JSON object, found list"),
    "null": (_lines("null"), 4, "expected a JSON object"),
    "two-objects-one-line": (_lines('{"prompt": "a", "response": "b"} {"prompt": "c", "response": "d"}'), 4,
                             "not valid JSON"),
    "trailing-comma": (_lines('{"prompt": "a", "response": "b",}'), 4, "not valid JSON"),
    "single-quotes": (_lines("{'prompt': 'a', 'response': 'b'}"), 4, "not valid JSON"),
    "after-blank-lines": ("\n\n" + _lines("{oops", at=2), 4, "not valid JSON"),  # blank lines still count
}


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("variant", list(NOT_JSON))
def test_case18_jsonl_line_not_json_names_file_and_line(capsys, tiny_dirs, tmp_path, command, variant):
    text, line, says = NOT_JSON[variant]
    data = tmp_path / "data.jsonl"
    data.write_text(text)
    out = tmp_path / "run"
    argv = train_argv(tiny_dirs["llama"], data, out) if command == "train" else [
        "eval", "--model", tiny_dirs["llama"], "--data", data]
    one_line_error(capsys, *argv, names=[f"{data} line {line}:"], says=[says])
    assert nothing_written(out)


def test_case18_file_not_utf8_names_the_file(capsys, tiny_dirs, tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(_lines().encode() + '{"prompt": "café", "response": "x"}\n'.encode("latin-1"))
    one_line_error(capsys, *train_argv(tiny_dirs["llama"], data, tmp_path / "run"), names=[data], says=["UTF-8"])


def test_case18_valid_json_with_unicode_separators_and_a_bom_is_read_whole(capsys, tiny_dirs, tmp_path):
    """Not errors: a UTF-8 byte order mark, CRLF line ends, and raw U+2028 / U+0085 / form feed inside strings
    (valid JSON that str.splitlines would cut in two)."""
    rows = [{"text": f"line {i} \u2028 with \u0085 separators \x0c inside"} for i in range(5)]
    data = tmp_path / "odd.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode() + b"\r\n")
    summary = trained(capsys, tiny_dirs["llama"], data, tmp_path / "run")
    assert summary["data"]["rows"] == 5 and summary["data"]["train_examples"] + summary["data"]["val_examples"] == 5


# --- case 19: a row missing a field, or with the wrong type ---------------------------------------------------

BAD_ROWS = {  # variant -> (good rows, bad row, field named, words of the message)
    "response-a-number": (GOOD, {"prompt": "a", "response": 5}, "'response'", "expected str, found int"),
    "response-missing": (GOOD, {"prompt": "a"}, "'response'", "missing field"),
    "prompt-null": (GOOD, {"prompt": None, "response": "b"}, "'prompt'", "found NoneType"),
    "response-bool": (GOOD, {"prompt": "a", "response": True}, "'response'", "found bool"),
    "response-a-list": (GOOD, {"prompt": "a", "response": ["b"]}, "'response'", "found list"),
    "text-a-number": ([{"text": "ok"}] * 3, {"text": 3}, "'text'", "expected str, found int"),
    "text-an-object": ([{"text": "ok"}] * 3, {"text": {"a": 1}}, "'text'", "found dict"),
    "messages-not-a-list": ([CHAT] * 3, {"messages": "hello"}, "'messages'", "expected a JSON list"),
    "messages-an-object": ([CHAT] * 3, {"messages": {"role": "user", "content": "x"}}, "'messages'", "found dict"),
    "message-without-role": ([CHAT] * 3, {"messages": [{"content": "x"}]}, "messages[0]", "missing field 'role'"),
    "message-content-a-number": ([CHAT] * 3, {"messages": [{"role": "user", "content": 1}]}, "'content'",
                                 "found int"),
    "message-a-string": ([CHAT] * 3, {"messages": ["hi"]}, "'messages[0]'", "found str"),
}


@pytest.mark.parametrize("variant", list(BAD_ROWS))
def test_case19_malformed_row_names_row_and_field(capsys, tiny_dirs, tmp_path, variant):
    good, bad, field, says = BAD_ROWS[variant]
    data = write_jsonl(tmp_path / "data.jsonl", [*good[:3], bad, *good[3:]])
    out = tmp_path / "run"
    one_line_error(capsys, *train_argv(tiny_dirs["llama"], data, out), names=[f"{data} line 4", field], says=[says])
    assert nothing_written(out)


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("bad, field, says", [
    ({"text": "b", "label": None}, "'label'", "expected str or int, found NoneType"),
    ({"text": "b", "label": 1.5}, "'label'", "found float"),
    ({"text": "b", "label": ["a"]}, "'label'", "found list"),
    ({"text": "b", "label": True}, "'label'", "found bool"),
    ({"text": "b"}, "'label'", "missing field"),
    ({"text": None, "label": "a"}, "'text'", "found NoneType"),
])
def test_case19_malformed_classification_row_names_row_and_field(capsys, tiny_dirs, tmp_path, command, bad, field,
                                                                 says):
    data = write_jsonl(tmp_path / "topics.jsonl", [*TOPICS[:3], bad, *TOPICS[3:]])
    out = tmp_path / "run"
    argv = (train_argv(tiny_dirs["bert"], data, out, "--task", "classification") if command == "train"
            else ["eval", "--model", tiny_dirs["bert"], "--task", "classification", "--data", data])
    one_line_error(capsys, *argv, names=[f"{data} line 4", field], says=[says])
    assert nothing_written(out)


def test_case19_csv_and_parquet_rows_are_named_by_row_number(capsys, tiny_dirs, tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,response\na,b\nc\n")  # row 2 is short a cell: its response is missing
    one_line_error(capsys, *train_argv(tiny_dirs["llama"], csv, tmp_path / "a"), names=[f"{csv} row 2", "'response'"],
                   says=["missing field"])
    parquet = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"text": ["fine", None, "also fine"]}), parquet)
    one_line_error(capsys, *train_argv(tiny_dirs["llama"], parquet, tmp_path / "b"),
                   names=[f"{parquet} row 2", "'text'"], says=["missing field"])


# --- case 20: empty text is skipped and counted, never a zero-length batch -----------------------------------

EMPTY_ROWS = {  # variant -> rows, of which only the last 3 are usable
    "text": [{"text": ""}] * 14 + [{"text": "   "}] * 4 + [{"text": "\n\t"}] * 2 + [{"text": "hello there"}] * 3,
    "prompt-response": ([{"prompt": "q", "response": ""}] * 10 + [{"prompt": "q", "response": " \n"}] * 10
                        + GOOD[:3]),
    "messages": ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}] * 12
                 + [{"messages": [{"role": "user", "content": "only a question"}]}] * 8 + [CHAT] * 3),
}


@pytest.mark.parametrize("variant", list(EMPTY_ROWS))
def test_case20_empty_rows_are_skipped_counted_and_no_batch_is_empty(capsys, tiny_dirs, tmp_path, variant):
    rows = EMPTY_ROWS[variant]
    data = write_jsonl(tmp_path / "mostly-empty.jsonl", rows)
    summary = trained(capsys, tiny_dirs["llama"], data, tmp_path / "run", "--max-steps", "3")
    stats = summary["data"]
    assert stats["rows"] == len(rows) and stats["skipped_empty"] == len(rows) - 3
    assert stats["train_examples"] + stats["val_examples"] == 3
    steps = [m for m in summary["metrics"] if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert all(m["tokens"] > 0 and m["target_tokens"] > 0 for m in steps)  # never a zero-length batch


def test_case20_empty_classification_texts_are_skipped_and_counted(capsys, tiny_dirs, tmp_path):
    rows = [{"text": " ", "label": "a"}] * 5 + TOPICS
    data = write_jsonl(tmp_path / "topics.jsonl", rows)
    summary = trained(capsys, tiny_dirs["bert"], data, tmp_path / "run", "--task", "classification")
    assert summary["data"]["skipped_empty"] == 5 and summary["data"]["rows"] == 9


# --- case 21: sequences longer than seq_len: truncated or dropped, counted -----------------------------------

SEQ_LEN = 40


@pytest.fixture
def long_rows(tokenizer) -> tuple[list[dict], int]:
    """Texts of growing length, and how many of them exceed SEQ_LEN tokens (EOS included)."""
    rows = [{"text": " ".join(["the quick brown fox jumps over the lazy dog"] * k)} for k in (1, 1, 2, 3, 4, 5)]
    lengths = [len(tokenizer(r["text"])["input_ids"]) + 1 for r in rows]
    return rows, sum(n > SEQ_LEN for n in lengths)


@pytest.mark.parametrize("truncation", ["truncate", "drop"])
def test_case21_long_rows_are_truncated_or_dropped_as_configured(capsys, tiny_dirs, tmp_path, long_rows,
                                                                 truncation):
    rows, n_long = long_rows
    assert 0 < n_long < len(rows) - 1
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    config = tmp_path / "run.yaml"
    config.write_text(f"truncation: {truncation}\nseq_len: {SEQ_LEN}\n")  # truncation is a run-config key
    summary = trained(capsys, tiny_dirs["llama"], data, tmp_path / "run", "--config", config)
    stats = summary["data"]
    assert summary["config"]["truncation"] == truncation and summary["config"]["seq_len"] == SEQ_LEN
    if truncation == "truncate":
        assert (stats["truncated"], stats["dropped"]) == (n_long, 0)
        assert stats["train_examples"] + stats["val_examples"] == len(rows)
    else:
        assert (stats["truncated"], stats["dropped"]) == (0, n_long)
        assert stats["train_examples"] + stats["val_examples"] == len(rows) - n_long
    tokens = [m["tokens"] for m in summary["metrics"] if "loss" in m]
    assert tokens and max(tokens) <= 4 * SEQ_LEN  # no example longer than seq_len reached a batch


def test_case21_prompt_that_fills_seq_len_is_dropped_even_when_truncating(capsys, tiny_dirs, tmp_path):
    """Truncation would leave nothing to predict: the row is dropped and counted, not trained on."""
    long_prompt = {"prompt": " ".join(["tell me about the quick brown fox"] * 20), "response": "it jumps."}
    data = write_jsonl(tmp_path / "pairs.jsonl", [long_prompt] * 2 + GOOD)
    summary = trained(capsys, tiny_dirs["llama"], data, tmp_path / "run", "--seq-len", 64)  # GOOD rows: 44 at most
    assert summary["data"]["dropped"] == 2 and summary["data"]["truncated"] == 0


# --- case 22: no usable rows: a clear error before training starts -------------------------------------------

def _parquet(path: Path, table) -> Path:
    pq.write_table(table, path)
    return path


NO_USABLE = {  # variant -> (file name, writer, words of the message); the file is written into tmp_path
    "all-empty-text": ("a.jsonl", lambda p: write_jsonl(p, [{"text": ""}, {"text": "  "}]), "no usable rows"),
    "all-empty-responses": ("a.jsonl", lambda p: write_jsonl(p, [{"prompt": "q", "response": ""}] * 3),
                            "no usable rows"),
    "no-assistant-turns": ("a.jsonl", lambda p: write_jsonl(p, [{"messages": [{"role": "user", "content": "q"}]}]),
                           "no usable rows"),
    "only-blank-lines": ("a.jsonl", lambda p: p.write_text("\n\n   \n"), "no rows"),
    "empty-file": ("a.jsonl", lambda p: p.write_text(""), "no rows"),
    "csv-header-only": ("a.csv", lambda p: p.write_text("prompt,response\n"), "no rows"),
    "parquet-no-rows": ("a.parquet", lambda p: _parquet(p, pa.table({"text": pa.array([], pa.string())})),
                        "no rows"),
    "all-longer-than-seq_len-dropped": ("a.jsonl", lambda p: write_jsonl(p, [{"text": "word " * 200}] * 3),
                                        "3 dropped as longer than seq_len=40"),
}


@pytest.mark.parametrize("variant", list(NO_USABLE))
def test_case22_no_usable_rows_fails_before_training(capsys, tiny_dirs, tmp_path, variant):
    name, write, says = NO_USABLE[variant]
    data = tmp_path / name
    write(data)
    config = tmp_path / "run.yaml"
    config.write_text("truncation: drop\n")
    out = tmp_path / "run"
    one_line_error(capsys, *train_argv(tiny_dirs["llama"], data, out, "--config", config, "--seq-len", SEQ_LEN),
                   names=[data], says=[says, "expected at least one"])
    assert nothing_written(out)


def test_case22_a_failed_run_leaves_an_earlier_runs_checkpoints_alone(capsys, tiny_dirs, tmp_path):
    """A data error on a resume of a real run: the earlier checkpoints are untouched."""
    out = tmp_path / "run"
    good = write_jsonl(tmp_path / "good.jsonl", GOOD)
    code, err = cli(capsys, *train_argv(tiny_dirs["llama"], good, out, "--save-every", "1"))
    assert code == 0, err
    before = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    good.write_text("")  # the data file emptied since
    one_line_error(capsys, *train_argv(tiny_dirs["llama"], good, out, "--save-every", "1", "--resume"),
                   names=[good], says=["no rows"])
    assert {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()} == before


# --- case 23: CSV / Parquet with the wrong columns -----------------------------------------------------------

WRONG_COLUMNS = {  # variant -> (file name, writer, task, columns found, expected)
    "csv-other-names": ("a.csv", lambda p: p.write_text("question,answer\na,b\n"), "causal-lm", "question, answer",
                        "text | prompt + response | messages"),
    "csv-case-differs": ("a.csv", lambda p: p.write_text("Text\nhello\n"), "causal-lm", "Text",
                         "text | prompt + response | messages"),
    "csv-prompt-without-response": ("a.csv", lambda p: p.write_text("prompt\nhello\n"), "causal-lm", "prompt",
                                    "prompt + response"),
    "csv-classification-without-label": ("a.csv", lambda p: p.write_text("text\nhello\n"), "classification",
                                         "text", "text and label"),
    "parquet-other-names": ("a.parquet", lambda p: _parquet(p, pa.table({"question": ["a"], "answer": ["b"]})),
                            "causal-lm", "question, answer", "text | prompt + response | messages"),
    "parquet-classification-without-text": ("a.parquet", lambda p: _parquet(p, pa.table({"label": ["a"]})),
                                            "classification", "label", "text and label"),
    "jsonl-other-names": ("a.jsonl", lambda p: write_jsonl(p, [{"input": "a", "target": "b"}]), "causal-lm",
                          "input, target", "text | prompt + response | messages"),
}


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("variant", list(WRONG_COLUMNS))
def test_case23_wrong_columns_list_found_and_expected(capsys, tiny_dirs, tmp_path, command, variant):
    name, write, task, found, expected = WRONG_COLUMNS[variant]
    data = tmp_path / name
    write(data)
    model = tiny_dirs["bert" if task == "classification" else "llama"]
    out = tmp_path / "run"
    argv = (train_argv(model, data, out, "--task", task) if command == "train"
            else ["eval", "--model", model, "--task", task, "--data", data])
    one_line_error(capsys, *argv, names=[data], says=[f"columns found: {found};", expected])
    assert nothing_written(out)


def test_case23_spreadsheet_csv_with_bom_and_multiline_cells_is_read(capsys, tiny_dirs, tmp_path):
    """Not errors: a byte order mark before the header, quoted cells with line breaks and U+2028."""
    data = tmp_path / "export.csv"
    body = 'text,label\r\n"first line\nsecond line",a\r\nwith\u2028separator,b\r\nplain,a\r\nmore,b\r\n'
    data.write_bytes(b"\xef\xbb\xbf" + body.encode())
    summary = trained(capsys, tiny_dirs["bert"], data, tmp_path / "run", "--task", "classification")
    assert summary["data"]["rows"] == 4
    artifact = json.loads((tmp_path / "run" / "artifact" / "tunelab.json").read_text())
    assert artifact["label_names"] == ["a", "b"]


# --- case 24: a missing data file, a directory, something else -----------------------------------------------

def _bad_paths(tmp_path: Path) -> dict[str, tuple[Path | str, str]]:
    (tmp_path / "dir.jsonl").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    os.symlink(tmp_path / "gone.jsonl", tmp_path / "dangling.jsonl")
    return {
        "missing": (tmp_path / "nope.jsonl", "data file not found"),
        "a-directory": (tmp_path, "is a directory"),
        "a-directory-named-like-a-file": (tmp_path / "dir.jsonl", "is a directory"),
        "a-dangling-symlink": (tmp_path / "dangling.jsonl", "data file not found"),
        "an-unsupported-suffix": (tmp_path / "notes.txt", "unsupported file type '.txt'"),
        "an-empty-path": ("", "data path is empty"),
    }


VARIANTS_24 = ["missing", "a-directory", "a-directory-named-like-a-file", "a-dangling-symlink",
               "an-unsupported-suffix", "an-empty-path"]


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("variant", VARIANTS_24)
def test_case24_bad_data_path_is_named(capsys, tiny_dirs, tmp_path, command, variant):
    root = tmp_path / "data"
    root.mkdir()
    path, says = _bad_paths(root)[variant]
    out = tmp_path / "run"
    argv = (train_argv(tiny_dirs["llama"], path, out) if command == "train"
            else ["eval", "--model", tiny_dirs["llama"], "--data", path])
    one_line_error(capsys, *argv, names=[path] if path else [], says=[says, "expected"])
    assert nothing_written(out)


def test_case24_unreadable_data_file_is_named(capsys, tiny_dirs, tmp_path, monkeypatch):
    """Permission denied (simulated: the tests may run as root, who can read anything)."""
    data = write_jsonl(tmp_path / "secret.jsonl", GOOD)
    real = Path.read_text

    def guarded(self, *args, **kwargs):
        if self == data:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", guarded)
    one_line_error(capsys, *train_argv(tiny_dirs["llama"], data, tmp_path / "run"), names=[data],
                   says=["Permission denied", "expected a readable file"])
