"""Lazy inputs stay lazy (DESIGN §7): a DuckDB relation, a polars ``LazyFrame``, a
``pyarrow.dataset.Dataset`` and a ``RecordBatchReader`` are read stream by stream.

Each input streamed through a scope gives what its materialised table gives, in order, with
``total_batches`` known up front only where metadata tells it (DESIGN §4). Laziness is shown,
not assumed: a 20,000,000-row DuckDB query and a polars scan of a Parquet dataset of several
million rows are streamed in a child process of their own, whose resident memory (RSS) is
sampled every millisecond. RSS rather than Arrow's memory pool, because DuckDB and polars
allocate the Arrow data they export themselves: ``pa.total_allocated_bytes()`` stays at 0 for
both, even while a 20,000,000-row query is collected whole. The same child collects the same
input whole first, to show that the bound would catch it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import arrowflow as af
from arrowflow._row_counts import known_column, known_num_rows
from arrowflow._tabular import MAX_BATCH_ROWS, MIN_BATCH_ROWS, to_table, to_table_or_reader

ROWS = 30_000
# Below MIN_BATCH_ROWS, so batches and streams do not line up: streams are cut across batches.
SIZE = 7_000
STREAMS = -(-ROWS // SIZE)  # 5, the last one of 2,000 rows


def _companies(n: int) -> pa.Table:
    ids = pa.array(range(n), pa.int64())
    return pa.table(
        {
            "id": ids,
            "name": pa.array([f"company-{i}" for i in range(n)], pa.string()),
            "employees": pa.array([(i * 7) % 100 for i in range(n)], pa.int64()),
        }
    )


def _write_parts(table: pa.Table, directory: Path, parts: int = 3) -> Path:
    """``table`` as ``parts`` Parquet files whose names sort in row order."""
    directory.mkdir(parents=True, exist_ok=True)
    step = max(-(-table.num_rows // parts), 1)
    for part in range(parts):
        pq.write_table(table.slice(part * step, step), directory / f"part-{part}.parquet")
    return directory


def _duckdb(table: pa.Table, tmp_path: Path) -> Any:
    con = duckdb.connect()
    con.register("companies_table", table)
    return con.sql("select * from companies_table order by id")


def _polars_scan(table: pa.Table, tmp_path: Path) -> pl.LazyFrame:
    directory = _write_parts(table, tmp_path / "polars")
    return pl.scan_parquet(sorted(directory.glob("*.parquet")))


def _parquet_dataset(table: pa.Table, tmp_path: Path) -> ds.Dataset:
    return ds.dataset(_write_parts(table, tmp_path / "dataset"), format="parquet")


def _filtered_dataset(table: pa.Table, tmp_path: Path) -> ds.Dataset:
    # Keeps every row, but a filtered dataset cannot tell its rows without reading them.
    return _parquet_dataset(table, tmp_path).filter(ds.field("id") >= 0)


LAZY: dict[str, Callable[[pa.Table, Path], Any]] = {
    "duckdb": _duckdb,
    "polars_lazy": lambda table, _: pl.from_arrow(table).lazy(),
    "polars_scan": _polars_scan,
    "dataset_memory": lambda table, _: ds.dataset(table),
    "dataset_parquet": _parquet_dataset,
    "dataset_filtered": _filtered_dataset,
    "reader": lambda table, _: pa.RecordBatchReader.from_batches(
        table.schema, table.to_batches(max_chunksize=4_096)
    ),
}
# Inputs whose row count is known up front: metadata tells it for free (an in-memory dataset,
# Parquet footers).
COUNTED = {"dataset_memory", "dataset_parquet"}


def _same_rows(result: pa.Table, table: pa.Table) -> bool:
    """Equal values in equal order; polars hands strings out as ``large_string``."""
    return result.cast(table.schema).equals(table)


def _run(value: Any, size: int = SIZE, **options: Any) -> tuple[Any, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    @af.intelligent_streaming(size, over="companies", **options)
    class Trigger(af.Agent):
        def call(self, context: Any) -> None:
            meta = context["_batch_metadata"]
            rows = context["companies"]
            assert isinstance(rows, pa.Table)
            seen.append(
                {
                    "number": meta["batch_number"],
                    "total": meta["total_batches"],
                    "rows": rows.num_rows,
                    "first": rows["id"][0].as_py(),
                    "schema": rows.schema,
                }
            )

    return af.Flow(Trigger).run(companies=value, progress=False), seen


# --------------------------------------------------------------------------- same result


@pytest.mark.parametrize("shape", list(LAZY))
def test_streams_like_the_materialised_table(shape: str, tmp_path: Path) -> None:
    table = _companies(ROWS)
    expected = to_table(LAZY[shape](table, tmp_path / "whole"))
    assert _same_rows(expected, table)

    result, seen = _run(LAZY[shape](table, tmp_path / "streamed"))

    assert [s["number"] for s in seen] == list(range(1, STREAMS + 1))
    assert [s["rows"] for s in seen] == [SIZE] * (STREAMS - 1) + [ROWS - SIZE * (STREAMS - 1)]
    assert [s["first"] for s in seen] == list(range(0, ROWS, SIZE))
    totals = [s["total"] for s in seen]
    if shape in COUNTED:
        assert totals == [STREAMS] * STREAMS
    else:
        assert totals[0] is None, "the rows were counted (or read) before the first stream"
        assert set(totals) <= {None, STREAMS}
        assert totals[-1] == STREAMS
    out = result["companies"]
    assert isinstance(out, pa.Table)
    assert out.equals(expected)
    assert result.stats[0]["total_batches"] == STREAMS


@pytest.mark.parametrize("shape", list(LAZY))
def test_hooks_and_stats_see_every_stream(shape: str, tmp_path: Path) -> None:
    started: list[tuple[int, int]] = []

    def on_start(stream_num: int, total: int | None, context: Any) -> None:
        started.append((stream_num, context["companies"].num_rows))

    result, _ = _run(LAZY[shape](_companies(ROWS), tmp_path), on_stream_start=on_start)

    assert started == [(k, SIZE) for k in range(1, STREAMS)] + [(STREAMS, ROWS % SIZE)]
    stats = result.stats[0]
    assert sum(stats["streams"]["rows_in"].to_pylist()) == ROWS
    assert stats["total_items"] == ROWS


@pytest.mark.parametrize("shape", list(LAZY))
def test_empty_lazy_input_means_zero_streams(shape: str, tmp_path: Path) -> None:
    result, seen = _run(LAZY[shape](_companies(0), tmp_path))
    assert seen == []
    out = result["companies"]
    assert isinstance(out, pa.Table)
    assert out.num_rows == 0
    assert out.column_names == ["id", "name", "employees"]
    assert result.stats[0]["total_batches"] == 0


def test_duckdb_query_streams_with_its_row_count_unknown() -> None:
    """A query of the issue's shape, smaller: every row once, in order, stats add up."""
    con = duckdb.connect()
    rows = 100_003
    relation = con.sql(f"select range as id, range * 2 as x from range({rows})")
    started: list[int] = []
    result, seen = _run(
        relation, size=10_000, on_stream_start=lambda k, total, context: started.append(k)
    )
    assert started == list(range(1, 12))
    assert [s["rows"] for s in seen] == [10_000] * 10 + [3]
    assert seen[0]["total"] is None
    assert seen[-1]["total"] == 11
    assert result["companies"]["x"].to_pylist() == [2 * i for i in range(rows)]
    assert sum(result.stats[0]["streams"]["rows_in"].to_pylist()) == rows


def test_lazy_readers_ask_for_batches_of_about_a_stream(tmp_path: Path) -> None:
    table = _companies(ROWS)
    small = to_table_or_reader(LAZY["dataset_memory"](table, tmp_path), 10)
    assert {batch.num_rows for batch in small} <= {MIN_BATCH_ROWS, ROWS % MIN_BATCH_ROWS}
    large = _companies(3 * MAX_BATCH_ROWS)
    big = to_table_or_reader(ds.dataset(large), 10 * MAX_BATCH_ROWS)
    assert max(batch.num_rows for batch in big) == MAX_BATCH_ROWS


# --------------------------------------------------------------------------- conversions


def test_view_types_are_normalised_as_they_come_in() -> None:
    con = duckdb.connect()
    con.execute("set arrow_output_version = '1.5'")
    con.execute("set produce_arrow_string_view = true")
    con.execute("set arrow_output_list_view = true")
    relation = con.sql("select range as id, 'c-' || range as name, [range] as tags from range(20)")
    assert pa.types.is_string_view(relation.to_arrow_reader(10).schema.field("name").type)
    viewed = pa.table(
        {"id": pa.array(range(20), pa.int64()), "name": pa.array(["a"] * 20, pa.string_view())}
    )
    for value in (relation, ds.dataset(viewed)):
        result, seen = _run(value, size=8)
        assert [s["rows"] for s in seen] == [8, 8, 4]
        assert seen[0]["schema"].field("name").type == pa.large_string()
        assert result["companies"].schema.field("name").type == pa.large_string()
    assert result["companies"]["id"].to_pylist() == list(range(20))
    assert relation.to_arrow_table().num_rows == 20  # the connection is free again


@pytest.mark.parametrize("shape", ["duckdb", "polars_lazy", "dataset_memory", "reader"])
def test_lazy_value_returned_for_the_field_is_converted_whole(shape: str, tmp_path: Path) -> None:
    @af.intelligent_streaming(10, over="companies")
    class Narrow(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            rows = context["companies"].select(["id", "name"])
            return {"companies": LAZY[shape](rows, tmp_path)}

    result = af.Flow(Narrow).run(companies=_companies(25), progress=False)
    out = result["companies"]
    assert isinstance(out, pa.Table)
    assert out["id"].to_pylist() == list(range(25))
    path = tmp_path / "out.parquet"

    class Produce(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            return {"companies": LAZY[shape](_companies(25), tmp_path)}

    af.Flow(Produce).run(progress=False).to_parquet(path, "companies")
    assert _same_rows(pq.read_table(path), _companies(25))


def test_parquet_dataset_knows_its_rows_and_reads_a_key_column_alone(tmp_path: Path) -> None:
    table = _companies(ROWS)
    reader = to_table_or_reader(_parquet_dataset(table, tmp_path), SIZE)
    assert isinstance(reader, pa.RecordBatchReader)
    assert known_num_rows(reader) == ROWS
    keys = known_column(reader, "id")
    assert keys is not None
    assert keys.to_pylist() == list(range(ROWS))
    filtered = to_table_or_reader(_filtered_dataset(table, tmp_path / "filtered"), SIZE)
    assert known_num_rows(filtered) is None
    assert known_num_rows(to_table_or_reader(LAZY["duckdb"](table, tmp_path), SIZE)) is None


def test_resume_over_a_parquet_dataset(tmp_path: Path) -> None:
    """A state store reads the dataset's keys up front and skips what a first run did."""
    calls: list[int] = []
    store = af.MemoryState(table="lazy", key="id")

    @af.intelligent_streaming(SIZE, over="companies", state=store)
    class Count(af.Agent):
        def call(self, context: Any) -> None:
            calls.append(context["companies"].num_rows)

    dataset = _parquet_dataset(_companies(ROWS), tmp_path)
    first = af.Flow(Count).run(companies=dataset, progress=False)
    again = af.Flow(Count).run(companies=dataset, progress=False)
    assert sum(calls) == ROWS, "the second run computed rows again"
    assert first["companies"].equals(again["companies"])


def test_recognising_lazy_inputs_imports_nothing() -> None:
    code = textwrap.dedent(
        """
        import sys
        import pyarrow as pa
        import arrowflow as af
        from arrowflow._tabular import is_tabular, to_table, to_table_or_reader

        assert not is_tabular(3) and not is_tabular({"a": 1}) and is_tabular(pa.table({"a": [1]}))
        to_table_or_reader(pa.table({"a": [1]}))
        to_table([{"a": 1}])
        print(sorted(name for name in ("polars", "pyarrow.dataset") if name in sys.modules))
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert completed.stdout.strip() == "[]"


# --------------------------------------------------------------------------- bounded memory

# The query: 20,000,000 rows of four 8-byte columns.
DUCKDB_ROWS = 20_000_000
DUCKDB_QUERY = "select range as id, range * 2 as x, range % 7 as k, range * 1.5 as f from range({})"
DUCKDB_STREAM = 300_000
# A Parquet dataset written by polars (its default row groups), read by polars. Streams are
# large because polars' scan decodes row groups ahead of what is pulled from it (about 150 MB
# here, growing slowly with the input: pola-rs/polars#28569), memory of its own that arrowflow
# does not control; ten streams still hold less than the whole input.
POLARS_ROWS = 12_000_000
POLARS_FILES = 12
POLARS_STREAM = 900_000
BOUND_STREAMS = 10


def _measured(case: str, mode: str, size: int, data: str) -> dict[str, Any]:
    """In the child: stream ``case``'s input (or, ``mode="eager"``, its table collected first)
    through a scope whose agent returns one row per stream; the peak RSS above the start."""
    from arrowflow.bench import _MemorySampler

    @af.intelligent_streaming(size, over="rows")
    class Count(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            return {"rows": pa.table({"n": [context["rows"].num_rows]})}

    def source(small: bool) -> Any:
        if case == "duckdb":
            con = duckdb.connect()
            con.execute("set threads = 2")
            relation = con.sql(DUCKDB_QUERY.format(200_000 if small else DUCKDB_ROWS))
            return relation if mode == "lazy" else relation.to_arrow_table()
        files = sorted(Path(data).glob("*.parquet"))
        frame = pl.scan_parquet(files[:1]).head(200_000) if small else pl.scan_parquet(files)
        return frame if mode == "lazy" else frame.collect()

    af.Flow(Count).run(rows=source(small=True), progress=False)  # pools and threads started
    with _ResidentMemory() as resident, _MemorySampler() as pool:
        started = time.perf_counter()
        result = af.Flow(Count).run(rows=source(small=False), progress=False)
        seconds = time.perf_counter() - started
    return {
        "rss": resident.peak,
        "pool": pool.peak,
        "rows": sum(result["rows"]["n"].to_pylist()),
        "streams": result.stats[0]["total_batches"],
        "seconds": seconds,
    }


class _ResidentMemory:
    """The most resident memory the process held beyond what it held at the start, sampled
    every millisecond by a thread of its own (Linux: ``/proc/self/statm``)."""

    PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def __init__(self) -> None:
        self.peak = 0
        self._start = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @classmethod
    def _now(cls) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * cls.PAGE

    def __enter__(self) -> _ResidentMemory:
        self._start = self._now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._note()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._note()

    def _note(self) -> None:
        self.peak = max(self.peak, self._now() - self._start)


def _in_child(case: str, mode: str, size: int, data: str = "") -> dict[str, Any]:
    # Threads pinned, so that what the engines hold ahead does not grow with the machine.
    env = {**os.environ, "POLARS_MAX_THREADS": "2"}
    completed = subprocess.run(
        [sys.executable, __file__, case, mode, str(size), data],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    measured: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return measured


def _check_bounded(lazy: dict[str, Any], eager: dict[str, Any], bound: float, what: str) -> None:
    figures = (
        f"{what}: bound {bound / 1e6:.0f} MB ({BOUND_STREAMS} streams); lazy peak RSS "
        f"{lazy['rss'] / 1e6:.0f} MB in {lazy['seconds']:.2f} s, collected first "
        f"{eager['rss'] / 1e6:.0f} MB in {eager['seconds']:.2f} s (Arrow pool peaks "
        f"{lazy['pool'] / 1e6:.0f} and {eager['pool'] / 1e6:.0f} MB)"
    )
    assert lazy["rss"] < bound, figures
    assert eager["rss"] > bound, "the bound would not catch the input collected whole: " + figures


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/statm").exists(), reason="samples RSS from /proc/self/statm"
)


@needs_proc
def test_duckdb_query_of_20_million_rows_streams_in_bounded_memory() -> None:
    schema = duckdb.sql(DUCKDB_QUERY.format(1)).to_arrow_table().schema
    row_bytes = sum(data_type.bit_width // 8 for data_type in schema.types)
    lazy = _in_child("duckdb", "lazy", DUCKDB_STREAM)
    eager = _in_child("duckdb", "eager", DUCKDB_STREAM)
    for run in (lazy, eager):
        assert run["rows"] == DUCKDB_ROWS
        assert run["streams"] == -(-DUCKDB_ROWS // DUCKDB_STREAM)
    bound = BOUND_STREAMS * DUCKDB_STREAM * row_bytes
    _check_bounded(lazy, eager, bound, f"DuckDB, {DUCKDB_ROWS:,} rows")


@needs_proc
def test_polars_scan_of_a_parquet_dataset_streams_in_bounded_memory(tmp_path: Path) -> None:
    per_file = POLARS_ROWS // POLARS_FILES
    for part in range(POLARS_FILES):
        ids = pl.int_range(part * per_file, (part + 1) * per_file, eager=True)
        frame = pl.DataFrame({"id": ids}).with_columns(
            x=pl.col("id") * 0.5,
            k=pl.col("id") % 1_000,
            name=pl.format("company-{}", pl.col("id") % 100_000),
        )
        frame.write_parquet(tmp_path / f"part-{part}.parquet")
    # One stream's bytes as the scope holds them (polars' strings are large_string).
    first = to_table(pl.scan_parquet(tmp_path / "part-0.parquet"))
    row_bytes = first.nbytes / first.num_rows
    lazy = _in_child("polars", "lazy", POLARS_STREAM, str(tmp_path))
    eager = _in_child("polars", "eager", POLARS_STREAM, str(tmp_path))
    for run in (lazy, eager):
        assert run["rows"] == POLARS_ROWS
        assert run["streams"] == -(-POLARS_ROWS // POLARS_STREAM)
    bound = BOUND_STREAMS * POLARS_STREAM * row_bytes
    _check_bounded(lazy, eager, bound, f"polars, {POLARS_ROWS:,} rows in {POLARS_FILES} files")


if __name__ == "__main__":
    case_, mode_, size_, data_ = sys.argv[1:5]
    print(json.dumps(_measured(case_, mode_, int(size_), data_)))
