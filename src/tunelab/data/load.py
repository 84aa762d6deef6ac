"""`load_data`: read a source, encode its rows, split train/validation, map labels, and pack if asked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.data.collate import pack
from tunelab.data.formats import detect_format, encode_row, fit_length, has_target
from tunelab.data.sources import Table, read_source
from tunelab.data.templates import resolve_chat_template
from tunelab.errors import ConfigError, DataError

TASKS = ("causal-lm", "classification")
TRUNCATION = ("truncate", "drop")
SPLIT_SEED = 1_234_567  # fixed: the split never depends on the training seed


@dataclass
class Dataset:
    """Encoded examples ready for `collate`.

    `stats`: `rows` read, `skipped_empty` (rows whose text, response or assistant turns are empty), `truncated`
    (rows cut to seq_len), `dropped` (rows longer than seq_len under truncation="drop", and rows left with
    nothing to predict after truncation). `label_names` is the class list for classification, else None.
    """

    train: list[dict]
    val: list[dict]
    label_names: list[str] | None
    stats: dict[str, int]
    format: str = ""  # text, prompt-response, messages, alpaca, sharegpt or classification


def load_data(spec: str | Path, tokenizer, task: str, seq_len: int, *, packing: bool = False,
              packing_documents: bool = False,
              truncation: str = "truncate", val_fraction: float = 0.1,
              label_names: list[str] | None = None, columns: dict[str, str] | None = None,
              chat_template: str | None = None) -> Dataset:
    """Load a data set as encoded train/validation examples.

    Args:
        spec: `default` (instruction pairs for causal-lm, news topics for classification), `default:prose`
            (news articles as text), or a `.jsonl`/`.csv`/`.parquet` path; the columns decide the format.
        tokenizer: the model's tokenizer (its chat template is used for prompt/response and messages).
        task: `causal-lm` or `classification`.
        seq_len: the longest example in tokens; longer rows are cut or dropped per `truncation`.
        packing: causal-lm only; concatenate examples and cut them into `seq_len` chunks (see `pack`).
        packing_documents: with packing, keep attention and prediction inside each document (see `pack`).
        truncation: `truncate` or `drop`.
        val_fraction: share of usable rows held out, chosen by a fixed-seed permutation (same split every run).
        label_names: the class list for classification; default: the sorted labels of the training rows.
        columns: tunelab's column name -> the file's (`{"prompt": "question", "response": "answer"}`).
        chat_template: a shipped template name or a Jinja file (`templates.py`); set on `tokenizer` first.
    Returns:
        A `Dataset`. Raises DataError when the source cannot be read or has no usable rows.
    """
    _check_args(task, seq_len, truncation, val_fraction, packing)
    if chat_template is not None:
        tokenizer.chat_template = resolve_chat_template(chat_template)
    table = rename_columns(read_source(spec, task), columns)
    if not table.rows:
        raise DataError(f"{table.name}: no rows; expected at least one data row")
    fmt = detect_format(table.columns, task, table.name)
    items, stats = encode_table(table, fmt, tokenizer, seq_len, truncation)
    if not items:
        raise DataError(f"{table.name}: no usable rows ({stats['rows']} read, {stats['skipped_empty']} empty, "
                        f"{stats['dropped']} dropped as longer than seq_len={seq_len}); expected at least one")
    train_idx, val_idx = split_indices(len(items), val_fraction, table.name)
    train, val = [items[i] for i in train_idx], [items[i] for i in val_idx]
    names = None
    if task == "classification":
        names = [str(n) for n in label_names] if label_names is not None else sorted_labels(train)
        known_as = "given label_names" if label_names is not None else "labels of the training rows"
        train, val = map_labels(train, names, known_as), map_labels(val, names, known_as)
    train_ex, val_ex = [e for _, e in train], [e for _, e in val]
    if packing:
        train_ex, val_ex = pack(train_ex, seq_len, packing_documents), pack(val_ex, seq_len, packing_documents)
    return Dataset(train=train_ex, val=val_ex, label_names=names, stats=stats, format=fmt)


def _check_args(task: str, seq_len: int, truncation: str, val_fraction: float, packing: bool) -> None:
    if task not in TASKS:
        raise ConfigError(f"task: expected one of {', '.join(TASKS)}, found {task!r}")
    if seq_len <= 0:
        raise ConfigError(f"seq_len: expected a positive number of tokens, found {seq_len}")
    if truncation not in TRUNCATION:
        raise ConfigError(f"truncation: expected one of {', '.join(TRUNCATION)}, found {truncation!r}")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction: expected a value in [0, 1), found {val_fraction}")
    if packing and task != "causal-lm":
        raise ConfigError(f"packing: applies to task causal-lm only, found task {task}")


def rename_columns(table: Table, columns: dict[str, str] | None) -> Table:
    """The table with its columns renamed by `columns` (tunelab's name -> the file's); a DataError names a
    mapped column the file lacks."""
    if not columns:
        return table
    for ours, theirs in columns.items():
        if theirs not in table.columns:
            raise DataError(f"{table.name}: columns maps {ours} to '{theirs}', which is not a column here; "
                            f"columns found: {', '.join(table.columns) or 'none'}")
    rename = {theirs: ours for ours, theirs in columns.items()}
    shadowed = set(rename.values()) - set(rename)  # a column of the target name that is not itself mapped

    def renamed(row: dict) -> dict:
        return {rename.get(k, k): v for k, v in row.items() if k not in shadowed}

    return Table(table.name, [rename.get(c, c) for c in table.columns if c not in shadowed],
                 [(where, renamed(row)) for where, row in table.rows])


def encode_table(table: Table, fmt: str, tokenizer, seq_len: int, truncation: str):
    """Encode every row; returns ([(where, example)], stats). Empty rows are skipped, long ones cut or dropped."""
    stats = {"rows": len(table.rows), "skipped_empty": 0, "truncated": 0, "dropped": 0}
    items = []
    for where, row in table.rows:
        example = encode_row(fmt, row, where, tokenizer)
        if example is None:
            stats["skipped_empty"] += 1
            continue
        cut = len(example["input_ids"]) > seq_len
        if cut and truncation == "drop":
            stats["dropped"] += 1
            continue
        if cut:
            example = fit_length(example, seq_len, tokenizer)
        if not has_target(example):  # e.g. the prompt alone fills seq_len
            stats["dropped"] += 1
            continue
        stats["truncated"] += cut
        items.append((where, example))
    return items, stats


def split_indices(n: int, val_fraction: float, name: str) -> tuple[list[int], list[int]]:
    """(train, val) indices: a fixed-seed permutation of range(n), the first round(n * val_fraction) held out.

    Train is never empty; val is empty only when val_fraction == 0 (otherwise at least one row).
    """
    if val_fraction == 0:
        return list(range(n)), []
    if n < 2:
        raise DataError(f"{name}: {n} usable row; a validation split needs at least 2 "
                        f"(set val_fraction to 0 to train on every row)")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def sorted_labels(items: list[tuple[str, dict]]) -> list[str]:
    """The distinct labels, sorted (numerically when every label is an integer)."""
    labels = {e["label"] for _, e in items}
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def map_labels(items: list[tuple[str, dict]], names: list[str], known_as: str) -> list[tuple[str, dict]]:
    """Replace each string label by its index in `names`; DataError naming the row for an unknown label."""
    index = {name: i for i, name in enumerate(names)}
    out = []
    for where, example in items:
        if example["label"] not in index:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise DataError(f"{where}: label {example['label']!r} is not among the {known_as} ({shown})")
        out.append((where, {"input_ids": example["input_ids"], "label": index[example["label"]]}))
    return out
