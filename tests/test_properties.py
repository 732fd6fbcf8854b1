"""Invariants of streaming, checked on generated tables (DESIGN §4)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import arrowflow as af

SETTINGS = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def tables(draw: st.DrawFn) -> pa.Table:
    """Tables of 0..5,000 rows: ints, floats, strings, bools, timestamps, lists, with nulls."""
    rows = draw(st.integers(min_value=0, max_value=5_000))
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    null_rate = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    rng = np.random.default_rng(seed)

    def nulls() -> np.ndarray:
        return rng.random(rows) < null_rate

    ints = rng.integers(-1_000, 1_000, rows)
    words = [f"word-{v}" if v % 7 else "" for v in rng.integers(0, 500, rows)]
    string_mask = nulls()
    lists = [list(range(int(v))) for v in rng.integers(0, 4, rows)]
    list_mask = nulls()
    return pa.table(
        {
            "id": pa.array(np.arange(rows, dtype=np.int64)),
            "value": pa.array(ints, pa.int64(), mask=nulls()),
            "score": pa.array(rng.normal(size=rows), pa.float64(), mask=nulls()),
            "word": pa.array(
                [None if m else w for w, m in zip(words, string_mask, strict=True)], pa.string()
            ),
            "flag": pa.array(rng.random(rows) < 0.5, pa.bool_(), mask=nulls()),
            "at": pa.array(rng.integers(0, 10**12, rows), pa.timestamp("ms", tz="UTC")),
            "items": pa.array(
                [None if m else v for v, m in zip(lists, list_mask, strict=True)],
                pa.list_(pa.int64()),
            ),
        }
    )


stream_sizes = st.integers(min_value=1, max_value=6_000)


def _keep(table: pa.Table) -> pa.Table:
    """The filter: rows whose value is positive or whose word is null."""
    mask = pc.or_kleene(pc.greater(table["value"], 0), pc.is_null(table["word"]))
    return table.filter(mask)


def _add_columns(table: pa.Table) -> pa.Table:
    """The map: computed columns from a number and a string column."""
    total = pc.add(pc.multiply(table["value"], 3), 1)
    return table.append_column("total", total).append_column(
        "word_length", pc.utf8_length(table["word"])
    )


@SETTINGS
@given(table=tables(), size=stream_sizes)
def test_identity_scope_returns_the_input(table: pa.Table, size: int) -> None:
    rows_seen: list[int] = []

    @af.intelligent_streaming(size, over="data")
    class Identity(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            rows_seen.append(context["data"].num_rows)
            return {"data": context["data"]}

    class Last(af.Agent):
        def call(self, context: Any) -> None:
            return None

    result = (Identity >> Last).run(data=table)
    streams = math.ceil(table.num_rows / size)
    expected_sizes = [size] * (table.num_rows // size)
    if table.num_rows % size:
        expected_sizes.append(table.num_rows % size)
    assert rows_seen == expected_sizes
    assert result["data"].equals(table)
    assert result["data"].schema.equals(table.schema)
    assert result.stats[0]["total_batches"] == streams
    assert result.stats[0]["total_items"] == table.num_rows


@SETTINGS
@given(table=tables(), size=stream_sizes)
def test_filter_and_map_scope_equals_whole_table_compute(table: pa.Table, size: int) -> None:
    @af.intelligent_streaming(size, over="data")
    class Filter(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            return {"data": _keep(context["data"])}

    class Map(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            return {"data": _add_columns(context["data"])}

    @af.ends_batching
    class End(af.Agent):
        def call(self, context: Any) -> None:
            return None

    result = (Filter >> Map >> End).run(data=table)
    # an empty table means zero streams: the field stays the input table, untouched
    expected = _add_columns(_keep(table)) if table.num_rows else table
    assert result["data"].equals(expected)
    assert result["data"].schema.equals(expected.schema)
