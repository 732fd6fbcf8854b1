"""State stores for streaming scopes: skip what is done, load it, persist what is new.

``DuckDBState`` keeps what is done in a DuckDB database; ``MemoryState`` behaves the same, in
memory (a double for tests, a store for runs that need no durability). Both implement
``Store``, the protocol the executor drives a store through, stream by stream (``StreamInfo``);
any object with the three state callables (``StateStore``) can be given as ``state=`` too.
"""

from __future__ import annotations

from arrowflow.state.base import ScopeInfo, StateStore, Store, StreamInfo
from arrowflow.state.duckdb import DuckDBState
from arrowflow.state.memory import MemoryState

__all__ = ["DuckDBState", "MemoryState", "ScopeInfo", "StateStore", "Store", "StreamInfo"]
