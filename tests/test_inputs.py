"""Input and output shapes of tabular fields (DESIGN §1, §4)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

import arrowflow as af


class CStreamOnly:
    """An object that only exports the Arrow PyCapsule stream interface."""

    def __init__(self, table: pa.Table) -> None:
        self._table = table

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        return self._table.__arrow_c_stream__(requested_schema)


def _duckdb_relation(table: pa.Table) -> Any:
    con = duckdb.connect()
    con.register("source_table", table)
    return con.sql("select * from source_table order by id")


def _record_batch(table: pa.Table) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(table.to_pylist(), schema=table.schema)


SHAPES: dict[str, Callable[[pa.Table], Any]] = {
    "table": lambda t: t,
    "chunked_table": lambda t: pa.Table.from_batches(t.to_batches(max_chunksize=3), t.schema),
    "record_batch": _record_batch,
    "reader": lambda t: pa.RecordBatchReader.from_batches(t.schema, t.to_batches(max_chunksize=7)),
    "polars": pl.from_arrow,
    "pandas": lambda t: t.to_pandas(),
    "duckdb": _duckdb_relation,
    "c_stream": CStreamOnly,
    "list_of_dicts": lambda t: t.to_pylist(),
}
AUTO_DETECTED = [name for name in SHAPES if name != "list_of_dicts"]


def _run_identity(value: Any, *, size: int, over: str | None = "companies", **ctx: Any):
    """Run an identity scope over ``value``; returns (result, per-stream observations)."""
    seen: list[dict[str, Any]] = []

    @af.intelligent_streaming(size, over=over)
    class QuickFit(af.Agent):
        def call(self, context: Any) -> None:
            meta = context["_batch_metadata"]
            field = context[meta["array_field"]]
            seen.append(
                {
                    "is_table": isinstance(field, pa.Table),
                    "rows": field.num_rows,
                    "number": meta["batch_number"],
                    "total": meta["total_batches"],
                    "batch_size": meta["batch_size"],
                    "ids": field["id"].to_pylist() if "id" in field.column_names else [],
                }
            )

    class Member(af.Agent):
        def call(self, context: Any) -> None:
            return None

    result = (QuickFit >> Member).run(companies=value, **ctx)
    return result, seen


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_shape_streams(make_companies, shape: str) -> None:
    table = make_companies(25)
    result, seen = _run_identity(SHAPES[shape](table), size=10)
    assert [s["rows"] for s in seen] == [10, 10, 5]
    assert [s["batch_size"] for s in seen] == [10, 10, 5]
    assert [s["number"] for s in seen] == [1, 2, 3]
    assert all(s["is_table"] for s in seen)
    assert seen[-1]["total"] == 3
    assert [i for s in seen for i in s["ids"]] == list(range(25))
    out = result["companies"]
    assert isinstance(out, pa.Table)
    assert out.num_rows == 25
    assert out["id"].to_pylist() == list(range(25))
    assert out["name"].to_pylist() == table["name"].to_pylist()
    assert result.stats[0]["total_batches"] == 3


@pytest.mark.parametrize("shape", AUTO_DETECTED)
def test_every_arrow_shape_is_auto_detected(make_companies, shape: str) -> None:
    table = make_companies(25)
    result, seen = _run_identity(
        SHAPES[shape](table), size=10, over=None, query="tech", records=[{"a": 1}]
    )
    assert [s["rows"] for s in seen] == [10, 10, 5]
    assert result["companies"]["id"].to_pylist() == list(range(25))
    assert result["query"] == "tech"


@pytest.mark.parametrize("shape", AUTO_DETECTED)
def test_shape_returned_by_an_agent_before_the_scope(make_companies, shape: str) -> None:
    table = make_companies(25)
    sizes: list[int] = []

    class Discovery(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            return {"companies": SHAPES[shape](table)}

    @af.intelligent_streaming(10)
    class QuickFit(af.Agent):
        def call(self, context: Any) -> None:
            assert isinstance(context["companies"], pa.Table)
            sizes.append(context["companies"].num_rows)

    @af.ends_batching
    class Scoring(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            return {"is_table": isinstance(context["companies"], pa.Table)}

    result = (Discovery >> QuickFit >> Scoring).run(query="tech")
    assert sizes == [10, 10, 5]
    assert result["is_table"] is True
    assert result["companies"]["id"].to_pylist() == list(range(25))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_uneven_last_stream(make_companies, shape: str) -> None:
    result, seen = _run_identity(SHAPES[shape](make_companies(23)), size=5)
    assert [s["rows"] for s in seen] == [5, 5, 5, 5, 3]
    assert result["companies"]["id"].to_pylist() == list(range(23))


EMPTY_SHAPES: dict[str, Callable[[pa.Table], Any]] = {
    "table": lambda t: t,
    "record_batch": lambda t: pa.RecordBatch.from_pylist([], schema=t.schema),
    "reader": lambda t: pa.RecordBatchReader.from_batches(t.schema, []),
    "polars": pl.from_arrow,
    "pandas": lambda t: t.to_pandas(),
    "duckdb": _duckdb_relation,
}


@pytest.mark.parametrize("shape", list(EMPTY_SHAPES))
def test_empty_input_shapes(make_companies, shape: str) -> None:
    result, seen = _run_identity(EMPTY_SHAPES[shape](make_companies(0)), size=10)
    assert seen == []
    out = result["companies"]
    assert isinstance(out, pa.Table)
    assert out.num_rows == 0
    assert out.column_names == ["id", "name", "employees"]
    assert result.stats[0]["total_batches"] == 0
    assert result.stats[0]["streams"].num_rows == 0


def test_empty_list_with_over_is_an_empty_table() -> None:
    result, seen = _run_identity([], size=10)
    assert seen == []
    out = result["companies"]
    assert isinstance(out, pa.Table)
    assert out.num_rows == 0
    assert result.stats[0]["total_batches"] == 0


def test_list_of_dicts_without_over_is_not_tabular() -> None:
    with pytest.raises(af.ConfigurationError, match="over="):
        _run_identity([{"id": 1}, {"id": 2}], size=10, over=None)


# --------------------------------------------------------------------------- readers


def _counting_reader(table: pa.Table, batch_rows: int, pulled: list[int]) -> pa.RecordBatchReader:
    def batches() -> Iterator[pa.RecordBatch]:
        for batch in table.to_batches(max_chunksize=batch_rows):
            pulled.append(batch.num_rows)
            yield batch

    return pa.RecordBatchReader.from_batches(table.schema, batches())


def test_reader_is_consumed_lazily(make_companies) -> None:
    table = make_companies(100)
    pulled: list[int] = []
    at_call: list[tuple[int, int, int | None]] = []

    @af.intelligent_streaming(10, over="companies")
    class QuickFit(af.Agent):
        def call(self, context: Any) -> None:
            meta = context["_batch_metadata"]
            at_call.append((meta["batch_number"], len(pulled), meta["total_batches"]))

    class Member(af.Agent):
        def call(self, context: Any) -> None:
            return None

    result = (QuickFit >> Member).run(companies=_counting_reader(table, 10, pulled))
    assert [n for n, _, _ in at_call] == list(range(1, 11))
    assert at_call[0][1] < 10, "the whole reader was read before the first stream ran"
    assert all(total in (None, 10) for _, _, total in at_call)
    assert at_call[-1][2] == 10
    assert len(pulled) == 10
    out = result["companies"]
    assert isinstance(out, pa.Table)
    assert out.equals(table)
    assert result.stats[0]["total_batches"] == 10


def test_reader_batches_are_recut_to_stream_size(make_companies) -> None:
    table = make_companies(50)
    pulled: list[int] = []
    result, seen = _run_identity(_counting_reader(table, 7, pulled), size=10)
    assert [s["rows"] for s in seen] == [10, 10, 10, 10, 10]
    assert [s["number"] for s in seen] == [1, 2, 3, 4, 5]
    assert seen[-1]["total"] == 5
    assert result["companies"].equals(table)


def test_reader_with_empty_and_uneven_batches(make_companies) -> None:
    table = make_companies(20)
    schema = table.schema
    batches = [
        table.slice(0, 0).to_batches() or [pa.RecordBatch.from_pylist([], schema=schema)],
        table.slice(0, 7).to_batches(),
        [pa.RecordBatch.from_pylist([], schema=schema)],
        table.slice(7, 7).to_batches(),
        table.slice(14, 6).to_batches(),
    ]
    reader = pa.RecordBatchReader.from_batches(schema, [b for part in batches for b in part])
    result, seen = _run_identity(reader, size=10)
    assert [s["rows"] for s in seen] == [10, 10]
    assert seen[-1]["total"] == 2
    assert result["companies"].equals(table)


def test_reader_hooks_know_total_at_the_end(make_companies) -> None:
    totals: list[tuple[int, int | None]] = []

    @af.intelligent_streaming(
        10,
        over="companies",
        incremental=True,
        on_stream_complete=lambda k, total, results: totals.append((k, total)),
    )
    class QuickFit(af.Agent):
        def call(self, context: Any) -> None:
            return None

    class Member(af.Agent):
        def call(self, context: Any) -> None:
            return None

    (QuickFit >> Member).run(companies=_counting_reader(make_companies(30), 10, []))
    assert [k for k, _ in totals] == [1, 2, 3]
    assert all(total in (None, 3) for _, total in totals)
    assert totals[-1] == (3, 3)


def test_reader_failure_partial_results(make_companies) -> None:
    @af.intelligent_streaming(10, over="companies")
    class QuickFit(af.Agent):
        def call(self, context: Any) -> None:
            if context["_batch_metadata"]["batch_number"] == 3:
                raise RuntimeError("stream three")

    class Member(af.Agent):
        def call(self, context: Any) -> None:
            return None

    table = make_companies(50)
    with pytest.raises(af.BatchExecutionError) as exc_info:
        (QuickFit >> Member).run(companies=_counting_reader(table, 10, []))
    assert exc_info.value.batch_number == 3
    assert exc_info.value.partial_results["companies"].equals(table.slice(0, 20))


# --------------------------------------------------------------------------- outputs


OUTPUT_SHAPES: dict[str, Callable[[pa.Table], Any]] = {
    "table": lambda t: t,
    "record_batch": lambda t: t.combine_chunks().to_batches()[0],
    "polars": pl.from_arrow,
    "pandas": lambda t: t.to_pandas(),
    "c_stream": CStreamOnly,
}


@pytest.mark.parametrize("shape", list(OUTPUT_SHAPES))
def test_agent_may_return_any_arrow_shape(make_companies, shape: str) -> None:
    convert = OUTPUT_SHAPES[shape]

    @af.intelligent_streaming(10, over="companies")
    class QuickFit(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            companies = context["companies"]
            return {"companies": convert(companies.select(["id", "name"]))}

    class Member(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            companies = context["companies"]
            assert isinstance(companies, pa.Table)
            return {"rows": companies.num_rows}

    result = (QuickFit >> Member).run(companies=make_companies(25))
    out = result["companies"]
    assert isinstance(out, pa.Table)
    assert out.column_names == ["id", "name"]
    assert out["id"].to_pylist() == list(range(25))
    assert result["rows"] == [10, 10, 5]


def test_results_expose_arrow(make_companies) -> None:
    result, _ = _run_identity(make_companies(25), size=10)
    companies = result["companies"]
    frame = pl.from_arrow(companies)
    assert isinstance(frame, pl.DataFrame)
    assert frame.shape == (25, 3)
    assert frame["id"].to_list() == list(range(25))
    assert duckdb.sql("select count(*), sum(id) from companies").fetchall() == [(25, 300)]
    assert pa.table(companies).equals(make_companies(25))
    assert isinstance(companies.to_pandas(), pd.DataFrame)


def test_streams_and_merge_do_not_copy(make_companies) -> None:
    table = make_companies(25).combine_chunks()
    base = table["id"].chunks[0].buffers()[1].address
    seen: list[tuple[int, int]] = []

    @af.intelligent_streaming(10, over="companies")
    class QuickFit(af.Agent):
        def call(self, context: Any) -> None:
            for chunk in context["companies"]["id"].chunks:
                seen.append((chunk.buffers()[1].address, chunk.offset))

    class Member(af.Agent):
        def call(self, context: Any) -> None:
            return None

    result = (QuickFit >> Member).run(companies=table)
    assert seen == [(base, 0), (base, 10), (base, 20)]
    merged = result["companies"]["id"].chunks
    assert {chunk.buffers()[1].address for chunk in merged} == {base}
