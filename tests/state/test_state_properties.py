"""Property: with any subset of the keys done before, skip + load + process = full recompute."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import given, settings
from hypothesis import strategies as st
from state_helpers import DuckDBState

import arrowflow as af


def enrich(rows: pa.Table) -> pa.Table:
    kept = rows.filter(pc.not_equal(pc.remainder(rows["n"], 3), 0))
    return kept.append_column("double", pc.multiply(kept["n"], 2))


def scope(store: DuckDBState, size: int, seen: list[Any]) -> type[af.Agent]:
    @af.intelligent_streaming(stream_size=size, over="rows", state=store)
    class Enrich(af.Agent):
        def call(self, context: Any) -> dict[str, pa.Table]:
            seen.extend(context["rows"]["id"].to_pylist())
            return {"rows": enrich(context["rows"])}

    return Enrich


@st.composite
def inputs(draw: st.DrawFn) -> tuple[pa.Table, list[bool]]:
    ids = draw(st.permutations(range(draw(st.integers(1, 60)))))
    values = draw(st.lists(st.integers(-50, 50), min_size=len(ids), max_size=len(ids)))
    done = draw(st.lists(st.booleans(), min_size=len(ids), max_size=len(ids)))
    return pa.table({"id": pa.array(ids, pa.int64()), "n": pa.array(values, pa.int64())}), done


@settings(max_examples=60, deadline=None)
@given(case=inputs(), size_before=st.integers(1, 9), size_after=st.integers(1, 9))
def test_skip_load_process_equals_a_full_recompute(
    case: tuple[pa.Table, list[bool]], size_before: int, size_after: int
) -> None:
    table, done = case
    seen: list[Any] = []
    with DuckDBState(":memory:", table="enriched") as store:
        af.Flow(scope(store, size_before, seen)).run(rows=table.filter(pa.array(done)))
        seen.clear()

        result = af.Flow(scope(store, size_after, seen)).run(rows=table)["rows"]

    assert result.equals(enrich(table))
    ids = table["id"].to_pylist()
    assert seen == [key for key, was_done in zip(ids, done, strict=True) if not was_done]
