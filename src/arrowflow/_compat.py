"""Optional dependencies, imported only when a feature needs them."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from arrowflow.exceptions import ConfigurationError

__all__ = ["import_optional", "is_installed"]


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    return importlib.util.find_spec(module) is not None


def import_optional(module: str, *, extra: str) -> ModuleType:
    """Import ``module``, or say which extra of arrowflow installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigurationError(
            f"{module.partition('.')[0]} is needed here; install it with "
            f"pip install 'arrowflow[{extra}]'."
        ) from exc
