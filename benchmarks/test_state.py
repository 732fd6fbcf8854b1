"""The DuckDB state store against the same work done by hand, measured in the same session.

The input is the session's table (``ARROWFLOW_BENCH_ROWS`` rows, 10,000,000 by default: ``id``,
``x``, ``k``), and for the lazy cases a Parquet file of it written once per session. The agent is
trivial (``y = x * 2``), so the figures measure the store. A *prepared* database holds the
results of the rows whose ``id % 10 < 7`` (70%), stored by an earlier arrowflow run; each run,
arrowflow's and the baselines', works on a fresh copy of it (so every round resumes the same
state) and starts with the disk idle (``os.sync()``).

The baselines are written by hand with DuckDB and pyarrow alone, no arrowflow:

- **by hand** (resume): the input, with each row's position, as a DuckDB view (an Arrow table
  registered, or ``read_parquet(..., file_row_number = true)`` for the Parquet file); an
  anti-join of its keys against the stored keys (the rows to process), a semi-join (the done
  rows, joined to their stored results); the agent on the new rows; one transaction inserting
  their results and keys; the two parts put back in input order by their positions.
- **bare semi-join load**: the semi-join and the load alone, in input order.
- **by hand** (first run): the Parquet file read 5,000 rows at a time, the agent on each batch,
  then one transaction creating the result table and the done-keys table from all of them.

The cases, each a ratio of best rounds with its goal (printed at the end, never asserted):

1. table input, 70% done, 100,000 rows per stream: resumed run / by hand, goal <= 1.2x;
2. the same at 1,000 rows per stream: goal <= 1.5x;
3. the Parquet file through ``af.scan_parquet``, 100,000 per stream: resumed run / table-input
   resumed run, goal <= 1.2x (and / by hand from the Parquet file, for context);
4. ``ARROWFLOW_BENCH_STATE_ROWS`` rows (3,000,000) all done, 5,000 per stream, lazy input:
   rerun / bare semi-join load, goal <= 1.5x;
5. the same rows, first run into a new store, lazy input: first run / by hand, goal <= 1.5x;
6. peak RSS of a child process running ``af.scan_parquet`` over ``test_memory.py``'s dataset
   (``ARROWFLOW_BENCH_MEMORY_GB`` GiB as Arrow, 1 by default) into a new store and a Parquet
   sink, ``max_concurrency=8``: goal <= 500 MB.

Besides, **per record** times one ``SELECT EXISTS(...)`` per row (and a ``SELECT`` of the
stored row when done), the way the seed checked state, on a sample of rows, extrapolated to the
whole input and divided by case 1's resumed run.

In cases 1 to 5, pytest-benchmark times arrowflow's rounds; before each, its baseline runs and
is timed here, so both alternate and share the machine's state. Results of arrowflow and of the
baseline are checked equal (same rows, same order) once per case.

Run with::

    python -m pytest benchmarks/test_state.py --benchmark-only -p no:cacheprovider
    ARROWFLOW_BENCH_ROWS=300000 ARROWFLOW_BENCH_MEMORY_GB=0.1 python -m pytest \\
        benchmarks/test_state.py --benchmark-only -p no:cacheprovider

``ARROWFLOW_BENCH_STATE_ROUNDS`` (5) sets the rounds of cases 1 to 5,
``ARROWFLOW_BENCH_STATE_ROWS`` the rows of cases 4 and 5 (3,000,000, or
``ARROWFLOW_BENCH_ROWS`` if fewer), ``ARROWFLOW_BENCH_PER_RECORD_SAMPLE`` (2,000) the rows queried
one by one, ``ARROWFLOW_BENCH_MEMORY_GB`` (1 here) the size of case 6's dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import arrowflow as af
from arrowflow.state import DuckDBState
from test_memory import _LAUNCHER, GIB, dataset_dir

if TYPE_CHECKING:
    from collections.abc import Mapping

# The size of the session's table, read as conftest.py reads it.
ROWS = int(os.environ.get("ARROWFLOW_BENCH_ROWS", "10000000"))
SMALL_ROWS = int(os.environ.get("ARROWFLOW_BENCH_STATE_ROWS", str(min(3_000_000, ROWS))))
STATE_ROUNDS = int(os.environ.get("ARROWFLOW_BENCH_STATE_ROUNDS", "5"))
PER_RECORD_SAMPLE = int(os.environ.get("ARROWFLOW_BENCH_PER_RECORD_SAMPLE", "2000"))
MEMORY_GB = float(os.environ.get("ARROWFLOW_BENCH_MEMORY_GB", "1"))

STREAM_SIZE = 100_000
SMALL_STREAM_SIZE = 1_000
LAZY_STREAM_SIZE = 5_000
MEMORY_STREAM_SIZE = 100_000
MEMORY_CONCURRENCY = 8
GOAL_RSS_MB = 500

TABLE = "bench"
DONE = f'arrowflow."done:{TABLE}:id"'
INPUT = "input_rows"
POS = "pos"


@dataclass(frozen=True)
class Case:
    """A row of the goals' table: arrowflow's run over its baseline, and the goal."""

    title: str
    measured: str
    baseline: str
    goal: float


CASES = {
    "table": Case(
        f"table input, {ROWS:,} rows, 70% done, {STREAM_SIZE:,} per stream",
        "resumed run",
        "by hand",
        1.2,
    ),
    "table-small-streams": Case(
        f"the same at {SMALL_STREAM_SIZE:,} per stream ({-(-ROWS // SMALL_STREAM_SIZE):,} streams)",
        "resumed run",
        "by hand",
        1.5,
    ),
    "lazy": Case(
        f"lazy scan_parquet input, the same data, {STREAM_SIZE:,} per stream",
        "resumed run, lazy input",
        "resumed run, table input",
        1.2,
    ),
    "all-done": Case(
        f"everything done, {SMALL_ROWS:,} rows, {LAZY_STREAM_SIZE:,} per stream, lazy input",
        "rerun",
        "bare semi-join load",
        1.5,
    ),
    "first-run": Case(
        f"first run with a store, {SMALL_ROWS:,} rows, {LAZY_STREAM_SIZE:,} per stream, lazy input",
        "first run",
        "by hand",
        1.5,
    ),
}
#: Measured beside a case's two runs, shown for context, without a goal.
BY_HAND_PARQUET = "by hand, Parquet input"
BY_HAND_STREAMS = "by hand, stream by stream"
PER_RECORD = "per record (extrapolated)"
#: Ratios shown for context: case, numerator, denominator.
CONTEXT = [
    ("table-small-streams", CASES["table-small-streams"].measured, BY_HAND_STREAMS),
    ("table-small-streams", BY_HAND_STREAMS, CASES["table-small-streams"].baseline),
    ("lazy", CASES["lazy"].measured, BY_HAND_PARQUET),
    ("table", PER_RECORD, CASES["table"].measured),
]


# --------------------------------------------------------------------------- the flow


def double_x(rows: pa.Table) -> pa.Table:
    return rows.append_column("y", pc.multiply(rows["x"], 2.0))


def resumable_flow(store: DuckDBState, stream_size: int, **options: Any) -> af.Flow:
    """One agent, ``y = x * 2``, in a scope with ``store`` (its name, and so the fingerprint,
    is the same whatever the stream size)."""

    @af.intelligent_streaming(stream_size, over="rows", state=store, **options)
    class DoubleX(af.Agent):
        def call(self, context: Mapping[str, Any]) -> dict[str, Any]:
            return {"rows": double_x(context["rows"])}

    return af.Flow(DoubleX)


def run_with_store(path: Path, rows: pa.Table | Path, stream_size: int) -> af.PipelineResult:
    """A run over ``rows`` (a table, or a Parquet file scanned lazily) with a store at ``path``."""
    source = af.scan_parquet(rows) if isinstance(rows, Path) else rows
    with DuckDBState(path, table=TABLE) as store:
        return resumable_flow(store, stream_size).run(rows=source, progress=False)


def is_done(table: pa.Table) -> pa.ChunkedArray:
    return pc.less(pc.remainder(table["id"], 10), 7)


# --------------------------------------------------------------------------- by hand


def _register_input(con: duckdb.DuckDBPyConnection, source: pa.Table | Path) -> None:
    """The input as the view ``input_rows``, with each row's position in ``pos``."""
    if isinstance(source, pa.Table):
        positions = pa.array(np.arange(source.num_rows, dtype=np.int64))
        con.register(INPUT, source.append_column(POS, positions))
    else:
        con.execute(
            f"CREATE TEMP VIEW {INPUT} AS SELECT * EXCLUDE (file_row_number), "
            f"file_row_number AS {POS} FROM read_parquet('{source}', file_row_number = true)"
        )


def _in_input_order(parts: list[pa.Table]) -> pa.Table:
    """``parts`` (each with ``pos``) concatenated and put in input order, ``pos`` dropped."""
    rows = pa.concat_tables([part.drop_columns([POS]) for part in parts])
    positions = np.concatenate([part[POS].to_numpy() for part in parts])
    order = np.empty_like(positions)
    order[positions] = np.arange(len(positions))
    return rows.take(order)


def _done_rows(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """The semi-join: the stored rows of the input's done keys, each with its input ``pos``."""
    return con.sql(
        f"SELECT i.{POS}, r.* FROM {INPUT} i SEMI JOIN {DONE} d ON i.id = d.key "
        f"JOIN {TABLE} r ON r.id = i.id"
    ).to_arrow_table()


def _store(con: duckdb.DuckDBPyConnection, new_rows: pa.Table) -> None:
    """One transaction inserting the new results and marking their keys done."""
    con.register("new_rows", new_rows)
    con.execute("BEGIN TRANSACTION")
    con.execute(f"INSERT INTO {TABLE} BY NAME SELECT * FROM new_rows")
    con.execute(f"INSERT INTO {DONE} (fp, key) SELECT 1, id FROM new_rows")
    con.execute("COMMIT")


def by_hand_resume(path: Path, source: pa.Table | Path) -> pa.Table:
    """Anti-join, semi-join, the agent on the new rows, one insert, the merge in input order."""
    with duckdb.connect(str(path)) as con:
        _register_input(con, source)
        todo = con.sql(f"SELECT i.* FROM {INPUT} i ANTI JOIN {DONE} d ON i.id = d.key")
        loaded = _done_rows(con)
        new_rows = double_x(todo.to_arrow_table())
        _store(con, new_rows.drop_columns([POS]))
    return _in_input_order([new_rows, loaded])


def by_hand_streams(path: Path, source: pa.Table, stream_size: int) -> pa.Table:
    """:func:`by_hand_resume`, but the agent and the merge stream by stream, as a streaming
    scope must (its agents see each stream's new rows, its hooks each stream's results): each
    stream's rows parted into done and new by one take, the agent on the new ones, the loaded
    and new rows merged in input order by one take. What any design of per-stream work pays."""
    n = source.num_rows
    with duckdb.connect(str(path)) as con:
        _register_input(con, source)
        loaded = _done_rows(con)
        positions = loaded[POS].to_numpy()
        done = np.zeros(n, dtype=np.bool_)
        done[positions] = True
        # The stored rows in input order, by a scatter of their ranks (no sort).
        rank = np.cumsum(done) - 1
        order = np.empty(len(positions), dtype=np.int64)
        order[rank[positions]] = np.arange(len(positions))
        stored = loaded.drop_columns([POS]).take(pa.array(order))
        starts = np.searchsorted(np.flatnonzero(done), np.arange(0, n + stream_size, stream_size))
        parts, new = [], []
        for number, offset in enumerate(range(0, n, stream_size)):
            piece = source.slice(offset, stream_size)
            mask = done[offset : offset + piece.num_rows]
            count = int(np.count_nonzero(mask))
            parted = np.concatenate([np.flatnonzero(mask), np.flatnonzero(~mask)])
            processed = double_x(piece.take(pa.array(parted)).slice(count))
            low, high = int(starts[number]), int(starts[number + 1])
            results = pa.concat_tables([stored.slice(low, high - low), processed])
            taken = np.empty(len(mask), dtype=np.int64)
            taken[mask] = np.arange(count)
            taken[~mask] = np.arange(count, len(mask))
            parts.append(results.take(pa.array(taken)))
            new.append(processed)
        new_rows = pa.concat_tables(new)
        _store(con, new_rows)
    return pa.concat_tables(parts)


def by_hand_load(path: Path, parquet: Path) -> pa.Table:
    """The bare semi-join: the stored rows of the input's done keys, in input order."""
    with duckdb.connect(str(path)) as con:
        _register_input(con, parquet)
        loaded = _done_rows(con)
    return _in_input_order([loaded])


def by_hand_first_run(path: Path, parquet: Path) -> pa.Table:
    """The agent over every 5,000-row batch of the file, then one bulk insert of results and
    keys into a new database."""
    with pq.ParquetFile(parquet) as file:
        results = pa.concat_tables(
            double_x(pa.Table.from_batches([batch]))
            for batch in file.iter_batches(batch_size=LAZY_STREAM_SIZE)
        )
    with duckdb.connect(str(path)) as con:
        con.register("results", results)
        con.execute("BEGIN TRANSACTION")
        con.execute(f"CREATE TABLE {TABLE} AS SELECT * FROM results")
        con.execute("CREATE TABLE done_keys AS SELECT 1 AS fp, id AS key FROM results")
        con.execute("COMMIT")
    return results


# --------------------------------------------------------------------------- the report


@dataclass
class StateReport:
    """Best and median seconds per case and side, for the summary at the end of the session."""

    best: dict[tuple[str, str], float] = field(default_factory=dict)
    median: dict[tuple[str, str], float] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)

    def add(self, case: str, side: str, times: list[float]) -> None:
        self.best[case, side] = min(times)
        self.median[case, side] = statistics.median(times)

    def lines(self) -> list[str]:
        out = []
        for key, case in CASES.items():
            sides = (case.measured, case.baseline)
            if any((key, side) not in self.best for side in sides):
                continue
            out.append(f"{case.title}:")
            for side in sides:
                out.append(
                    f"    {side:<26} {self.best[key, side]:8.3f} s  "
                    f"(median {self.median[key, side]:.3f} s)"
                )
            ratio = self._ratio(key, *sides, self.best)
            met = "met" if ratio <= case.goal else "missed"
            out.append(
                f"    ratio {ratio:.2f}x (of medians {self._ratio(key, *sides, self.median):.2f}x)"
                f", goal <= {case.goal}x: {met}"
            )
        for key, over, under in CONTEXT:
            if (key, over) in self.best and (key, under) in self.best:
                ratio = self._ratio(key, over, under, self.best)
                out.append(
                    f"{over} ({self.best[key, over]:,.3f} s) / {under} "
                    f"({self.best[key, under]:.3f} s): {ratio:,.2f}x"
                )
        if self.memory:
            found = self.memory
            met = "met" if found["peak_rss_mb"] <= GOAL_RSS_MB else "missed"
            out.append(
                f"peak RSS, {found['arrow_gib']:.2f} GiB scan_parquet ({found['rows_in']:,} rows) "
                f"with store and sink, max_concurrency={MEMORY_CONCURRENCY}: "
                f"{found['peak_rss_mb']:.0f} MB (after imports {found['baseline_rss_mb']:.0f} MB)"
                f", {found['seconds']:.1f} s; goal <= {GOAL_RSS_MB} MB: {met}"
            )
        return out

    @staticmethod
    def _ratio(case: str, over: str, under: str, seconds: dict[tuple[str, str], float]) -> float:
        return seconds[case, over] / seconds[case, under]


class _Summary:
    """Prints the report after pytest-benchmark's tables."""

    def __init__(self, report: StateReport) -> None:
        self.report = report

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        lines = self.report.lines()
        if not lines:
            return
        terminalreporter.section("arrowflow state store against doing it by hand")
        terminalreporter.write_line(
            f"best of {STATE_ROUNDS} rounds, arrowflow and its baseline alternating in each"
        )
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def state_report(pytestconfig: pytest.Config) -> StateReport:
    report = StateReport()
    pytestconfig.pluginmanager.register(_Summary(report), "arrowflow-state-summary")
    return report


# --------------------------------------------------------------------------- inputs and stores


@pytest.fixture(scope="module")
def small_table(table: pa.Table) -> pa.Table:
    """The first ``SMALL_ROWS`` rows of the session's table (cases 4 and 5)."""
    return table.slice(0, SMALL_ROWS)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def parquet_input(table: pa.Table, workdir: Path) -> Path:
    path = workdir / "input.parquet"
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def small_parquet(small_table: pa.Table, workdir: Path) -> Path:
    path = workdir / "small-input.parquet"
    pq.write_table(small_table, path)
    return path


@pytest.fixture(scope="module")
def prepared(table: pa.Table, workdir: Path) -> Path:
    """A state file holding the results of the rows ``id % 10 < 7``, made by a first run."""
    path = workdir / "prepared.duckdb"
    run_with_store(path, table.filter(is_done(table)), STREAM_SIZE)
    return path


@pytest.fixture(scope="module")
def prepared_all_done(small_table: pa.Table, workdir: Path) -> Path:
    """A state file holding the results of every row of the small table."""
    path = workdir / "prepared-all-done.duckdb"
    run_with_store(path, small_table, STREAM_SIZE)
    return path


def fresh_copy(directory: Path, name: str, prepared: Path | None) -> Path:
    """``directory / name``: a copy of ``prepared``, or no file at all for ``None``."""
    target = directory / name
    for leftover in (target, Path(f"{target}.wal")):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(f"{target}.tmp", ignore_errors=True)
    if prepared is not None:
        shutil.copyfile(prepared, target)
    return target


def timed(seconds: list[float], function: Any, *args: Any) -> Any:
    os.sync()  # each measurement starts with the disk idle, not writing back the last one
    started = time.perf_counter()
    result = function(*args)
    seconds.append(time.perf_counter() - started)
    return result


#: A baseline: a function of a fresh database path and of the arguments given, and the
#: database it starts from (``None``: none).
Baseline = tuple[Callable[..., Any], Path | None, tuple[Any, ...]]


def alternate(
    benchmark: Any,
    state_report: StateReport,
    case: str,
    run: Callable[[Path], Any],
    prepared: Path | None,
    baselines: dict[str, Baseline],
    directory: Path,
) -> tuple[Any, dict[str, Any]]:
    """``run`` timed by pytest-benchmark over ``STATE_ROUNDS`` rounds, each on a fresh copy of
    ``prepared`` in ``directory``; before each round, the ``baselines`` run on fresh copies of
    theirs and are timed here. Returns arrowflow's last result and each baseline's last."""
    seconds: dict[str, list[float]] = {name: [] for name in baselines}
    last: dict[str, Any] = {}

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        last.clear()  # the last round's results only: they are large
        for number, (name, (function, start, args)) in enumerate(baselines.items()):
            path = fresh_copy(directory, f"baseline-{number}.duckdb", start)
            last[name] = timed(seconds[name], function, path, *args)
        path = fresh_copy(directory, "run.duckdb", prepared)
        os.sync()
        return (path,), {}

    result = benchmark.pedantic(run, setup=setup, rounds=STATE_ROUNDS, iterations=1)
    state_report.add(case, CASES[case].measured, list(benchmark.stats.stats.data))
    for name, times in seconds.items():
        state_report.add(case, name, times)
    return result, last


# --------------------------------------------------------------------------- cases 1 to 5


def _check(result: af.PipelineResult, by_hand: pa.Table, skipped: int) -> None:
    """arrowflow's rows are the baseline's: same rows, same order, same types."""
    rows = result["rows"]
    assert rows.schema.equals(by_hand.schema), (rows.schema, by_hand.schema)
    assert rows.equals(by_hand)
    assert result.stats[0]["skipped_items"] == skipped


@pytest.mark.parametrize(
    ("case", "stream_size"),
    [("table", STREAM_SIZE), ("table-small-streams", SMALL_STREAM_SIZE)],
)
@pytest.mark.benchmark(group="state: resume a table input")
def test_resume_table(
    benchmark: Any,
    table: pa.Table,
    prepared: Path,
    workdir: Path,
    state_report: StateReport,
    case: str,
    stream_size: int,
) -> None:
    baselines: dict[str, Baseline] = {"by hand": (by_hand_resume, prepared, (table,))}
    if case == "table-small-streams":
        baselines[BY_HAND_STREAMS] = (by_hand_streams, prepared, (table, stream_size))
    result, last = alternate(
        benchmark,
        state_report,
        case,
        lambda path: run_with_store(path, table, stream_size),
        prepared,
        baselines,
        workdir,
    )
    for rows in last.values():
        _check(result, rows, pc.sum(is_done(table)).as_py())
    assert result["rows"]["y"].equals(pc.multiply(table["x"], 2.0))


@pytest.mark.benchmark(group="state: resume a lazy input")
def test_resume_lazy(
    benchmark: Any,
    table: pa.Table,
    parquet_input: Path,
    prepared: Path,
    workdir: Path,
    state_report: StateReport,
) -> None:
    def table_input(path: Path) -> af.PipelineResult:
        return run_with_store(path, table, STREAM_SIZE)

    result, last = alternate(
        benchmark,
        state_report,
        "lazy",
        lambda path: run_with_store(path, parquet_input, STREAM_SIZE),
        prepared,
        {
            CASES["lazy"].baseline: (table_input, prepared, ()),
            BY_HAND_PARQUET: (by_hand_resume, prepared, (parquet_input,)),
        },
        workdir,
    )
    _check(result, last[BY_HAND_PARQUET], pc.sum(is_done(table)).as_py())
    assert result["rows"].equals(last[CASES["lazy"].baseline]["rows"])


@pytest.mark.benchmark(group="state: lazy input, 5,000 per stream")
def test_rerun_all_done(
    benchmark: Any,
    small_parquet: Path,
    prepared_all_done: Path,
    workdir: Path,
    state_report: StateReport,
) -> None:
    result, last = alternate(
        benchmark,
        state_report,
        "all-done",
        lambda path: run_with_store(path, small_parquet, LAZY_STREAM_SIZE),
        prepared_all_done,
        {CASES["all-done"].baseline: (by_hand_load, prepared_all_done, (small_parquet,))},
        workdir,
    )
    _check(result, last[CASES["all-done"].baseline], SMALL_ROWS)


@pytest.mark.benchmark(group="state: lazy input, 5,000 per stream")
def test_first_run(
    benchmark: Any,
    small_table: pa.Table,
    small_parquet: Path,
    workdir: Path,
    state_report: StateReport,
) -> None:
    result, last = alternate(
        benchmark,
        state_report,
        "first-run",
        lambda path: run_with_store(path, small_parquet, LAZY_STREAM_SIZE),
        None,
        {CASES["first-run"].baseline: (by_hand_first_run, None, (small_parquet,))},
        workdir,
    )
    _check(result, last[CASES["first-run"].baseline], 0)
    assert result["rows"].equals(double_x(small_table))


# --------------------------------------------------------------------------- per record


@pytest.mark.benchmark(group="state: per record")
def test_per_record_queries(
    benchmark: Any, table: pa.Table, prepared: Path, workdir: Path, state_report: StateReport
) -> None:
    path = fresh_copy(workdir, "per-record.duckdb", prepared)
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
    state_report.add("table", PER_RECORD, [benchmark.stats.stats.min * scale])


# --------------------------------------------------------------------------- peak RSS


def rss_child(data: str, store: str, out: str) -> dict[str, Any]:
    """A first run over ``data`` into a new store and a Parquet sink, measured from inside the
    process that does it."""
    import resource

    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with DuckDBState(store, table=TABLE) as state:
        flow = resumable_flow(state, MEMORY_STREAM_SIZE, max_concurrency=MEMORY_CONCURRENCY)
        result = flow.run(rows=af.scan_parquet(data), sink=out, progress=False)
    seconds = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # A dataset scan left open when the interpreter exits may crash it (apache/arrow#36389).
    result["rows"].close()
    with duckdb.connect(store, read_only=True) as con:
        (stored,) = con.sql(f"SELECT count(*) FROM {DONE}").fetchall()[0]
    return {
        "seconds": seconds,
        "rows_in": result.stats[0]["total_items"],
        "rows_out": pq.read_metadata(out).num_rows,
        "stored": stored,
        "peak_rss_mb": peak_kb / 1024,
        "baseline_rss_mb": baseline_kb / 1024,
    }


@pytest.mark.benchmark(group="state: peak RSS")
def test_peak_rss_scan_with_store_and_sink(
    benchmark: Any, tmp_path: Path, state_report: StateReport
) -> None:
    """Case 6, in a child process started as ``test_memory.py`` starts its own (see there why
    through a launcher): its peak RSS is its own, not pytest's."""
    data = dataset_dir(MEMORY_GB)
    store, out = tmp_path / "state.duckdb", tmp_path / "out.parquet"
    command = [sys.executable, __file__, str(data), str(store), str(out)]

    def run() -> dict[str, Any]:
        completed = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, *command], capture_output=True, text=True, check=False
        )
        if completed.returncode != 0:
            raise RuntimeError(f"peak RSS child failed:\n{completed.stderr}")
        found: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
        return found

    found = benchmark.pedantic(run, rounds=1, iterations=1)
    for written in (store, out):  # a few GB with the default size: not kept for pytest's sake
        written.unlink()
    assert found["rows_in"] == found["rows_out"] == found["stored"] > 0
    summary = json.loads((data / "_COMPLETE").read_text())
    found["arrow_gib"] = summary["arrow_bytes"] / GIB
    state_report.memory = found
    benchmark.extra_info.update(found)


if __name__ == "__main__":
    print(json.dumps(rss_child(*sys.argv[1:4])))
