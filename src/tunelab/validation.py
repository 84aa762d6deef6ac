"""Validating user values into pydantic models, with one-line errors (the ground floor: imports no tunelab layer).

Both the run configuration and each method's `--set` options go through `parse_model`, so an unknown key or a
bad value reads the same wherever it was given.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from tunelab.errors import ConfigError, closest


def parse_model(cls: type[BaseModel], values: dict[str, Any], where: str) -> BaseModel:
    """Validate `values` into `cls`, turning pydantic errors into a one-line `ConfigError` prefixed by `where`."""
    check_keys(cls, values, where)
    try:
        return cls(**values)
    except ValidationError as e:
        raise ConfigError(f"{where}: {first_error(e)}") from None


def check_keys(cls: type[BaseModel], values: dict[str, Any], where: str) -> None:
    """Raise a one-line `ConfigError` prefixed by `where` for the first key of `values` that `cls` lacks."""
    unknown = [k for k in values if k not in cls.model_fields]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"{where}: unknown key '{key}'{closest(key, cls.model_fields)}; valid keys: {', '.join(cls.model_fields)}"
        )


def first_error(e: ValidationError) -> str:
    """The first pydantic error as `key 'a.b': message (got value)`; an error of the whole model (a check across
    keys, whose message names them) as its message alone."""
    err = e.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")  # pydantic's label for a validator's ValueError
    loc = ".".join(str(p) for p in err.get("loc", ()))
    if not loc:
        return msg
    got = err.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"key '{loc}': {msg}{got_s}"
