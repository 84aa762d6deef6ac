"""Read data rows from JSONL, CSV or Parquet files, or from the embedded default data sets.

Every row carries a `where` string (`pairs.jsonl line 3`, `data.csv row 2`) so later errors can name it.
Numbering is 1-based: JSONL counts physical lines (blank lines are skipped but counted), CSV and Parquet count
data rows (the CSV header is not a row).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tunelab import defaults
from tunelab.errors import DataError
from tunelab.jsonio import loads_object

SUFFIXES = (".jsonl", ".csv", ".parquet")
# The longest row (a JSONL line, a CSV cell) read, in characters: far above any seq_len's worth of text, and
# small enough that tokenizing one row cannot exhaust memory.
MAX_ROW_CHARS = 16 * 1024 * 1024
DEFAULT_SPECS = ("default", "default:prose")
# every embedded spec; `default:topics` is the general labelled task compare's forgetting probe uses by default
KNOWN_DEFAULTS = (*DEFAULT_SPECS, "default:topics")


@dataclass
class Table:
    """Rows read from one source: `name` for messages, the `columns` it declares, and (where, row) pairs."""

    name: str
    columns: list[str]
    rows: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def read_source(spec: str | Path, task: str) -> Table:
    """Read `spec`: `default`, `default:prose`, or a path to a `.jsonl`, `.csv` or `.parquet` file."""
    if isinstance(spec, str) and (spec in DEFAULT_SPECS or spec.startswith("default:")):
        return read_default(spec, task)
    if not str(spec).strip():
        raise DataError(f"data path is empty; expected a .jsonl, .csv or .parquet file, or {' or '.join(DEFAULT_SPECS)}")
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"{path}: data file not found; expected a .jsonl, .csv or .parquet file, or "
                        f"{' or '.join(DEFAULT_SPECS)}")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; expected a .jsonl, .csv or .parquet file")
    if not path.is_file():  # a FIFO would block forever, a device such as /dev/zero never ends
        raise DataError(f"{path}: not a regular file (a pipe, device or socket); expected a .jsonl, .csv or "
                        f".parquet file")
    readers = {".jsonl": read_jsonl, ".csv": read_csv, ".parquet": read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}")
    return reader(path)


def read_default(spec: str, task: str) -> Table:
    """The embedded data sets: instruction pairs (causal-lm) or news topics (classification); prose articles;
    conversation topics (`default:topics`, labelled: a classification task)."""
    if spec == "default" and task == "classification":
        rows, name = defaults.news_classification(), "default (news topics)"
    elif spec == "default":
        rows, name = defaults.instruction_pairs(), "default (instruction pairs)"
    elif spec == "default:prose":
        rows, name = defaults.prose_articles(), "default:prose (news articles)"
    elif spec == "default:topics":
        rows, name = defaults.general_topics(), "default:topics (conversation topics)"
    else:
        raise DataError(f"data spec {spec!r} is unknown; expected a file path or one of {', '.join(KNOWN_DEFAULTS)}")
    columns = list(rows[0]) if rows else []
    return Table(name, columns, [(f"{name} row {i}", r) for i, r in enumerate(rows, 1)])


def _read_text(path: Path) -> str:
    # utf-8-sig: a leading byte order mark (spreadsheet CSV exports) is not part of the first column's name
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); expected a UTF-8 encoded file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the data file ({e.strerror or e}); expected a readable file") from None


def read_jsonl(path: Path) -> Table:
    """One JSON object per line; blank lines are skipped. Columns are the keys of the first object."""
    table = Table(str(path), [])
    # split on "\n" only: str.splitlines also breaks at U+2028 and other separators a JSON string may hold raw
    for number, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        if len(line) > MAX_ROW_CHARS:
            raise DataError(f"{path} line {number}: row of {len(line)} characters is over the limit of "
                            f"{MAX_ROW_CHARS} per row; split or shorten it")
        row = loads_object(line, f"{path} line {number}", DataError)
        if not table.rows:
            table.columns = list(row)
        table.rows.append((f"{path} line {number}", row))
    return table


def read_csv(path: Path) -> Table:
    """A CSV file with a header row; every value is a string (a `messages` cell holds JSON text)."""
    previous_limit = csv.field_size_limit(MAX_ROW_CHARS)  # the default 128 KiB is far below a JSONL row's
    rows: list = []
    try:
        # newline="": records end at \n, \r\n or \r only (not U+2028), and quoted cells keep their line breaks
        reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
        columns = list(reader.fieldnames or [])
        rows.extend((f"{path} row {i}", _csv_row(row)) for i, row in enumerate(reader, 1))
    except csv.Error as e:
        raise DataError(f"{path} row {len(rows) + 1}: not valid CSV ({e})") from None
    finally:
        csv.field_size_limit(previous_limit)
    return Table(str(path), columns, rows)


def _csv_row(row: dict) -> dict:
    # DictReader puts surplus cells under the key None and missing cells as None; keep named columns only
    return {k: v for k, v in row.items() if k is not None and v is not None}


def read_parquet(path: Path) -> Table:
    """A Parquet file, read with pyarrow; null cells count as missing fields."""
    try:
        arrow = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    rows = [(f"{path} row {i}", {k: v for k, v in row.items() if v is not None})
            for i, row in enumerate(arrow.to_pylist(), 1)]
    return Table(str(path), list(arrow.column_names), rows)
