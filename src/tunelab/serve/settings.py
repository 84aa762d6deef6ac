"""The settings of `tunelab serve`, from a YAML file (`--config`) and flags: one validated `ServeConfig`.

Keys are the flags' names with underscores (`max_adapters`, `served_model_name`); `adapters` maps names to
adapter dirs. Flags override the file. An unknown key names the file and suggests the closest key. This module
imports no torch, so a bad file fails at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import ConfigError
from tunelab.validation import parse_model


class ServeConfig(BaseModel):
    """Everything `tunelab serve` takes (see docs/serve.md)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    adapters: dict[str, str] = Field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    adapter_root: Path | None = None
    max_adapters: int = Field(8, ge=1)
    max_rank: int = Field(64, ge=1)
    max_batch_size: int = Field(16, ge=1)
    prefill_chunk: int = Field(2048, ge=1)
    cuda_graphs: bool = True
    max_tokens_limit: int = Field(512, ge=1)
    slot_wait: float = Field(30.0, ge=0, allow_inf_nan=False)
    merge: str | None = None
    served_model_name: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    chat_template: str | None = None
    api_key: str | None = None
    docs: bool = False


def parse_adapter_pairs(pairs: list[str] | None) -> dict[str, str]:
    """`--adapter NAME=DIR` values as {name: dir}; a pair without `=` names itself in the error."""
    adapters = {}
    for pair in pairs or []:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {pair!r}: expected NAME=DIR")
        adapters[name] = path
    return adapters


def build_serve_config(file_values: dict[str, Any], overrides: dict[str, Any], where: str) -> ServeConfig:
    """Merge the YAML file's values with the flags given (non-None wins; `adapters` are joined) and validate."""
    values = {**file_values, **{k: v for k, v in overrides.items() if v is not None and k != "adapters"}}
    from_file = file_values.get("adapters") or {}
    if not isinstance(from_file, dict):
        raise ConfigError(f"{where}: key 'adapters': expected a mapping of adapter names to dirs, found "
                          f"{type(from_file).__name__}")
    adapters = {**from_file, **(overrides.get("adapters") or {})}
    if adapters:
        values["adapters"] = adapters
    if "model" not in values:
        raise ConfigError(f"{where}: no model; give --model or the key 'model'")
    return parse_model(ServeConfig, values, where=where)
