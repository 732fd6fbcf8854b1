"""Fixtures of the state store tests: stores closed after each test, a recording agent."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from state_helpers import CountingState

import arrowflow as af


@pytest.fixture(params=["memory", "file"])
def state_path(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store path: ``":memory:"``, then a file."""
    return ":memory:" if request.param == "memory" else str(tmp_path / "state.duckdb")


@pytest.fixture
def make_store() -> Iterator[Callable[..., CountingState]]:
    """``make_store(path=":memory:", **options)``: a counting DuckDB store, closed afterwards."""
    stores: list[CountingState] = []

    def build(path: Any = ":memory:", **options: Any) -> CountingState:
        store = CountingState(path, **options)
        stores.append(store)
        return store

    yield build
    for store in stores:
        store.close()


@pytest.fixture
def calls() -> list[list[Any]]:
    """The keys each call of a recording agent received, one list per call."""
    return []


@pytest.fixture
def scoring_agent(calls: list[list[Any]]) -> Callable[..., type[af.Agent]]:
    """``scoring_agent(store, size, **options)``: a trigger that records, filters and scores.

    Each call appends the stream's keys to ``calls``, fails on the stream numbers in
    ``fail_streams``, keeps the rows with ``employees >= min_employees`` and adds
    ``score = employees * 2``. ``rename`` gives the agent another class name.
    """

    def build(
        store: Any,
        size: int = 100,
        *,
        over: str = "companies",
        key_column: str = "id",
        min_employees: int = 0,
        fail_streams: tuple[int, ...] = (),
        rename: str | None = None,
        **options: Any,
    ) -> type[af.Agent]:
        @af.intelligent_streaming(stream_size=size, over=over, state=store, **options)
        class QuickFit(af.Agent):
            def call(self, context: Any) -> dict[str, pa.Table]:
                rows = context[over]
                calls.append(rows[key_column].to_pylist())
                stream = context["_batch_metadata"]["batch_number"]
                if stream in fail_streams:
                    raise RuntimeError(f"boom in stream {stream}")
                kept = rows.filter(pc.field("employees") >= min_employees)
                return {over: kept.append_column("score", pc.multiply(kept["employees"], 2))}

        if rename is not None:
            return type(rename, (QuickFit,), {})
        return QuickFit

    return build
