"""Completed streams are committed by a writer at most every ``commit_interval``, and always
when the run ends; skip and load are one join per run whenever the input's keys are known."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import arrowflow as af
from arrowflow.state import DuckDBState, _writer
from arrowflow.state._results import ResultTable

if TYPE_CHECKING:
    from collections.abc import Callable

WAIT = 60.0


def _scoring(
    store: DuckDBState,
    seen: list[int],
    *,
    fail_at: int = 0,
    hold_at: int = 0,
    held: Callable[[], None] | None = None,
) -> type[af.Agent]:
    @af.intelligent_streaming(stream_size=10, over="companies", state=store)
    class Score(af.Agent):
        def call(self, context: Any) -> dict[str, pa.Table]:
            rows = context["companies"]
            stream = context["_batch_metadata"]["batch_number"]
            seen.extend(rows["id"].to_pylist())
            if stream == fail_at:
                raise RuntimeError(f"boom in stream {stream}")
            if stream == hold_at and held is not None:
                held()
            return {"companies": rows.append_column("score", pc.multiply(rows["id"], 2))}

    return Score


def _stored_rows(path: Path) -> int:
    """Rows committed to the result table, read by a connection of this process's own."""
    with duckdb.connect(str(path)) as con:
        found = con.sql(
            "select count(*) from duckdb_tables() where table_name = 'quick_fit'"
        ).fetchall()
        if found[0][0] == 0:
            return 0
        return int(con.sql("select count(*) from quick_fit").fetchall()[0][0])


@pytest.mark.parametrize(("interval", "committed"), [(0.0, 20), (600.0, 0)])
def test_streams_are_committed_by_the_interval_and_all_at_the_end(
    tmp_path: Path, make_companies: Callable[..., pa.Table], interval: float, committed: int
) -> None:
    """While stream 3 runs, streams 1 and 2 are durable with ``commit_interval=0`` and not
    yet with a long interval; at the end of the run everything is."""
    path = tmp_path / "state.duckdb"
    store = DuckDBState(path, commit_interval=interval)
    during: list[int] = []

    def look() -> None:
        if interval == 0:
            quiet = threading.Event()
            while store.pending_streams:  # the writer commits streams 1 and 2 now
                quiet.wait(0.01)
        during.append(_stored_rows(path))

    seen: list[int] = []
    af.Flow(_scoring(store, seen, hold_at=3, held=look)).run(companies=make_companies(40))

    assert during == [committed]
    assert _stored_rows(path) == 40
    seen.clear()
    af.Flow(_scoring(store, seen)).run(companies=make_companies(40))
    assert seen == []


@pytest.mark.parametrize(("flush_rows", "committed"), [(20, 20), (21, 0)])
def test_pending_rows_past_flush_rows_are_committed_before_the_interval(
    tmp_path: Path,
    make_companies: Callable[..., pa.Table],
    monkeypatch: pytest.MonkeyPatch,
    flush_rows: int,
    committed: int,
) -> None:
    """DuckDB inserts whole row groups fastest: the writer commits once that many rows are
    pending, long before ``commit_interval``."""
    monkeypatch.setattr(_writer, "FLUSH_ROWS", flush_rows)
    path = tmp_path / "state.duckdb"
    store = DuckDBState(path, commit_interval=600)
    during: list[int] = []

    def look() -> None:
        quiet = threading.Event()
        deadline = time.monotonic() + WAIT  # a writer that never commits fails, not hangs
        while committed and store.pending_streams and time.monotonic() < deadline:
            quiet.wait(0.01)  # streams 1 and 2 hold 20 rows
        during.append(_stored_rows(path))

    af.Flow(_scoring(store, [], hold_at=3, held=look)).run(companies=make_companies(40))

    assert during == [committed]
    assert _stored_rows(path) == 40


def test_a_failing_run_commits_the_streams_completed_before_it(
    tmp_path: Path, make_companies: Callable[..., pa.Table]
) -> None:
    store = DuckDBState(tmp_path / "state.duckdb", commit_interval=600)
    seen: list[int] = []
    with pytest.raises(af.BatchExecutionError):
        af.Flow(_scoring(store, seen, fail_at=3)).run(companies=make_companies(40))

    seen.clear()
    result = af.Flow(_scoring(store, seen)).run(companies=make_companies(40))
    assert seen == list(range(20, 40))  # streams 1 and 2 were kept
    assert result["companies"]["score"].to_pylist() == [2 * i for i in range(40)]
    assert store.runs()["status"].to_pylist() == ["failed", "ok"]


def test_commit_interval_must_be_seconds() -> None:
    with pytest.raises(af.ConfigurationError, match="commit_interval"):
        DuckDBState(commit_interval=-1)


def _no_query_per_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a query for one stream: the run should have joined once")

    monkeypatch.setattr(ResultTable, "stored_keys", refused)
    monkeypatch.setattr(ResultTable, "load", refused)


@pytest.mark.parametrize("lazy", [False, True], ids=["table", "scan_parquet"])
def test_skip_and_load_are_one_join_per_run(
    tmp_path: Path,
    make_companies: Callable[..., pa.Table],
    monkeypatch: pytest.MonkeyPatch,
    lazy: bool,
) -> None:
    """With the input's keys known up front (a table, a Parquet scan), a resumed run asks
    the database once for what is done, not once per stream."""
    companies = make_companies(100)
    source = tmp_path / "companies.parquet"
    pq.write_table(companies, source, row_group_size=16)
    store = DuckDBState(tmp_path / "state.duckdb")
    seen: list[int] = []
    first = af.Flow(_scoring(store, seen)).run(companies=companies.slice(0, 70))

    _no_query_per_stream(monkeypatch)
    seen.clear()
    given = af.scan_parquet(source) if lazy else companies
    result = af.Flow(_scoring(store, seen)).run(companies=given)

    assert seen == list(range(70, 100))
    assert result["companies"].slice(0, 70).equals(first["companies"])
    assert result["companies"]["score"].to_pylist() == [2 * i for i in range(100)]


def test_a_plain_reader_is_answered_stream_by_stream(
    tmp_path: Path, make_companies: Callable[..., pa.Table], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that cannot give its keys up front falls back to a query per stream."""
    companies = make_companies(30)
    store = DuckDBState(tmp_path / "state.duckdb")
    af.Flow(_scoring(store, [])).run(companies=companies)

    _no_query_per_stream(monkeypatch)
    reader = pa.RecordBatchReader.from_batches(companies.schema, companies.to_batches(10))
    with pytest.raises(af.BatchExecutionError, match="a query for one stream"):
        af.Flow(_scoring(store, [])).run(companies=reader)


def test_the_stored_rows_of_a_resume_are_read_as_streams_need_them(
    tmp_path: Path, make_companies: Callable[..., pa.Table]
) -> None:
    """Everything done over 20 streams, 4 at a time, answered out of order: the stored rows
    come back in input order, each once."""
    companies = make_companies(2000)
    store = DuckDBState(tmp_path / "state.duckdb")

    @af.intelligent_streaming(stream_size=100, over="companies", state=store, max_concurrency=4)
    class Score(af.Agent):
        def call(self, context: Any) -> dict[str, pa.Table]:
            rows = context["companies"]
            return {"companies": rows.append_column("score", pc.multiply(rows["id"], 2))}

    first = af.Flow(Score).run(companies=companies)
    again = af.Flow(Score).run(companies=companies)
    assert again["companies"].equals(first["companies"])
    assert again.stats[0]["loaded_items"] == 2000
