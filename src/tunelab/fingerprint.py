"""What a run was trained on, by content rather than by the spelling of its paths.

A resume (and a `compare` rerun that reuses a finished strategy) checks these instead of the `--data` and
`--model` strings: the same file named by an absolute or a relative path is the same input, and a file whose
contents changed under the same path is not.

- data: the file's size and the sha256 of its bytes (an embedded data set: its name);
- model: for each weight file (`*.safetensors`, `*.bin`, `*.pt`) and `config.json`, its name, size, its
  safetensors header (names, dtypes, shapes, offsets) and 16 samples of 4 KiB spread over the file. Any
  retraining changes nearly every byte, so the samples see it; hashing whole multi-GB weights at each start would not
  pay for what it adds.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from tunelab.errors import ConfigError

CHUNK = 1 << 20
SAMPLES, SAMPLE_BYTES = 16, 4096
HEADER_CAP = 100 << 20  # the safetensors format's own limit on header size
MODEL_FILES = ("*.safetensors", "*.bin", "*.pt", "config.json")


def data_fingerprint(spec: str) -> dict:
    """`{"bytes", "sha256"}` of a data file; `{"name"}` for an embedded data set or a path that is no file."""
    path = Path(spec).expanduser()
    if not path.is_file():
        return {"name": str(spec)}  # the loader names what is wrong with it
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def model_fingerprint(spec: str) -> dict:
    """`{"files", "sha256"}` over the model dir's weight files and config (see the module docstring)."""
    from tunelab.models import resolve_spec

    path = resolve_spec(spec)
    files = sorted({f for pattern in MODEL_FILES for f in path.glob(pattern) if f.is_file()})
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as f:
            if file.suffix == ".safetensors" and size >= 8:
                (length,) = struct.unpack("<Q", f.read(8))
                digest.update(f.read(min(length, HEADER_CAP)))
            for i in range(SAMPLES):
                f.seek(size * i // SAMPLES)
                digest.update(f.read(SAMPLE_BYTES))
    return {"files": len(files), "sha256": digest.hexdigest()}


def fingerprints(model: str, data: str) -> dict:
    """The fingerprints of a run's model and data."""
    return {"model": model_fingerprint(model), "data": data_fingerprint(data)}


def changed_inputs(saved: dict, now: dict, model: str, data: str) -> list[str]:
    """What differs between two `fingerprints`, one phrase per input ([] when both match)."""
    named = {"model": f"the model at {model}", "data": f"the data file {data}"}
    changes = []
    for key in ("model", "data"):
        before, after = saved.get(key) or {}, now.get(key) or {}
        if before != after:
            sizes = f" ({before['bytes']} -> {after['bytes']} bytes)" if "bytes" in before and "bytes" in after else ""
            changes.append(f"{named[key]} changed since then{sizes}")
    return changes


def check_unchanged(saved: dict | None, now: dict, model: str, data: str, where: str, force: bool) -> None:
    """Refuse (unless `force`) when the model or data fingerprints `now` differ from the `saved` ones; one line
    naming them. Nothing to check when nothing was saved (a checkpoint from before fingerprints)."""
    if not saved:
        return
    changes = changed_inputs(saved, now, model, data)
    if changes and not force:
        raise ConfigError(f"{where}: cannot resume, {' and '.join(changes)}; pass --force to resume anyway")
