"""Parquet in and out: read_parquet, scan_parquet, ParquetSink and run(sink=...) (DESIGN §7)."""

from __future__ import annotations

import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import arrowflow as af
from arrowflow._row_counts import carry_num_rows, known_num_rows
from arrowflow._slicing import StreamCutter


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


@pytest.mark.parametrize("read_first", [True, False], ids=["read, close", "close, read"])
def test_parquet_sink_with_nothing_written_has_the_schema(
    tmp_path, make_companies, read_first: bool
) -> None:
    schema = make_companies(0).schema
    sink = af.ParquetSink(tmp_path / "out.parquet")
    if read_first:
        reader = sink.read_back(schema)
        sink.close()
    else:
        sink.close()
        reader = sink.read_back(schema)
    assert reader.schema == schema
    assert reader.read_all().num_rows == 0
    assert pq.read_schema(tmp_path / "out.parquet") == schema
    assert not sink.partial_path.exists()


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
    # Kept, but never under the name of a complete output.
    assert not path.exists()
    assert pq.read_table(tmp_path / "out.parquet.partial").equals(table.slice(0, 10))


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


# --------------------------------------------------------------------------- known row counts


def _corrupt_data_pages(path: Path) -> None:
    """Overwrite every byte between the leading magic and the footer: only the footer is left."""
    data = bytearray(path.read_bytes())
    footer_length = int.from_bytes(data[-8:-4], "little")
    data_end = len(data) - 8 - footer_length
    data[4:data_end] = b"\xff" * (data_end - 4)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("layout", ["file", "directory"])
def test_scan_parquet_knows_its_row_count_before_reading(
    tmp_path, make_companies, layout: str
) -> None:
    table = make_companies(47)
    if layout == "file":
        path = tmp_path / "companies.parquet"
        pq.write_table(table, path, row_group_size=7)
    else:
        path = tmp_path / "companies"
        _write_parts(path, table, parts=4)
    reader = af.scan_parquet(path, columns=["id"], batch_size=10)
    assert known_num_rows(reader) == 47
    assert StreamCutter(reader, 5).total == 10
    first = reader.read_next_batch()
    assert known_num_rows(reader) == 47 - first.num_rows


def test_scan_parquet_reads_only_the_footers(tmp_path, make_companies) -> None:
    """The data pages are garbage: the count and the total still come out right, so the scan
    never read them."""
    path = tmp_path / "companies.parquet"
    pq.write_table(make_companies(1000), path, row_group_size=100, compression="none")
    _corrupt_data_pages(path)

    reader = af.scan_parquet(path)
    assert known_num_rows(reader) == 1000
    assert StreamCutter(reader, 300).total == 4
    with pytest.raises((OSError, pa.ArrowException)):
        reader.read_next_batch()


def _recording_flow(
    size: int, seen: list[tuple[str, int, int | None]], max_concurrency: int = 1
) -> af.Flow:
    """Records ``(where, stream, total)`` from ``on_stream_start`` and ``_batch_metadata``."""

    @af.intelligent_streaming(
        size,
        over="companies",
        max_concurrency=max_concurrency,
        on_stream_start=lambda k, total, context: seen.append(("hook", k, total)),
    )
    class Record(af.Agent):
        def call(self, context: Any) -> None:
            meta = context["_batch_metadata"]
            seen.append(("agent", meta["batch_number"], meta["total_batches"]))

    return af.Flow(Record)


@pytest.mark.parametrize("limit", [1, 3])
@pytest.mark.parametrize("layout", ["file", "directory"])
def test_scanned_input_has_its_total_from_the_first_stream(
    tmp_path, make_companies, layout: str, limit: int
) -> None:
    table = make_companies(47)
    if layout == "file":
        path = tmp_path / "companies.parquet"
        pq.write_table(table, path, row_group_size=7)
    else:
        path = tmp_path / "companies"
        _write_parts(path, table, parts=4)
    seen: list[tuple[str, int, int | None]] = []
    flow = _recording_flow(5, seen, max_concurrency=limit)

    result = flow.run(companies=af.scan_parquet(path, batch_size=8))

    assert ("hook", 1, 10) in seen
    assert ("agent", 1, 10) in seen
    expected = [(where, k, 10) for where in ("agent", "hook") for k in range(1, 11)]
    assert sorted(seen) == sorted(expected)
    assert result.stats[0]["total_batches"] == 10


def test_progress_bar_has_the_total_of_a_scan_from_the_start(
    tmp_path, make_companies, monkeypatch
) -> None:
    import arrowflow.progress

    totals: list[tuple[str, int | None]] = []

    class Bar:
        def __init__(self, description: str, total: int | None) -> None:
            totals.append(("open", total))

        def update(self, rows_in: int, failed: bool, total: int | None) -> None:
            totals.append(("update", total))

        def close(self) -> None:
            pass

    monkeypatch.setattr(arrowflow.progress, "ProgressBar", Bar)
    pq.write_table(make_companies(23), tmp_path / "companies.parquet", row_group_size=4)
    seen: list[tuple[str, int, int | None]] = []
    _recording_flow(5, seen).run(
        companies=af.scan_parquet(tmp_path / "companies.parquet"), progress=True
    )
    assert totals == [("open", 5)] + [("update", 5)] * 5


@pytest.mark.parametrize(
    ("rows_then", "rows_now", "totals"),
    [
        pytest.param(20, 32, [4, 4, 4, None, None, None, 7], id="more rows"),
        pytest.param(20, 12, [4, 4, 3], id="fewer rows"),
        pytest.param(0, 7, [None, 2], id="was empty"),
        pytest.param(9, 0, [], id="now empty"),
    ],
)
def test_a_file_changed_after_the_scan_corrects_the_total(
    tmp_path, make_companies, rows_then: int, rows_now: int, totals: list[int | None]
) -> None:
    """The footer's count is announced; once more rows than that arrive, ``total`` is unknown
    (never smaller than a stream's number), and it is the true count once the end is in sight."""
    path = tmp_path / "companies.parquet"
    pq.write_table(make_companies(rows_then), path)
    reader = af.scan_parquet(path, batch_size=3)
    pq.write_table(make_companies(rows_now), path)
    seen: list[tuple[str, int, int | None]] = []

    result = _recording_flow(5, seen).run(companies=reader)

    assert [total for where, _, total in seen if where == "agent"] == totals
    assert result.stats[0]["total_batches"] == len(totals)


def test_a_partly_read_scan_announces_what_is_left(tmp_path, make_companies) -> None:
    table = make_companies(40)
    pq.write_table(table, tmp_path / "companies.parquet")
    reader = af.scan_parquet(tmp_path / "companies.parquet", batch_size=10)
    reader.read_next_batch()
    seen: list[tuple[str, int, int | None]] = []
    result = _recording_flow(5, seen).run(companies=reader)
    assert [total for where, _, total in seen if where == "agent"] == [6] * 6
    assert result.stats[0]["total_batches"] == 6


def test_a_wrapping_reader_carries_the_row_count(tmp_path, make_companies) -> None:
    """What code that wraps a reader (converting its batches) does to keep the count."""
    pq.write_table(make_companies(30), tmp_path / "companies.parquet")
    source = af.scan_parquet(tmp_path / "companies.parquet", batch_size=10)
    plain = pa.RecordBatchReader.from_batches(source.schema, source)
    assert known_num_rows(plain) is None
    wrapper = pa.RecordBatchReader.from_batches(source.schema, iter(source))
    carry_num_rows(source, wrapper)
    assert known_num_rows(wrapper) == 30
    wrapper.read_next_batch()
    assert known_num_rows(wrapper) == known_num_rows(source) == 20
    assert StreamCutter(wrapper, 5).total == 4


# --------------------------------------------------------------------------- ParquetSink outcome


def _sink_with_rows(path: Path, table: pa.Table) -> af.ParquetSink:
    sink = af.ParquetSink(path)
    for offset in range(0, table.num_rows, 7):
        sink.write(table.slice(offset, 7))
    return sink


def test_parquet_sink_writes_a_partial_file_and_publishes_it_on_close(
    tmp_path, make_companies
) -> None:
    table = make_companies(30)
    path = tmp_path / "out.parquet"
    sink = _sink_with_rows(path, table)
    assert sink.partial_path == tmp_path / "out.parquet.partial"
    assert sink.partial_path.exists()
    assert not path.exists()

    sink.close()

    assert pq.read_table(path).equals(table)
    assert not sink.partial_path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet"]
    sink.close()
    sink.abort()
    assert pq.read_table(path).equals(table)
    assert sink.read_back(table.schema).read_all().equals(table)


def test_parquet_sink_abort_keeps_only_a_readable_partial_file(tmp_path, make_companies) -> None:
    table = make_companies(30)
    path = tmp_path / "out.parquet"
    sink = _sink_with_rows(path, table)

    sink.abort()

    assert not path.exists()
    assert pq.read_table(sink.partial_path).equals(table)
    assert sink.read_back(table.schema).read_all().equals(table)
    sink.abort()
    sink.close()
    assert not path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet.partial"]
    with pytest.raises(af.ExecutionError, match="aborted"):
        sink.write(table)


def test_parquet_sink_abort_leaves_a_previous_file_untouched(tmp_path, make_companies) -> None:
    path = tmp_path / "out.parquet"
    pq.write_table(make_companies(5), path)
    before = path.read_bytes()
    sink = _sink_with_rows(path, make_companies(30))
    sink.abort()
    assert path.read_bytes() == before
    assert pq.read_table(sink.partial_path).equals(make_companies(30))


def test_parquet_sink_read_back_before_the_outcome_follows_the_file(
    tmp_path, make_companies
) -> None:
    """read_back does not decide where the file ends up: its reader finds it there."""
    table = make_companies(30)
    closed = _sink_with_rows(tmp_path / "closed.parquet", table)
    aborted = _sink_with_rows(tmp_path / "aborted.parquet", table)
    from_closed, from_aborted = closed.read_back(table.schema), aborted.read_back(table.schema)
    assert known_num_rows(from_closed) == 30
    closed.close()
    aborted.abort()
    assert from_closed.read_all().equals(table)
    assert from_aborted.read_all().equals(table)
    assert (tmp_path / "closed.parquet").exists()
    assert not (tmp_path / "aborted.parquet").exists()


@pytest.mark.parametrize("rows", [30, 0], ids=["written", "nothing written"])
def test_parquet_sink_close_replaces_a_stale_partial_file(
    tmp_path, make_companies, rows: int
) -> None:
    path = tmp_path / "out.parquet"
    stale = tmp_path / "out.parquet.partial"
    stale.write_text("left by a run killed earlier")
    sink = _sink_with_rows(path, make_companies(rows))
    sink.close()
    assert not stale.exists()
    if rows:
        assert pq.read_table(path).equals(make_companies(rows))


def test_parquet_sink_that_failed_to_write_is_not_published(
    tmp_path, make_companies, monkeypatch
) -> None:
    table = make_companies(20)
    path = tmp_path / "out.parquet"
    write_table = pq.ParquetWriter.write_table
    calls: list[int] = []

    def fail_second(writer: pq.ParquetWriter, piece: pa.Table, *args: Any, **kw: Any) -> None:
        calls.append(piece.num_rows)
        if len(calls) > 1:
            raise OSError("disk full")
        write_table(writer, piece, *args, **kw)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", fail_second)
    sink = af.ParquetSink(path)
    sink.write(table.slice(0, 10))
    sink.write(table.slice(10))
    with pytest.raises(af.ExecutionError, match="disk full"):
        sink.close()
    assert not path.exists()
    assert pq.read_table(sink.partial_path).equals(table.slice(0, 10))
    sink.abort()
    sink.close()
    assert not path.exists()


_KILLED_RUN = """
import sys

import pyarrow as pa

import arrowflow as af


@af.intelligent_streaming(10, over="rows")
class Work(af.Agent):
    def call(self, context):
        if context["_batch_metadata"]["batch_number"] == 3:
            print("two streams written", flush=True)
            sys.stdin.read()  # until killed


af.Flow(Work).run(rows=pa.table({"id": range(50)}), sink=sys.argv[1])
"""


def test_a_killed_run_leaves_no_complete_looking_output(tmp_path) -> None:
    script = tmp_path / "killed_run.py"
    script.write_text(_KILLED_RUN)
    path = tmp_path / "out.parquet"
    process = subprocess.Popen(
        [sys.executable, str(script), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 60)
        assert ready, "the run did not reach its third stream within a minute"
        line = process.stdout.readline()
        assert line == "two streams written\n", process.stderr.read() if process.stderr else ""
        process.kill()
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
    assert not path.exists()
    assert (tmp_path / "out.parquet.partial").exists()


def test_a_sink_without_abort_is_refused_before_any_agent_runs(make_companies) -> None:
    calls: list[int] = []

    class OldSink:
        def write(self, table: pa.Table) -> None: ...

        def close(self) -> None: ...

        def read_back(self, schema: pa.Schema) -> pa.RecordBatchReader:
            return pa.RecordBatchReader.from_batches(schema, [])

    @af.intelligent_streaming(5, over="companies")
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            calls.append(1)

    with pytest.raises(af.ConfigurationError, match="OldSink lacks abort"):
        af.Flow(Work).run(companies=make_companies(15), sink=OldSink())
    assert calls == []


# --------------------------------------------------------------------------- filters, filesystems


def test_filter_must_be_an_expression(tmp_path, make_companies) -> None:
    pq.write_table(make_companies(5), tmp_path / "in.parquet")
    for read in (af.scan_parquet, af.read_parquet):
        with pytest.raises(af.ConfigurationError, match=r"pc\.field"):
            read(tmp_path / "in.parquet", filter=[("id", ">", 2)])


def test_a_filter_on_a_missing_column_is_an_execution_error(tmp_path, make_companies) -> None:
    pq.write_table(make_companies(5), tmp_path / "in.parquet")
    with pytest.raises(af.ExecutionError, match=r"in\.parquet"):
        af.scan_parquet(tmp_path / "in.parquet", filter=pc.field("nowhere") > 1).read_all()


@pytest.mark.parametrize(
    ("path", "options", "message"),
    [
        pytest.param("s3://bucket/in.parquet", "local", "URI and filesystem=", id="uri and fs"),
        pytest.param("in.parquet", "fsspec", "FSSpecHandler", id="not a pyarrow filesystem"),
        pytest.param("nosuch://bucket/in.parquet", None, "URI, or filesystem=", id="scheme"),
    ],
)
def test_a_place_that_cannot_be_opened_is_a_configuration_error(
    path: str, options: str | None, message: str
) -> None:
    filesystem = {"local": pafs.LocalFileSystem(), "fsspec": object(), None: None}[options]
    for open_ in (af.scan_parquet, af.read_parquet, af.ParquetSink):
        with pytest.raises(af.ConfigurationError, match=message):
            open_(path, filesystem=filesystem)


def test_a_file_with_other_columns_is_named_when_the_scan_reaches_it(
    tmp_path, make_companies
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(make_companies(5), folder / "a.parquet")
    pq.write_table(make_companies(5).drop_columns(["name"]), folder / "b.parquet")
    reader = af.scan_parquet(folder, batch_size=5)
    assert reader.read_next_batch().num_rows == 5
    with pytest.raises(af.ExecutionError, match=r"b\.parquet.*first file's schema"):
        reader.read_next_batch()
    # The columns selected are what must match.
    assert af.scan_parquet(folder, columns=["id"]).read_all().num_rows == 10


# --------------------------------------------------------------------------- partitioned sink


def _scan_sorted(path: Path, schema: pa.Schema) -> pa.Table:
    return af.scan_parquet(path).read_all().select(schema.names).sort_by("id")


def test_partition_values_are_escaped_and_nulls_kept(tmp_path) -> None:
    table = pa.table(
        {
            "id": pa.array(range(6), pa.int64()),
            "region": pa.array(["a/b", "c d", None, "a/b", "é", None]).dictionary_encode(),
        }
    )
    sink = af.ParquetSink(tmp_path / "out", partition_by="region")
    sink.write(table.slice(0, 4))
    sink.write(table.slice(4))
    sink.close()
    directories = sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir())
    assert directories == [
        "region=%C3%A9",
        "region=__HIVE_DEFAULT_PARTITION__",
        "region=a%2Fb",
        "region=c%20d",
    ]
    assert sink.read_back(table.schema).read_all().sort_by("id").equals(table)
    scanned = _scan_sorted(tmp_path / "out", table.schema)
    assert scanned["region"].to_pylist() == table["region"].to_pylist()


def test_a_partition_goes_on_in_a_new_file_past_the_open_file_limit(
    tmp_path, make_companies, monkeypatch
) -> None:
    import arrowflow._datasets

    monkeypatch.setattr(arrowflow._datasets, "MAX_OPEN_FILES", 2)
    table = make_companies(30).append_column("group", pa.array([i % 3 for i in range(30)]))
    sink = af.ParquetSink(tmp_path / "out", partition_by=["group"])
    for offset in range(0, 30, 6):
        sink.write(table.slice(offset, 6))
    sink.close()
    files = sorted((tmp_path / "out").rglob("*.parquet"))
    assert len(files) > 3  # three partitions, two files open at most
    for file in files:
        ids = pq.read_table(file)["id"].to_pylist()
        assert ids == sorted(ids)
    scanned = _scan_sorted(tmp_path / "out", table.schema)
    assert scanned.equals(table.cast(scanned.schema))


def test_a_dataset_sink_with_nothing_written(tmp_path, make_companies) -> None:
    schema = make_companies(0).schema
    partitioned = af.ParquetSink(tmp_path / "partitioned", partition_by=["name"])
    assert partitioned.read_back(schema).read_all().num_rows == 0
    partitioned.close()
    assert sorted(p.name for p in (tmp_path / "partitioned").iterdir()) == ["_SUCCESS"]

    split = af.ParquetSink(tmp_path / "split", max_rows_per_file=10)
    split.close()
    assert split.read_back(schema).read_all().num_rows == 0
    assert pq.read_schema(tmp_path / "split" / "part-00000.parquet") == schema


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"partition_by": ["nowhere"]}, af.ExecutionError, "'nowhere': no such column"),
        ({"partition_by": ["id", "name", "employees"]}, af.ExecutionError, "every column"),
        ({"max_rows_per_file": 0}, af.ConfigurationError, "positive number"),
        ({"max_rows_per_file": 2.5}, af.ConfigurationError, "positive number"),
    ],
)
def test_bad_dataset_options(tmp_path, make_companies, options, error, message) -> None:
    with pytest.raises(error, match=message):
        af.Flow(_identity_scope()).run(
            companies=make_companies(10), sink=af.ParquetSink(tmp_path / "out", **options)
        )
    assert not (tmp_path / "out").exists()


def _identity_scope() -> type[af.Agent]:
    @af.intelligent_streaming(5, over="companies")
    class Identity(af.Agent):
        def call(self, context: Any) -> None:
            return None

    return Identity


def test_a_partitioned_sink_writes_in_bounded_memory(tmp_path) -> None:
    """Streams go to their files as they come: what the sink holds does not grow with them."""
    stream_rows = 20_000
    stream = pa.table(
        {
            "x": pa.array(range(stream_rows), pa.float64()),
            "part": pa.array([i % 4 for i in range(stream_rows)], pa.int64()),
        }
    )
    stream_bytes = stream.nbytes
    sink = af.ParquetSink(tmp_path / "out", partition_by=["part"], compression="none")
    start = pa.total_allocated_bytes()
    held = []
    for number in range(40):
        sink.write(stream)
        if number in (4, 39):
            held.append(pa.total_allocated_bytes() - start)
    sink.close()
    assert held[1] - held[0] <= 2 * stream_bytes, [h / stream_bytes for h in held]
    assert sink.read_back(stream.schema).read_all().num_rows == 40 * stream_rows
