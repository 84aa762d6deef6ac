"""The method registry. Each method module registers itself with one `@register` line.

Every module in this package (except `base` and `kit`) is imported on first lookup, so a new method joins the CLI,
`tunelab methods`, compare and the test matrix by existing as a file here.
"""

from __future__ import annotations

import importlib
import pkgutil

from tunelab.errors import ConfigError, closest
from tunelab.methods.base import Method, register
from tunelab.methods.kit import REGISTRY

__all__ = ["REGISTRY", "all_methods", "get_method", "register"]
_loaded = False


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            if info.name not in ("base", "kit"):
                importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True


def all_methods() -> dict[str, Method]:
    """Every registered method, by name, in registration order."""
    _load_all()
    return dict(REGISTRY)


def get_method(name: str) -> Method:
    """The registered method called `name`; `ConfigError` with the closest name otherwise."""
    methods = all_methods()
    if name not in methods:
        raise ConfigError(f"unknown method '{name}'{closest(name, methods)}; known: {', '.join(methods)}")
    return methods[name]
