"""Helpers shared by the state store tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

import arrowflow as af
from arrowflow.state import DuckDBState

__all__ = [
    "Build",
    "CountingState",
    "DuckDBState",
    "MakeStore",
    "called_keys",
    "expected_scores",
    "reader_of",
    "run",
]


class CountingState(DuckDBState):
    """A DuckDB store that counts the calls the executor makes to its state callables."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.persisted: list[int] = []
        self.loaded: list[int] = []

    def load_existing(self, skipped: pa.Table, context: Any) -> pa.Table:
        self.loaded.append(skipped.num_rows)
        return super().load_existing(skipped, context)

    def persist_each_stream(self, results: pa.Table, context: Any) -> None:
        self.persisted.append(results.num_rows)
        super().persist_each_stream(results, context)


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


MakeStore = Callable[..., CountingState]
Build = Callable[..., type[af.Agent]]
