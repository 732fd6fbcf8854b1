"""Helpers shared by the state store tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

import arrowflow as af
from arrowflow.state import DuckDBState, MemoryState

if TYPE_CHECKING:
    from arrowflow.state.base import StreamInfo

__all__ = [
    "STORES",
    "Build",
    "CountingMemoryState",
    "CountingState",
    "DuckDBState",
    "MakeStore",
    "MemoryState",
    "called_keys",
    "duckdb_only",
    "every_store",
    "expected_scores",
    "is_released",
    "reader_of",
    "run",
]

#: Each kind of store, by the name the ``store_kind`` parameter gives it: a new store of that
#: kind from the options both take (``table=``, ``key=``, ``version=``).
STORES: dict[str, Callable[..., DuckDBState | MemoryState]] = {
    "duckdb": DuckDBState,
    "memory": MemoryState,
}

#: A test (or, as ``pytestmark``, a module) about store behaviour: ``make_store`` gives it a
#: ``DuckDBState`` (on ``":memory:"`` and on a file when the test takes ``state_path``), then a
#: ``MemoryState``.
every_store = pytest.mark.stores(*STORES)
#: A test about DuckDB itself (SQL on the file, locks, other processes, how rows are stored):
#: ``make_store`` gives it a ``DuckDBState`` only. Modules without a ``stores`` mark are too.
duckdb_only = pytest.mark.stores("duckdb")


class _Counting:
    """Counts the loads and the persists of streams with new rows of the store below it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.persisted: list[int] = []
        self.loaded: list[int] = []

    def load(self, stream: StreamInfo, skipped: pa.Table) -> pa.Table:
        self.loaded.append(skipped.num_rows)
        loaded: pa.Table = super().load(stream, skipped)  # type: ignore[misc]
        return loaded

    def persist(self, stream: StreamInfo, results: pa.Table, processed: pa.Table) -> None:
        if processed.num_rows:
            self.persisted.append(results.num_rows)
        super().persist(stream, results, processed)  # type: ignore[misc]


class CountingState(_Counting, DuckDBState):
    """A DuckDB store that counts the loads and the persists of streams with new rows."""


class CountingMemoryState(_Counting, MemoryState):
    """A memory store that counts the loads and the persists of streams with new rows."""


def is_released(store: DuckDBState | MemoryState) -> bool:
    """Whether no run holds ``store`` any more: a DuckDB file is closed (other processes may
    open it); a ``MemoryState`` keeps what it holds, open."""
    if isinstance(store, MemoryState):
        return store.lifecycle != "running"
    return not store.is_open


def called_keys(calls: list[list[Any]]) -> list[Any]:
    """Every key the recording agent was called with, in call order."""
    return [key for call in calls for key in call]


def expected_scores(table: pa.Table, min_employees: int = 0) -> pa.Table:
    """What the scoring agent returns for ``table`` in one go."""
    kept = table.filter(pc.field("employees") >= min_employees)
    return kept.append_column("score", pc.multiply(kept["employees"], 2))


def run(agent: type[af.Agent], **fields: Any) -> af.PipelineResult:
    """Run a flow of one agent on ``fields``."""
    return af.Flow(agent).run(**fields)


def reader_of(table: pa.Table, rows_per_batch: int = 64) -> pa.RecordBatchReader:
    """``table`` as a lazy reader of small batches."""
    return pa.RecordBatchReader.from_batches(table.schema, table.to_batches(rows_per_batch))


MakeStore = Callable[..., CountingState | CountingMemoryState]
Build = Callable[..., type[af.Agent]]
