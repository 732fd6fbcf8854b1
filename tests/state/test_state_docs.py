"""The examples in the state package's docstrings run, and the package exports its names."""

from __future__ import annotations

import doctest

import pytest

import arrowflow.state
import arrowflow.state._runs
import arrowflow.state.duckdb


@pytest.mark.parametrize("module", [arrowflow.state.duckdb, arrowflow.state._runs])
def test_docstring_examples_run(module: object) -> None:
    failed, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)  # type: ignore[arg-type]
    assert tried > 0
    assert failed == 0


def test_the_state_package_exports_the_store_and_the_protocol() -> None:
    assert arrowflow.state.__all__ == ["DuckDBState", "ScopeInfo", "StateStore"]
    store = arrowflow.state.DuckDBState()
    assert isinstance(store, arrowflow.state.StateStore)
    assert (store.path, store.table, store.key, store.version) == (
        ":memory:",
        "quick_fit",
        "id",
        None,
    )
    store.close()


def test_arrowflow_exports_the_same_store_once_it_does() -> None:
    import arrowflow as af

    exported = getattr(af, "DuckDBState", arrowflow.state.DuckDBState)
    assert exported is arrowflow.state.DuckDBState
