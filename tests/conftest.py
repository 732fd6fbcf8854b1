"""Shared fixtures: sample tables and small agents that record what they see."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pytest

import arrowflow as af


def _companies(n: int, *, start: int = 0) -> pa.Table:
    ids = list(range(start, start + n))
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "name": pa.array([f"company-{i}" for i in ids], pa.string()),
            "employees": pa.array([(i * 7) % 100 for i in ids], pa.int64()),
        }
    )


@pytest.fixture
def make_companies() -> Callable[..., pa.Table]:
    """``make_companies(n)``: a table of ``n`` companies with ids ``0..n-1`` in order."""
    return _companies


@pytest.fixture
def passthrough() -> type[af.Agent]:
    """An agent that changes nothing: lets a single agent run as a two-agent flow."""

    class Passthrough(af.Agent):
        def call(self, context: Any) -> None:
            return None

    return Passthrough


@pytest.fixture
def events() -> list[Any]:
    """A list that agents and hooks of one test append to, to check call order."""
    return []


@pytest.fixture
def stream_recorder(events: list[Any]) -> Callable[..., type[af.Agent]]:
    """``stream_recorder(size, **options)``: a trigger over ``companies`` that records each stream.

    It appends ``("trigger", batch_number, rows)`` to ``events`` and returns nothing, so every
    stream's final table is the stream's slice.
    """

    def build(size: int, *, over: str | None = "companies", **options: Any) -> type[af.Agent]:
        @af.intelligent_streaming(size, over=over, **options)
        class Trigger(af.Agent):
            def call(self, context: Any) -> None:
                meta = context["_batch_metadata"]
                events.append(
                    ("trigger", meta["batch_number"], context[meta["array_field"]].num_rows)
                )

        return Trigger

    return build


@pytest.fixture
def terminator(events: list[Any]) -> type[af.Agent]:
    """An ``ends_batching`` agent: records ``("end", rows)`` and writes ``seen``."""

    @af.ends_batching
    class End(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            rows = context["companies"].num_rows
            events.append(("end", rows))
            return {"seen": rows}

    return End
