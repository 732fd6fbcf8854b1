"""Engines: the same flows run locally and on a local Ray runtime (``engine="ray"``).

One warm runtime for the module (``af.RayEngine(keep_running=True)``, this machine's CPUs),
stopped at the end; every benchmark runs one warm-up round first, so the figures are those of
a warm runtime and warm actors (the first run of a cold one pays about a second to start them).

(a) **Vectorised work**: the three steps of ``test_overhead.py`` on ``ARROWFLOW_BENCH_ENGINE_ROWS``
    rows (default 2,000,000) at 10,000 rows per stream: local (one stream at a time, the
    fastest way locally) against Ray (``max_concurrency=2``), and a bare Ray Data ``map_batches``
    pipeline doing the same steps with order preserved, the alternative design. Reported: the
    ratio to local and Ray's overhead per stream.
(b) **Waiting agents**: 200 streams whose agent sleeps 50 ms, ``max_concurrency=16``: local
    threads against Ray, as efficiency against the ideal 0.625 s. Goal on Ray: >= 0.8.
(c) **CPU-bound Python**: an agent hashing each row in a Python loop (the GIL is held
    throughout), ``max_concurrency=2`` on 2 cores: local threads against Ray's processes. Goal:
    Ray >= 1.6x faster.

``ARROWFLOW_BENCH_ENGINE_ROUNDS`` sets the timed rounds (default 5).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pytest
import ray
import ray.data

import arrowflow as af
from test_overhead import STEPS, AddId, DoubleX, DropThirds, hand_loop

if TYPE_CHECKING:
    from conftest import Figures

ROWS = int(os.environ.get("ARROWFLOW_BENCH_ENGINE_ROWS", "2000000"))
ROUNDS = int(os.environ.get("ARROWFLOW_BENCH_ENGINE_ROUNDS", "5"))
STREAM_SIZE = 10_000
WAIT, WAITING_STREAMS, LIMIT = 0.05, 200, 16
WAIT_GOAL, CPU_GOAL = 0.8, 1.6
HASH_ROWS, HASH_ROUNDS = 40_000, 200
TITLE = "engines: local against Ray (best of rounds, warm runtime)"


@pytest.fixture(scope="module")
def engine() -> Iterator[af.RayEngine]:
    """The warm engine; its first run starts the runtime (before Ray Data could start one of
    its own, whose workers would not import this module)."""
    engine = af.RayEngine(keep_running=True)
    af.Flow(Hashes).run(rows=pa.table({"name": ["warm-up"]}), engine=engine, progress=False)
    yield engine
    engine.shutdown()


def interleaved(runners: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Each runner once per round, in the same order (a warm-up round first, not kept)."""
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for round_ in range(rounds + 1):
        for name, run in runners.items():
            started = time.perf_counter()
            run()
            if round_:
                seconds[name].append(time.perf_counter() - started)
    return seconds


def three_steps(stream_size: int, max_concurrency: int) -> af.Flow:
    @af.intelligent_streaming(stream_size, over="rows", max_concurrency=max_concurrency)
    class EngineDoubleX(DoubleX):
        pass

    return EngineDoubleX >> DropThirds >> AddId


def steps(batch: pa.Table) -> pa.Table:
    for step in STEPS:
        batch = step(batch)
    return batch


def map_batches(table: pa.Table) -> pa.Table:
    """The alternative: Ray Data over the table, the three steps per batch, order kept."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    dataset = ray.data.from_arrow(table).map_batches(
        steps, batch_format="pyarrow", batch_size=STREAM_SIZE, zero_copy_batch=True
    )
    return pa.concat_tables(ray.get(dataset.to_arrow_refs()))


def test_vectorised_work(
    benchmark: Any, engine: af.RayEngine, figures: Figures, table: pa.Table
) -> None:
    rows = table.slice(0, ROWS)  # fewer when the session's table is smaller
    benchmark.group = f"engines: three vectorised steps, {rows.num_rows:,} rows"
    expected = hand_loop(rows, STREAM_SIZE)
    local, remote = three_steps(STREAM_SIZE, 1), three_steps(STREAM_SIZE, 2)
    results: dict[str, pa.Table] = {}

    def keep(name: str, run: Callable[[], pa.Table]) -> Callable[[], None]:
        return lambda: results.__setitem__(name, run())

    seconds = interleaved(
        {
            "local": keep("local", lambda: local.run(rows=rows, progress=False)["rows"]),
            "map_batches": keep("map_batches", lambda: map_batches(rows)),
        },
        ROUNDS,
    )

    def on_ray() -> pa.Table:
        result: pa.Table = remote.run(rows=rows, engine=engine, progress=False)["rows"]
        return result

    results["ray"] = benchmark.pedantic(on_ray, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    for result in results.values():
        assert result.equals(expected)
    best = {name: min(times) for name, times in seconds.items()}
    best["ray"] = benchmark.stats.stats.min
    streams = -(-rows.num_rows // STREAM_SIZE)
    overhead_ms = (best["ray"] - best["local"]) / streams * 1e3
    figures.add(
        TITLE,
        f"(a) three vectorised steps, {rows.num_rows:,} rows, {STREAM_SIZE:,} rows/stream "
        f"({streams} streams), best of {ROUNDS}",
        f"    local {best['local']:.3f} s, Ray {best['ray']:.3f} s "
        f"({best['ray'] / best['local']:.2f}x local, {overhead_ms:.2f} ms/stream more), "
        f"Ray Data map_batches {best['map_batches']:.3f} s "
        f"({best['map_batches'] / best['local']:.2f}x local)",
    )


def test_waiting_agents(benchmark: Any, engine: af.RayEngine, figures: Figures) -> None:
    benchmark.group = f"engines: {WAITING_STREAMS} streams waiting {WAIT * 1000:.0f} ms"

    @af.intelligent_streaming(1, over="rows", max_concurrency=LIMIT)
    class Waits(af.Agent):
        def call(self, context: Any) -> None:
            time.sleep(WAIT)

    rows = pa.table({"n": pa.array(range(WAITING_STREAMS), pa.int64())})
    seconds = interleaved({"local": lambda: af.Flow(Waits).run(rows=rows, progress=False)}, ROUNDS)

    def on_ray() -> af.PipelineResult:
        return af.Flow(Waits).run(rows=rows, engine=engine, progress=False)

    result = benchmark.pedantic(on_ray, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert result.stats[0]["successful_batches"] == WAITING_STREAMS
    ideal = WAITING_STREAMS * WAIT / LIMIT
    local, remote = min(seconds["local"]), benchmark.stats.stats.min
    met = "met" if ideal / remote >= WAIT_GOAL else "missed"
    figures.add(
        TITLE,
        f"(b) {WAITING_STREAMS} streams x {WAIT * 1000:.0f} ms, max_concurrency={LIMIT}, "
        f"ideal {ideal:.3f} s",
        f"    local threads {local:.3f} s -> {ideal / local:.2f} of ideal; Ray {remote:.3f} s "
        f"-> {ideal / remote:.2f} of ideal (median {ideal / benchmark.stats.stats.median:.2f})"
        f"  goal >= {WAIT_GOAL}: {met}",
    )


def hashed(values: list[str]) -> list[str]:
    digests = []
    for value in values:
        data = value.encode()
        for _ in range(HASH_ROUNDS):
            data = hashlib.sha256(data).digest()
        digests.append(data.hex())
    return digests


@af.intelligent_streaming(2_000, over="rows", max_concurrency=2)
class Hashes(af.Agent):
    """Pure Python per row: holds the GIL for the whole stream."""

    def call(self, context: Any) -> dict[str, Any]:
        rows = context["rows"]
        digests = hashed(rows["name"].to_pylist())
        return {"rows": rows.append_column("digest", pa.array(digests, pa.string()))}


def test_cpu_bound_python(benchmark: Any, engine: af.RayEngine, figures: Figures) -> None:
    benchmark.group = f"engines: per-row hashing in Python, {HASH_ROWS:,} rows"
    rows = pa.table({"name": pa.array([f"company-{i}" for i in range(HASH_ROWS)])})
    flow = af.Flow(Hashes)
    expected = rows.append_column("digest", pa.array(hashed(rows["name"].to_pylist())))
    seconds = interleaved({"local": lambda: flow.run(rows=rows, progress=False)}, ROUNDS)

    def on_ray() -> pa.Table:
        result: pa.Table = flow.run(rows=rows, engine=engine, progress=False)["rows"]
        return result

    assert benchmark.pedantic(on_ray, rounds=ROUNDS, iterations=1, warmup_rounds=1).equals(expected)
    local, remote = min(seconds["local"]), benchmark.stats.stats.min
    speedup = local / remote
    met = "met" if speedup >= CPU_GOAL else "missed"
    figures.add(
        TITLE,
        f"(c) per-row hashing in Python, {HASH_ROWS:,} rows, max_concurrency=2, "
        f"{os.cpu_count()} cores",
        f"    local threads {local:.3f} s, Ray {remote:.3f} s: Ray {speedup:.2f}x faster  "
        f"goal >= {CPU_GOAL}x: {met}",
    )
