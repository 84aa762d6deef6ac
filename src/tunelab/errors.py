"""Errors meant for people: one line that names the file, row, field, key or module.

Every error a user can cause by bad input is a `TunelabError`. The CLI prints it as one line and exits 2
(no traceback unless `--debug`). Internal bugs stay ordinary exceptions.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TunelabError(Exception):
    """Bad input or a refused operation; exit code 2 at the CLI."""

    exit_code = 2


class ConfigError(TunelabError):
    """An invalid configuration key or value."""


class DataError(TunelabError):
    """A data file that cannot be read as documented (names file, row and field)."""


class ArtifactError(TunelabError):
    """A model, adapter or checkpoint file that is missing, corrupt or does not fit."""


class ResourceError(TunelabError):
    """Out of memory, disk full, or a numeric failure (NaN/inf) during a run."""


class PeerFailed(TunelabError):
    """Another rank of a distributed run failed or vanished: that rank reports the cause; this one stops
    without a line of its own (`quiet`)."""

    exit_code = 1
    quiet = True


def closest(key: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest choice to `key`, or '' when nothing is close.

    Option dashes are left out of the comparison: two shared leading `--` made unrelated options look alike
    (`--dtype` and `--adapter` share only `d`, `t` and the dashes).
    """
    bare = {c.lstrip("-"): c for c in choices}
    match = difflib.get_close_matches(key.lstrip("-"), list(bare), n=1, cutoff=0.6)
    return f" (did you mean '{bare[match[0]]}'?)" if match else ""
