"""A DuckDB query streamed into a scope lazily, against the same query collected first.

The query yields ``ARROWFLOW_BENCH_LAZY_ROWS`` rows (20,000,000 by default) of four 8-byte
columns: ``id``, ``x = id * 2``, ``k = id % 1024`` and ``f = id * 0.5``. One agent, 100,000 rows
per stream, keeps the rows where ``k % 3 != 0`` and returns their count and the sum of their
``x``: one row per stream, so what a run holds is its input.

- **lazy**: ``flow.run(rows=con.sql(q))``: arrowflow reads the relation's streaming reader.
- **collected**: ``flow.run(rows=con.sql(q).to_arrow_table())``: the whole result first, then
  the same scope.

Throughput: in this process, the two alternate (pytest-benchmark times the lazy rounds; before
each, the collected one runs and is timed here), after one warm-up round each; both results are
checked equal. Peak memory: each runner once more in a child process of its own, its resident
memory (RSS) sampled every millisecond above what it held after a warm-up run on 200,000 rows.
RSS, not Arrow's memory pool: DuckDB allocates the Arrow data it exports, so the pool sees none
of it. Goals (printed at the end, never asserted): lazy throughput at least 0.9x the collected
one, lazy peak at most 0.2x.

Run with::

    python -m pytest benchmarks/test_lazy_inputs.py --benchmark-only -p no:cacheprovider
    ARROWFLOW_BENCH_LAZY_ROWS=2000000 python -m pytest benchmarks/test_lazy_inputs.py \\
        --benchmark-only -p no:cacheprovider

``ARROWFLOW_BENCH_LAZY_ROUNDS`` (5) sets the timed rounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

import arrowflow as af

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import Figures

ROWS = int(os.environ.get("ARROWFLOW_BENCH_LAZY_ROWS", "20000000"))
ROUNDS = int(os.environ.get("ARROWFLOW_BENCH_LAZY_ROUNDS", "5"))
STREAM_SIZE = 100_000
QUERY = (
    "select range as id, range * 2 as x, range % 1024 as k, range * 0.5::double as f from range({})"
)
GOAL_THROUGHPUT = 0.9
GOAL_MEMORY = 0.2
TITLE = "lazy DuckDB input against the query collected first"


def _flow() -> af.Flow:
    @af.intelligent_streaming(STREAM_SIZE, over="rows")
    class Summarise(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            rows = context["rows"]
            kept = rows.filter(pc.not_equal(pc.remainder(rows["k"], 3), 0))
            return {"rows": pa.table({"kept": [kept.num_rows], "x": [pc.sum(kept["x"]).as_py()]})}

    return af.Flow(Summarise)


def _runner(name: str, rows: int) -> Callable[[], pa.Table]:
    """One run of ``name`` over ``rows`` rows, on a connection of its own."""
    flow = _flow()

    def run() -> pa.Table:
        relation = duckdb.connect().sql(QUERY.format(rows))
        source = relation if name == "lazy" else relation.to_arrow_table()
        result: pa.Table = flow.run(rows=source, progress=False)["rows"]
        return result

    return run


# --------------------------------------------------------------------------- peak memory


class _ResidentMemory:
    """The most resident memory the process held beyond what it held at the start, sampled
    every millisecond by a thread of its own (Linux: ``/proc/self/statm``)."""

    def __init__(self) -> None:
        self.peak = 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._start = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _now(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self._page

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


def child(name: str, rows: int) -> dict[str, Any]:
    """One measured run of ``name``, in the process that does it."""
    _runner(name, 200_000)()  # DuckDB's threads and arrowflow's imports started
    run = _runner(name, rows)
    with _ResidentMemory() as memory:
        started = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - started
    return {"peak_rss": memory.peak, "seconds": seconds, "kept": sum(result["kept"].to_pylist())}


def run_child(name: str) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, __file__, name, str(ROWS)], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{name} child failed:\n{completed.stderr}")
    measured: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return measured


# --------------------------------------------------------------------------- benchmark


def test_lazy_duckdb_input(benchmark: Any, figures: Figures) -> None:
    benchmark.group = f"lazy DuckDB input ({ROWS:,} rows, {STREAM_SIZE:,} per stream)"
    lazy, collected = _runner("lazy", ROWS), _runner("collected", ROWS)
    seconds: list[float] = []
    last: list[pa.Table] = []

    def collected_round() -> None:
        started = time.perf_counter()
        result = collected()
        seconds.append(time.perf_counter() - started)
        last[:] = [result]

    result = benchmark.pedantic(
        lazy, setup=collected_round, rounds=ROUNDS, iterations=1, warmup_rounds=1
    )
    assert result.equals(last[0])
    memory = {name: run_child(name) for name in ("lazy", "collected")}
    assert memory["lazy"]["kept"] == memory["collected"]["kept"] == sum(result["kept"].to_pylist())

    best_lazy, best_collected = benchmark.stats.stats.min, min(seconds[-ROUNDS:])
    throughput = best_collected / best_lazy
    peak = memory["lazy"]["peak_rss"] / memory["collected"]["peak_rss"]
    benchmark.extra_info.update(
        collected_seconds=best_collected,
        lazy_peak_rss=memory["lazy"]["peak_rss"],
        collected_peak_rss=memory["collected"]["peak_rss"],
    )
    heading = (
        f"{ROWS:,} rows of 4 x 8 bytes, {STREAM_SIZE:,} per stream, best of {ROUNDS} rounds; "
        "peak RSS of one run in a child process"
    )
    lines = [
        f"{name:>10}: {best:6.3f} s  {ROWS / best / 1e6:6.2f} M rows/s  peak RSS "
        f"{memory[name]['peak_rss'] / 1e6:6.0f} MB"
        for name, best in (("lazy", best_lazy), ("collected", best_collected))
    ]
    lines.append(
        f"throughput lazy / collected: {throughput:.2f}x, goal >= {GOAL_THROUGHPUT}x: "
        + ("met" if throughput >= GOAL_THROUGHPUT else "missed")
    )
    lines.append(
        f"peak memory lazy / collected: {peak:.2f}x, goal <= {GOAL_MEMORY}x: "
        + ("met" if peak <= GOAL_MEMORY else "missed")
    )
    figures.add(TITLE, heading, *lines)


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], int(sys.argv[2]))))
