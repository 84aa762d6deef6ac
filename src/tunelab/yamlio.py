"""YAML read for run configs: safe types only, and no aliases.

An alias (`*name`) lets a few hundred bytes stand for an exponentially large structure (the "billion laughs"
bomb); `safe_load` builds it with shared references, and whatever walks it afterwards (validation, merging,
hashing) runs for ever. A run config has no use for aliases, so they are refused where they appear.
"""

from __future__ import annotations

from typing import Any

import yaml

from tunelab.errors import ConfigError


class _NoAliasLoader(yaml.SafeLoader):
    """`SafeLoader` that refuses every alias (anchors alone are harmless)."""

    source = "YAML"

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ConfigError(f"{self.source} line {mark.line + 1}: YAML aliases (*name) are not allowed in a "
                              f"tunelab config; write the value out")
        return super().compose_node(parent, index)


def load_no_alias(text: str, source: str) -> Any:
    """Parse `text` as YAML with safe types and no aliases; a `ConfigError` names `source` and the line.

    Other YAML errors propagate as `yaml.YAMLError` for the caller to word.
    """
    loader = _NoAliasLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
