"""Parquet in and out: read_parquet, scan_parquet, ParquetSink and run(sink=...) (DESIGN §7)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import arrowflow as af


def _evens(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(pc.bit_wise_and(table["id"], 1), 0))


def _with_double(table: pa.Table) -> pa.Table:
    return table.append_column("double", pc.multiply(table["employees"], 2))


def _write_parts(directory: Path, table: pa.Table, parts: int) -> None:
    """``table`` as ``parts`` files named in row order, each with several row groups."""
    directory.mkdir()
    size = -(-table.num_rows // parts)
    for part in range(parts):
        piece = table.slice(part * size, size)
        pq.write_table(piece, directory / f"part-{part:03d}.parquet", row_group_size=7)


def _read_all(value: Any) -> pa.Table:
    """A table from a field that may be a table or a reader."""
    if isinstance(value, pa.RecordBatchReader):
        return value.read_all()
    assert isinstance(value, pa.Table)
    return value


@pytest.fixture
def streamed_flow() -> af.Flow:
    """Keeps the even ids and adds ``double``, five rows per stream, then ends the scope."""

    @af.intelligent_streaming(5, over="companies")
    class QuickFit(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            return {"companies": _evens(context["companies"])}

    class Double(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            return {"companies": _with_double(context["companies"])}

    @af.ends_batching
    class Count(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            companies = context["companies"]
            rows = companies.num_rows if isinstance(companies, pa.Table) else None
            return {"counted": rows, "kind": type(companies).__name__}

    return QuickFit >> Double >> Count


def _expected(table: pa.Table) -> pa.Table:
    return _with_double(_evens(table))


# --------------------------------------------------------------------------- reading


def test_read_parquet_file(tmp_path, make_companies) -> None:
    table = make_companies(23)
    pq.write_table(table, tmp_path / "companies.parquet", row_group_size=5)
    assert af.read_parquet(tmp_path / "companies.parquet").equals(table)
    assert af.read_parquet(str(tmp_path / "companies.parquet")).equals(table)


def test_read_parquet_columns(tmp_path, make_companies) -> None:
    table = make_companies(10)
    pq.write_table(table, tmp_path / "companies.parquet")
    read = af.read_parquet(tmp_path / "companies.parquet", columns=["name", "id"])
    assert read.equals(table.select(["name", "id"]))


def test_read_parquet_directory(tmp_path, make_companies) -> None:
    table = make_companies(47)
    _write_parts(tmp_path / "companies", table, parts=4)
    assert af.read_parquet(tmp_path / "companies").equals(table)


def test_scan_parquet_file_is_a_lazy_reader(tmp_path, make_companies) -> None:
    table = make_companies(100)
    pq.write_table(table, tmp_path / "companies.parquet", row_group_size=30)
    reader = af.scan_parquet(tmp_path / "companies.parquet", batch_size=8)
    assert isinstance(reader, pa.RecordBatchReader)
    assert reader.schema == table.schema
    batches = list(reader)
    assert max(batch.num_rows for batch in batches) <= 8
    assert pa.Table.from_batches(batches, table.schema).equals(table)


def test_scan_parquet_reads_only_what_is_pulled(tmp_path) -> None:
    """A scan holds a few batches, not the file: what bounds memory when a scope streams it."""
    batch_rows, row_groups = 25_000, 80
    table = pa.table({"x": pa.array(range(batch_rows * row_groups), pa.float64())})
    path = tmp_path / "big.parquet"
    pq.write_table(table, path, row_group_size=batch_rows, compression="none")
    batch_bytes = batch_rows * 8
    del table

    start = pa.total_allocated_bytes()
    reader = af.scan_parquet(path, batch_size=batch_rows)
    pulled = [reader.read_next_batch(), reader.read_next_batch()]
    held = pa.total_allocated_bytes() - start
    reader.close()

    assert [batch.num_rows for batch in pulled] == [batch_rows, batch_rows]
    assert held <= 8 * batch_bytes, (
        f"{held / batch_bytes:.0f} batches in memory after pulling 2 of {row_groups}"
    )


def test_scan_parquet_columns(tmp_path, make_companies) -> None:
    table = make_companies(12)
    pq.write_table(table, tmp_path / "companies.parquet")
    reader = af.scan_parquet(tmp_path / "companies.parquet", columns=["employees"])
    assert reader.read_all().equals(table.select(["employees"]))


def test_scan_parquet_directory(tmp_path, make_companies) -> None:
    table = make_companies(47)
    _write_parts(tmp_path / "companies", table, parts=4)
    reader = af.scan_parquet(tmp_path / "companies")
    assert isinstance(reader, pa.RecordBatchReader)
    assert reader.read_all().equals(table)


@pytest.mark.parametrize("read", [af.read_parquet, af.scan_parquet])
def test_missing_path_is_an_execution_error(tmp_path, read) -> None:
    missing = tmp_path / "nowhere.parquet"
    with pytest.raises(af.ExecutionError, match=r"nowhere\.parquet"):
        read(missing)


@pytest.mark.parametrize("read", [af.read_parquet, af.scan_parquet])
def test_not_a_parquet_file_is_an_execution_error(tmp_path, read) -> None:
    path = tmp_path / "notes.parquet"
    path.write_text("these are not the rows you are looking for")
    with pytest.raises(af.ExecutionError, match=r"notes\.parquet"):
        read(path)


def test_bad_file_in_a_scanned_directory_is_an_execution_error(
    tmp_path, make_companies, streamed_flow
) -> None:
    """A directory is scanned lazily, so a bad file may only show when the run reaches it."""
    directory = tmp_path / "companies"
    _write_parts(directory, make_companies(20), parts=2)
    (directory / "part-002.parquet").write_text("truncated")
    with pytest.raises(af.ExecutionError, match=r"part-002\.parquet"):
        streamed_flow.run(companies=af.scan_parquet(directory))


@pytest.mark.parametrize("limit", [1, 3])
def test_scanned_file_streams_like_the_table(
    tmp_path, make_companies, streamed_flow, limit: int
) -> None:
    table = make_companies(103)
    pq.write_table(table, tmp_path / "companies.parquet", row_group_size=20)
    streamed_flow.agents[0].intelligent_streaming(
        5, over="companies", override=True, max_concurrency=limit
    )
    from_scan = streamed_flow.run(companies=af.scan_parquet(tmp_path / "companies.parquet"))
    from_table = streamed_flow.run(companies=af.read_parquet(tmp_path / "companies.parquet"))
    assert from_scan["companies"].equals(from_table["companies"])
    assert from_scan["companies"].equals(_expected(table))
    assert from_scan.stats[0]["total_batches"] == 21


# --------------------------------------------------------------------------- ParquetSink


def test_parquet_sink_writes_streams_in_order(tmp_path, make_companies) -> None:
    table = make_companies(30)
    sink = af.ParquetSink(tmp_path / "nested" / "out.parquet")
    for offset in range(0, 30, 7):
        sink.write(table.slice(offset, 7))
    sink.close()
    assert sink.num_rows == 30
    assert pq.read_table(tmp_path / "nested" / "out.parquet").equals(table)
    reader = sink.read_back(table.schema)
    assert isinstance(reader, pa.RecordBatchReader)
    assert reader.read_all().equals(table)


def test_parquet_sink_conforms_a_stream_with_reordered_columns(tmp_path, make_companies) -> None:
    table = make_companies(10)
    sink = af.ParquetSink(tmp_path / "out.parquet")
    sink.write(table.slice(0, 5))
    sink.write(table.slice(5).select(["employees", "name", "id"]))
    assert sink.read_back(table.schema).read_all().equals(table)


def test_parquet_sink_with_nothing_written_has_the_schema(tmp_path, make_companies) -> None:
    schema = make_companies(0).schema
    sink = af.ParquetSink(tmp_path / "out.parquet")
    reader = sink.read_back(schema)
    assert reader.schema == schema
    assert reader.read_all().num_rows == 0
    assert pq.read_schema(tmp_path / "out.parquet") == schema


# --------------------------------------------------------------------------- run(sink=...)


@pytest.mark.parametrize("limit", [1, 4])
@pytest.mark.parametrize("kind", ["str", "path", "sink"])
def test_run_with_sink_equals_run_without(
    tmp_path, make_companies, streamed_flow, kind: str, limit: int
) -> None:
    table = make_companies(52)
    path = tmp_path / "out.parquet"
    sink = {"str": str(path), "path": path, "sink": af.ParquetSink(path)}[kind]
    streamed_flow.agents[0].intelligent_streaming(
        5, over="companies", override=True, max_concurrency=limit
    )

    plain = streamed_flow.run(companies=table)
    sunk = streamed_flow.run(companies=table, sink=sink)

    assert isinstance(sunk["companies"], pa.RecordBatchReader)
    assert sunk["kind"] == "RecordBatchReader"
    assert sunk["companies"].read_all().equals(plain["companies"])
    assert pq.read_table(path).equals(_expected(table))
    columns = ["stream_num", "rows_in", "rows_out", "attempts", "status"]
    assert (
        sunk.stats[0]["streams"].select(columns).equals(plain.stats[0]["streams"].select(columns))
    )


def test_run_with_sink_over_a_scanned_file(tmp_path, make_companies, streamed_flow) -> None:
    table = make_companies(64)
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=9)
    result = streamed_flow.run(
        companies=af.scan_parquet(tmp_path / "in.parquet"), sink=tmp_path / "out.parquet"
    )
    assert result["companies"].read_all().equals(_expected(table))


def test_stream_with_sink_delivers_every_stream(tmp_path, make_companies, streamed_flow) -> None:
    table = make_companies(23)
    parts = streamed_flow.stream(companies=table, sink=tmp_path / "out.parquet")
    delivered = list(parts)
    assert [part.stream_num for part in delivered] == [1, 2, 3, 4, 5]
    assert pa.concat_tables(part.results for part in delivered).equals(_expected(table))
    assert parts.result is not None
    assert parts.result["companies"].read_all().equals(_expected(table))


def test_sink_is_only_for_the_first_scope(tmp_path, make_companies, streamed_flow) -> None:
    @af.intelligent_streaming(4, over="companies")
    class Second(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            companies = context["companies"]
            return {"companies": companies.append_column("seen", pa.array([True] * len(companies)))}

    table = make_companies(30)
    flow = streamed_flow >> Second
    result = flow.run(companies=table, sink=tmp_path / "out.parquet")
    expected = _expected(table)
    expected = expected.append_column("seen", pa.array([True] * expected.num_rows))
    assert isinstance(result["companies"], pa.Table)
    assert result["companies"].equals(expected)
    assert pq.read_table(tmp_path / "out.parquet").equals(_expected(table))


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda t: t.drop_columns(["name"]), id="missing column"),
        pytest.param(
            lambda t: t.append_column("extra", pa.array([1.5] * t.num_rows)), id="extra column"
        ),
        pytest.param(
            lambda t: t.set_column(1, "name", pa.array([[1]] * t.num_rows)),
            id="incompatible type",
        ),
    ],
)
def test_sink_schema_mismatch_names_the_file(tmp_path, make_companies, change) -> None:
    @af.intelligent_streaming(5, over="companies")
    class Drift(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            companies = context["companies"]
            if context["_batch_metadata"]["batch_number"] == 2:
                companies = change(companies)
            return {"companies": companies}

    path = tmp_path / "drift.parquet"
    with pytest.raises(af.ExecutionError, match=r"drift\.parquet"):
        af.Flow(Drift).run(companies=make_companies(15), sink=path)


def test_empty_input_writes_a_file_with_the_schema(tmp_path, make_companies, streamed_flow) -> None:
    empty = make_companies(0)
    path = tmp_path / "out.parquet"
    result = streamed_flow.run(companies=empty, sink=path)
    assert isinstance(result["companies"], pa.RecordBatchReader)
    assert result["companies"].schema == empty.schema
    assert result["companies"].read_all().num_rows == 0
    assert pq.read_schema(path) == empty.schema
    assert result.stats[0]["total_batches"] == 0


def test_streams_that_keep_no_rows_write_a_file_with_their_schema(tmp_path, make_companies) -> None:
    @af.intelligent_streaming(5, over="companies")
    class DropAll(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            companies = _with_double(context["companies"])
            return {"companies": companies.filter(pc.less(companies["id"], 0))}

    path = tmp_path / "out.parquet"
    result = af.Flow(DropAll).run(companies=make_companies(12), sink=path)
    assert result["companies"].read_all().num_rows == 0
    assert pq.read_schema(path) == _with_double(make_companies(0)).schema


def test_sink_on_failure_keeps_completed_streams(tmp_path, make_companies) -> None:
    @af.intelligent_streaming(5, over="companies")
    class FailThird(af.Agent):
        def call(self, context: Any) -> None:
            if context["_batch_metadata"]["batch_number"] == 3:
                raise RuntimeError("boom")

    table = make_companies(30)
    path = tmp_path / "out.parquet"
    with pytest.raises(af.BatchExecutionError) as exc_info:
        af.Flow(FailThird).run(companies=table, sink=path)
    assert _read_all(exc_info.value.partial_results["companies"]).equals(table.slice(0, 10))
    assert pq.read_table(path).equals(table.slice(0, 10))


@pytest.mark.parametrize("bad", [123, 4.5, ["out.parquet"], object()])
def test_bad_sink_is_a_configuration_error(make_companies, bad) -> None:
    calls: list[int] = []

    @af.intelligent_streaming(5, over="companies")
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            calls.append(1)

    with pytest.raises(af.ConfigurationError, match="sink"):
        af.Flow(Work).run(companies=make_companies(10), sink=bad)
    with pytest.raises(af.ConfigurationError, match="sink"):
        af.Flow(Work).stream(companies=make_companies(10), sink=bad)
    assert calls == []


# --------------------------------------------------------------------------- to_parquet


def test_to_parquet_round_trip(tmp_path, make_companies, streamed_flow) -> None:
    table = make_companies(37)
    result = streamed_flow.run(companies=table)
    result.to_parquet(tmp_path / "result.parquet")
    assert af.read_parquet(tmp_path / "result.parquet").equals(result["companies"])


def test_to_parquet_of_a_sunk_result(tmp_path, make_companies, streamed_flow) -> None:
    table = make_companies(37)
    result = streamed_flow.run(companies=table, sink=tmp_path / "sink.parquet")
    result.to_parquet(tmp_path / "result.parquet")
    assert af.read_parquet(tmp_path / "result.parquet").equals(_expected(table))


def test_to_parquet_field_choice(tmp_path, make_companies) -> None:
    class Two(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            return {"other": context["companies"].slice(0, 2)}

    result = af.Flow(Two).run(companies=make_companies(5))
    with pytest.raises(af.ExecutionError, match="field="):
        result.to_parquet(tmp_path / "ambiguous.parquet")
    result.to_parquet(tmp_path / "other.parquet", field="other")
    assert af.read_parquet(tmp_path / "other.parquet").equals(make_companies(2))
