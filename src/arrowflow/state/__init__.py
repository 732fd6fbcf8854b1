"""State stores for streaming scopes: skip what is done, load it, persist what is new."""

from __future__ import annotations

from arrowflow.state.base import ScopeInfo, StateStore
from arrowflow.state.duckdb import DuckDBState

__all__ = ["DuckDBState", "ScopeInfo", "StateStore"]
