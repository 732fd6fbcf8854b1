"""Resuming from a DuckDB state store, against what a user would run by hand.

The input is the session's table (``ARROWFLOW_BENCH_ROWS`` rows, 10,000,000 by default) of which
70% — the rows whose ``id % 10 < 7`` — were processed by an earlier run and stored in a
``DuckDBState`` file. The agent is trivial (``y = x * 2``), so the figures measure the store:

- **resumed run**: ``Flow.run`` at stream size 100,000 with ``state=DuckDBState(copy of the
  file)``: open, check the keys, skip the done rows, load their stored results, process and
  persist the rest, merge in order, record the run, close.
- **resumed run, skip/load/merge only**: the same with ``persist_each_stream`` replaced by an
  option that stores nothing: the skip, load and merge work the first goal is about (persisting
  has a goal of its own, below). Compared with:
- **by hand: anti + semi join**: the two DuckDB queries a user would write over the same
  database — the input's rows whose key is not done, the stored rows of those that are — with
  the input registered as an Arrow table. Goal: skip/load/merge only / by hand <= 1.5x; the
  full resumed run's ratio is shown too.
- **by hand: joins + insert**: the same, plus the agent on the rows not done and one
  transaction inserting their results and keys: the work the resumed run does, without its
  per-stream transactions (crash safety), key checks and merge in input order. Shown for
  context, without a goal.
- **per record**: one ``SELECT EXISTS(...)`` per input row, and one ``SELECT`` of its stored row
  when it is done, the way the seed checked state. Timed on a sample of rows and extrapolated
  to the whole input. Goal: per record / resumed >= 100x.
- **persist 1,000-row streams**: ``persist_each_stream`` on consecutive 1,000-row streams of
  new rows into the stored table, with the run's end (records and closes the file) included,
  for a table input (the store knows the keys are new) and a lazy one (it must delete).
  Goal: <= 5 ms per stream, amortised.

The baselines of the resumed run are timed in the setup of each of its rounds, so all three
alternate and share the machine's state; ratios use the best round of each.

Run with::

    python -m pytest benchmarks/test_state.py --benchmark-only
    ARROWFLOW_BENCH_ROWS=1000000 python -m pytest benchmarks/test_state.py --benchmark-only

``ARROWFLOW_BENCH_STATE_ROUNDS`` (default 5) sets the rounds of the resumed run and of the
persist benchmarks, ``ARROWFLOW_BENCH_PERSIST_STREAMS`` (300) the 1,000-row streams persisted
per round, ``ARROWFLOW_BENCH_PER_RECORD_SAMPLE`` (2,000) the rows queried one by one. Goals are
printed at the end of the session, never asserted (timings are not tests).
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import arrowflow as af
from arrowflow.state import DuckDBState, ScopeInfo

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

STREAM_SIZE = 100_000
PERSIST_STREAM_SIZE = 1_000
PERSIST_STREAMS = int(os.environ.get("ARROWFLOW_BENCH_PERSIST_STREAMS", "300"))
PER_RECORD_SAMPLE = int(os.environ.get("ARROWFLOW_BENCH_PER_RECORD_SAMPLE", "2000"))
STATE_ROUNDS = int(os.environ.get("ARROWFLOW_BENCH_STATE_ROUNDS", "5"))
TABLE = "bench"
DONE = f'arrowflow."done:{TABLE}:id"'

RESUMED = "resumed run"
SKIP_LOAD_MERGE = "resumed run, skip/load/merge only"
BY_HAND = "by hand: anti + semi join"
BY_HAND_INSERT = "by hand: joins + insert"
PER_RECORD = "per record (extrapolated)"
PERSIST = "persist per 1,000-row stream"

GOAL_BY_HAND = 1.5
GOAL_PER_RECORD = 100.0
GOAL_PERSIST_MS = 5.0


def double_x(rows: pa.Table) -> pa.Table:
    return rows.append_column("y", pc.multiply(rows["x"], 2.0))


def _store_nothing(results: pa.Table, context: Mapping[str, Any]) -> None:
    return None


def resumable_flow(store: DuckDBState, *, persist: bool = True) -> af.Flow:
    options: dict[str, Any] = {} if persist else {"persist_each_stream": _store_nothing}

    @af.intelligent_streaming(STREAM_SIZE, over="rows", state=store, **options)
    class DoubleX(af.Agent):
        def call(self, context: Mapping[str, Any]) -> dict[str, Any]:
            return {"rows": double_x(context["rows"])}

    return af.Flow(DoubleX)


def is_done(table: pa.Table) -> pa.ChunkedArray:
    return pc.less(pc.remainder(table["id"], 10), 7)


@dataclass
class StateReport:
    """Best seconds per measurement, for the summary at the end of the session."""

    rows: int
    seconds: dict[str, float] = field(default_factory=dict)
    medians: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, times: list[float]) -> None:
        self.seconds[name] = min(times)
        self.medians[name] = statistics.median(times)

    def lines(self) -> list[str]:
        s = self.seconds
        out = [f"{name:<36} {s[name]:>10.3f} s" for name in sorted(s) if PERSIST not in name]
        if {SKIP_LOAD_MERGE, BY_HAND} <= s.keys():
            ratio = s[SKIP_LOAD_MERGE] / s[BY_HAND]
            name = f"{SKIP_LOAD_MERGE} / {BY_HAND}"
            out.append(_goal(name, ratio, "x", ratio <= GOAL_BY_HAND, "<= 1.5x"))
        if {RESUMED, BY_HAND} <= s.keys():
            ratio = s[RESUMED] / s[BY_HAND]
            out.append(f"{RESUMED + ' / ' + BY_HAND:<36} {ratio:>10.2f}x")
        if {RESUMED, BY_HAND_INSERT} <= s.keys():
            ratio = s[RESUMED] / s[BY_HAND_INSERT]
            out.append(f"{RESUMED + ' / ' + BY_HAND_INSERT:<36} {ratio:>10.2f}x")
        if {RESUMED, PER_RECORD} <= s.keys():
            ratio = s[PER_RECORD] / s[RESUMED]
            out.append(
                _goal(f"{PER_RECORD} / {RESUMED}", ratio, "x", ratio >= GOAL_PER_RECORD, ">= 100x")
            )
        for name in sorted(name for name in s if PERSIST in name):
            ms = s[name] * 1e3
            out.append(_goal(name, ms, " ms", ms <= GOAL_PERSIST_MS, "<= 5 ms"))
        return out


def _goal(name: str, value: float, unit: str, met: bool, goal: str) -> str:
    return f"{name:<36} {value:>10.2f}{unit}  goal {goal}: {'met' if met else 'missed'}"


class _Summary:
    """Prints the report after pytest-benchmark's tables."""

    def __init__(self, report: StateReport) -> None:
        self.report = report

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.report.seconds:
            return
        terminalreporter.section("arrowflow state store against doing it by hand")
        terminalreporter.write_line(
            f"{self.report.rows:,} rows, 70% done, stream size {STREAM_SIZE:,}, best of "
            f"{STATE_ROUNDS} rounds"
        )
        for line in self.report.lines():
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def state_report(pytestconfig: pytest.Config, table: pa.Table) -> StateReport:
    report = StateReport(table.num_rows)
    pytestconfig.pluginmanager.register(_Summary(report), "arrowflow-state-summary")
    return report


@pytest.fixture(scope="module")
def prepared(table: pa.Table, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state file holding the results of the done rows, made by a first run."""
    path = tmp_path_factory.mktemp("state") / "prepared.duckdb"
    with DuckDBState(path, table=TABLE) as store:
        resumable_flow(store).run(rows=table.filter(is_done(table)), progress=False)
    return path


def fresh_copy(prepared: Path, name: str) -> Path:
    target = prepared.with_name(name)
    for suffix in ("", ".wal"):
        if os.path.exists(f"{target}{suffix}"):
            os.remove(f"{target}{suffix}")
    shutil.copyfile(prepared, target)
    return target


def by_hand_joins(path: Path, table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """The rows not done, and the stored rows of those done: two queries."""
    with duckdb.connect(str(path)) as con:
        con.register("input_rows", table)
        todo = con.sql(f"SELECT i.* FROM input_rows i ANTI JOIN {DONE} d ON i.id = d.key")
        loaded = con.sql(
            f"SELECT r.* FROM {TABLE} r SEMI JOIN input_rows i ON r.id = i.id "
            f"SEMI JOIN {DONE} d ON r.id = d.key"
        )
        return todo.to_arrow_table(), loaded.to_arrow_table()


def by_hand_with_insert(path: Path, table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """The joins, the agent on the rows not done, and its results stored in one transaction."""
    todo, loaded = by_hand_joins(path, table)
    new_rows = double_x(todo)
    with duckdb.connect(str(path)) as con:
        con.register("new_rows", new_rows)
        con.execute("BEGIN TRANSACTION")
        con.execute(f"INSERT INTO {TABLE} BY NAME SELECT * FROM new_rows")
        con.execute(f"INSERT INTO {DONE} SELECT 1, id FROM new_rows")
        con.execute("COMMIT")
    return new_rows, loaded


def timed(seconds: list[float], function: Any, *args: Any) -> Any:
    os.sync()  # each measurement starts with the disk idle, not writing back the last one
    started = time.perf_counter()
    result = function(*args)
    seconds.append(time.perf_counter() - started)
    return result


@pytest.mark.benchmark(group="state: resume")
def test_resumed_run(
    benchmark: Any, table: pa.Table, prepared: Path, state_report: StateReport
) -> None:
    """The resumed run's rounds are timed by pytest-benchmark; before each, untimed by it, the
    two by-hand baselines run and are timed here, so all three share the machine's state."""
    joins: list[float] = []
    with_insert: list[float] = []
    skip_load_merge: list[float] = []
    joins_copy = fresh_copy(prepared, "joins.duckdb")

    def resume_without_persisting(path: Path) -> af.PipelineResult:
        with DuckDBState(path, table=TABLE) as store:
            return resumable_flow(store, persist=False).run(rows=table, progress=False)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        todo, loaded = timed(joins, by_hand_joins, joins_copy, table)
        assert todo.num_rows + loaded.num_rows == table.num_rows
        path = fresh_copy(prepared, "skip-load-merge.duckdb")
        merged = timed(skip_load_merge, resume_without_persisting, path)
        assert merged["rows"]["id"].equals(table["id"])
        timed(with_insert, by_hand_with_insert, fresh_copy(prepared, "insert.duckdb"), table)
        store = DuckDBState(fresh_copy(prepared, "resumed.duckdb"), table=TABLE)
        os.sync()
        return (store,), {}

    def resume(store: DuckDBState) -> af.PipelineResult:
        return resumable_flow(store).run(rows=table, progress=False)

    result = benchmark.pedantic(resume, setup=setup, rounds=STATE_ROUNDS, iterations=1)

    rows = result["rows"]
    assert rows["id"].equals(table["id"])
    assert rows["y"].equals(pc.multiply(table["x"], 2.0))
    assert result.stats[0]["skipped_items"] == pc.sum(is_done(table)).as_py()
    state_report.add(RESUMED, list(benchmark.stats.stats.data))
    state_report.add(BY_HAND, joins)
    state_report.add(BY_HAND_INSERT, with_insert)
    state_report.add(SKIP_LOAD_MERGE, skip_load_merge)


@pytest.mark.benchmark(group="state: per record")
def test_per_record_queries(
    benchmark: Any, table: pa.Table, prepared: Path, state_report: StateReport
) -> None:
    path = fresh_copy(prepared, "per-record.duckdb")
    sample = table["id"][:PER_RECORD_SAMPLE].to_pylist()

    def per_record() -> int:
        found = 0
        with duckdb.connect(str(path)) as con:
            for key in sample:
                exists = f"SELECT EXISTS (SELECT 1 FROM {DONE} WHERE key = ?)"
                if con.execute(exists, [key]).fetchone() == (True,):
                    con.execute(f"SELECT * FROM {TABLE} WHERE id = ?", [key]).fetchall()
                    found += 1
        return found

    found = benchmark.pedantic(per_record, rounds=1, iterations=1)
    assert found == sum(1 for key in sample if key % 10 < 7)
    scale = table.num_rows / len(sample)
    state_report.add(PER_RECORD, [benchmark.stats.stats.min * scale])


@pytest.mark.parametrize("input_kind", ["table", "reader"])
@pytest.mark.benchmark(group="state: persist")
def test_persist_small_streams(
    benchmark: Any,
    table: pa.Table,
    prepared: Path,
    state_report: StateReport,
    input_kind: str,
) -> None:
    """A table input tells the store up front that these keys have nothing stored, so their
    upserts skip the deletes; a lazy input cannot, and pays them."""
    rows = PERSIST_STREAMS * PERSIST_STREAM_SIZE
    todo = table.filter(pc.invert(is_done(table))).slice(0, rows)
    pieces = [
        todo.slice(offset, PERSIST_STREAM_SIZE) for offset in range(0, rows, PERSIST_STREAM_SIZE)
    ]
    scope = ScopeInfo(("bench.DoubleX",), "rows", "id", todo.schema, "DoubleX")
    seconds: list[float] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        store = DuckDBState(fresh_copy(prepared, "persist.duckdb"), table=TABLE)
        store.begin_run(scope, todo if input_kind == "table" else None)
        return (store,), {}

    def persist(store: DuckDBState) -> None:
        spent = 0.0
        for number, piece in enumerate(pieces, 1):
            context = {"rows": piece, "_batch_metadata": {"batch_number": number}}
            assert not pc.any(store.skip_if(piece, context)).as_py()
            results = double_x(piece)
            started = time.perf_counter()
            store.persist_each_stream(results, context)
            spent += time.perf_counter() - started
        started = time.perf_counter()
        store.end_run({}, "ok")
        spent += time.perf_counter() - started
        seconds.append(spent / len(pieces))

    benchmark.pedantic(persist, setup=setup, rounds=STATE_ROUNDS, iterations=1)
    state_report.add(f"{PERSIST} ({input_kind} input)", seconds)
