"""The examples in the state package's docstrings run, and the package exports its names."""

from __future__ import annotations

import doctest

import pytest

import arrowflow.state
import arrowflow.state._runs
import arrowflow.state._schemas
import arrowflow.state.duckdb
import arrowflow.state.memory
from arrowflow.state.base import Store


@pytest.mark.parametrize(
    "module",
    [
        arrowflow.state.duckdb,
        arrowflow.state.memory,
        arrowflow.state._runs,
        arrowflow.state._schemas,
    ],
)
def test_docstring_examples_run(module: object) -> None:
    failed, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)  # type: ignore[arg-type]
    assert tried > 0
    assert failed == 0


def test_the_state_package_exports_the_stores_and_the_protocol() -> None:
    assert arrowflow.state.__all__ == [
        "DuckDBState",
        "MemoryState",
        "ScopeInfo",
        "StateStore",
        "Store",
        "StreamInfo",
    ]
    store = arrowflow.state.DuckDBState()
    assert isinstance(store, arrowflow.state.StateStore)
    assert isinstance(store, arrowflow.state.Store)
    assert isinstance(arrowflow.state.MemoryState(), arrowflow.state.Store)
    assert (store.path, store.table, store.key, store.version) == (
        ":memory:",
        "quick_fit",
        "id",
        None,
    )
    store.close()
    memory = arrowflow.state.MemoryState()
    assert isinstance(memory, arrowflow.state.StateStore)
    assert isinstance(memory, Store)
    assert (memory.table, memory.key, memory.version) == ("quick_fit", "id", None)
    memory.close()


def test_arrowflow_exports_the_same_stores_once_it_does() -> None:
    import arrowflow as af

    exported = getattr(af, "DuckDBState", arrowflow.state.DuckDBState)
    assert exported is arrowflow.state.DuckDBState
    assert getattr(af, "MemoryState", arrowflow.state.MemoryState) is arrowflow.state.MemoryState
