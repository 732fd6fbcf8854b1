"""Choosing a stream size: ``benchmark_stream_sizes`` and its report."""

from __future__ import annotations

import html.parser
from pathlib import Path
from typing import Any

import matplotlib
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import arrowflow as af
from arrowflow.bench import REPORT_SCHEMA

matplotlib.use("Agg")

ROWS = 20_000


def _rows(n: int = ROWS) -> pa.Table:
    return pa.table({"id": pa.array(range(n), pa.int64()), "x": pa.array(range(n), pa.float64())})


def _doubling(calls: list[int] | None = None, **options: Any) -> type[af.Agent]:
    @af.intelligent_streaming(1_000, over="rows", **options)
    class Double(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            rows = context["rows"]
            if calls is not None:
                calls.append(context["_batch_metadata"]["batch_size"])
            return {"rows": rows.append_column("y", pc.multiply(rows["x"], 2.0))}

    return Double


def test_the_table_has_a_row_per_size_in_order() -> None:
    report = af.benchmark_stream_sizes(_doubling(), [5_000, 500, 20_000], repeat=2, rows=_rows())

    assert report.table.schema.equals(REPORT_SCHEMA)
    assert report.table["stream_size"].to_pylist() == [5_000, 500, 20_000]
    assert report.table["streams"].to_pylist() == [4, 40, 1]
    assert report.table["rounds"].to_pylist() == [2, 2, 2]
    assert report.rows == ROWS
    for row in report.table.to_pylist():
        assert 0 < row["seconds_min"] <= row["seconds_median"]
        assert row["rows_per_s"] == pytest.approx(ROWS / row["seconds_median"])
    # Against the largest size: its own overhead is 0, the others' from the extra streams.
    by_size = {row["stream_size"]: row for row in report.table.to_pylist()}
    assert by_size[20_000]["overhead_per_stream_us"] == 0
    extra = by_size[500]["seconds_min"] - by_size[20_000]["seconds_min"]
    assert by_size[500]["overhead_per_stream_us"] == pytest.approx(extra / 39 * 1e6)


def test_best_is_the_size_with_the_highest_median_throughput() -> None:
    report = af.benchmark_stream_sizes(_doubling(), [100, 2_000], repeat=3, rows=_rows())
    rows = report.table.to_pylist()
    assert report.best == max(rows, key=lambda row: row["rows_per_s"])["stream_size"]


def test_rounds_are_interleaved_after_the_warm_up() -> None:
    calls: list[int] = []
    af.benchmark_stream_sizes(_doubling(calls), [10_000, 20_000], repeat=2, warmup=1, rows=_rows())
    # Each round runs every size once, in the order given: 2 streams, then 1.
    assert calls == [10_000, 10_000, 20_000] * 3


def test_peak_memory_covers_what_the_run_allocates() -> None:
    report = af.benchmark_stream_sizes(_doubling(), [1_000, 20_000], repeat=1, rows=_rows())
    new_column_mb = ROWS * 8 / 1024 / 1024  # the y column every run allocates
    assert min(report.table["peak_arrow_mb"].to_pylist()) >= new_column_mb * 0.99


def test_no_state_store_is_written(tmp_path: Path) -> None:
    path = tmp_path / "state.duckdb"
    store = af.DuckDBState(path, table="doubled", key="id")
    calls: list[int] = []
    report = af.benchmark_stream_sizes(
        _doubling(calls, state=store), [5_000, 20_000], repeat=2, rows=_rows()
    )
    assert not path.exists()
    # Every round did the whole work: nothing was skipped as done by an earlier round.
    assert sum(calls) == ROWS * 2 * 3
    assert report.table["streams"].to_pylist() == [4, 1]


def test_an_existing_state_file_is_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "state.duckdb"
    store = af.DuckDBState(path, table="doubled", key="id")
    af.Flow(_doubling(state=store)).run(rows=_rows(), progress=False)
    before = path.read_bytes()
    calls: list[int] = []
    af.benchmark_stream_sizes(_doubling(calls, state=store), [10_000], repeat=1, rows=_rows())
    assert sum(calls) == ROWS * 2
    assert path.read_bytes() == before


def test_a_lazy_input_is_read_once_for_every_round(tmp_path: Path) -> None:
    pq.write_table(_rows(), tmp_path / "rows.parquet", row_group_size=3_000)
    calls: list[int] = []
    af.benchmark_stream_sizes(
        _doubling(calls),
        [10_000, 20_000],
        repeat=2,
        rows=af.scan_parquet(tmp_path / "rows.parquet"),
    )
    assert sum(calls) == ROWS * 2 * 3


def test_a_pipeline_brings_its_context_and_scope_picks_the_scope() -> None:
    @af.ends_batching
    class End(af.Agent):
        def call(self, context: Any) -> None:
            return None

    @af.intelligent_streaming(7, over="rows")
    class Second(af.Agent):
        def call(self, context: Any) -> None:
            return None

    class Doubling(af.Pipeline):
        flow = _doubling() >> End >> Second

    report = af.benchmark_stream_sizes(
        Doubling(rows=_rows()), [2_000, 4_000], repeat=1, scope="Second"
    )
    assert report.table["streams"].to_pylist() == [10, 5]


@pytest.mark.parametrize(
    ("sizes", "options", "message"),
    [
        ([], {}, "non-empty list"),
        ([10, 10], {}, "repeat a size"),
        ([10], {"repeat": 0}, "repeat= must be an int >= 1"),
        ([10], {"warmup": -1}, "warmup= must be an int >= 0"),
        ([0], {}, "greater than 0"),
        ([10], {"scope": "Nobody"}, "no scope is triggered by that agent"),
    ],
)
def test_bad_arguments_are_refused(sizes: list[int], options: dict[str, Any], message: str):
    with pytest.raises(af.ConfigurationError, match=message):
        af.benchmark_stream_sizes(_doubling(), sizes, rows=_rows(10), **options)


def test_a_flow_without_scope_is_refused(passthrough) -> None:
    with pytest.raises(af.ConfigurationError, match="no streaming scope"):
        af.benchmark_stream_sizes(passthrough, [10], rows=_rows(10))


class _Cells(html.parser.HTMLParser):
    """The text of each table row, and whether the row is bold."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[list[str], bool]] = []
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append(([], "bold" in (dict(attrs).get("style") or "")))
        self._in_cell = tag in ("td", "th")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.rows[-1][0].append(data)


def test_the_report_reads_as_html_and_as_text() -> None:
    report = af.benchmark_stream_sizes(_doubling(), [1_000, 20_000], repeat=1, rows=_rows())

    parser = _Cells()
    parser.feed(report._repr_html_())
    header, *rows = parser.rows
    assert header[0] == REPORT_SCHEMA.names
    assert [int(cells[0].replace(",", "")) for cells, _ in rows] == [1_000, 20_000]
    assert [bold for _, bold in rows] == [size == report.best for size in (1_000, 20_000)]

    lines = str(report).splitlines()
    assert lines[0].split() == REPORT_SCHEMA.names
    assert len(lines) == 3
    marked = [line for line in lines if line.endswith("<- best")]
    assert len(marked) == 1
    assert marked[0].split()[0] == f"{report.best:,}"


def test_plot_draws_throughput_and_memory_on_a_log_axis() -> None:
    report = af.benchmark_stream_sizes(_doubling(), [500, 5_000], repeat=1, rows=_rows())
    ax = report.plot()
    assert ax.get_xscale() == "log"
    throughput = ax.get_lines()[0]
    assert list(throughput.get_xdata()) == [500, 5_000]
    assert list(throughput.get_ydata()) == report.table["rows_per_s"].to_pylist()
    memory_axes = [other for other in ax.figure.axes if other is not ax]
    (memory,) = memory_axes
    assert list(memory.get_lines()[0].get_ydata()) == report.table["peak_arrow_mb"].to_pylist()
