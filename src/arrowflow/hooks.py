"""Calling user hooks so that a failing hook is logged and never halts a run.

An interrupt inside a hook (Ctrl-C, or DuckDB's "query interrupted") is not a failure of the
hook: it stops the run.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from arrowflow._retry import as_interrupt, is_interrupt

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["call_hook", "logger"]

logger = logging.getLogger("arrowflow")


def call_hook(agent_name: str, hook_name: str, hook: Callable[..., Any] | None, *args: Any) -> None:
    """Call ``hook(*args)`` if set; an exception is logged on the ``arrowflow`` logger."""
    if hook is None:
        return
    try:
        hook(*args)
    except Exception as exc:
        if is_interrupt(exc):
            raise as_interrupt(exc) from exc
        logger.exception(
            "Agent '%s': hook %s raised; the run goes on without it.", agent_name, hook_name
        )
