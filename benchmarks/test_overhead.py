"""Overhead of a streaming scope against the loop a user would write by hand.

Both run the same three vectorised steps over every stream of the same table, in alternating
rounds: add ``y = x * 2``, drop the rows where ``k % 3 == 0``, add ``z = y + id``. The
hand-written loop is ``Table.slice`` + those steps + ``pa.concat_tables``; arrowflow runs them as
three agents in a scope started by ``intelligent_streaming``. What arrowflow adds per stream
(contexts, metadata, hooks lookup, statistics, merge) is the difference.

Run with ``make bench``, or::

    ARROWFLOW_BENCH_ROWS=1000000 python -m pytest benchmarks --benchmark-only
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

import arrowflow as af

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from conftest import Figures, OverheadReport

STREAM_SIZES = [1_000, 10_000, 100_000]


def double_x(rows: pa.Table) -> pa.Table:
    return rows.append_column("y", pc.multiply(rows["x"], 2.0))


def drop_thirds(rows: pa.Table) -> pa.Table:
    return rows.filter(pc.not_equal(pc.remainder(rows["k"], 3), 0))


def add_id(rows: pa.Table) -> pa.Table:
    return rows.append_column("z", pc.add(rows["y"], pc.cast(rows["id"], pa.float64())))


STEPS: list[Callable[[pa.Table], pa.Table]] = [double_x, drop_thirds, add_id]


def hand_loop(table: pa.Table, stream_size: int) -> pa.Table:
    parts = []
    for offset in range(0, table.num_rows, stream_size):
        part = table.slice(offset, stream_size)
        for step in STEPS:
            part = step(part)
        parts.append(part)
    return pa.concat_tables(parts)


class DoubleX(af.Agent):
    def call(self, context: Mapping[str, Any]) -> dict[str, Any]:
        return {"rows": double_x(context["rows"])}


class DropThirds(af.Agent):
    def call(self, context: Mapping[str, Any]) -> dict[str, Any]:
        return {"rows": drop_thirds(context["rows"])}


class AddId(af.Agent):
    def call(self, context: Mapping[str, Any]) -> dict[str, Any]:
        return {"rows": add_id(context["rows"])}


def streamed_flow(stream_size: int) -> af.Flow:
    @af.intelligent_streaming(stream_size, over="rows")
    class StreamedDoubleX(DoubleX):
        pass

    return StreamedDoubleX >> DropThirds >> AddId


def alternate(
    benchmark: Any,
    hand: Callable[[], pa.Table],
    flow: af.Flow,
    table: pa.Table,
    rounds: int,
    expected: pa.Table,
) -> list[float]:
    """``flow`` over ``table`` timed by pytest-benchmark for ``rounds`` rounds (after one warm-up
    round); before each, untimed by it, ``hand`` runs and is timed here, so the two alternate and
    share the machine's state. Returns the hand rounds' seconds (the warm-up's left out).

    Both results are first checked equal to ``expected``. In the rounds each result is dropped
    as it returns, inside its own timing: neither side runs while the other's result (one chunk
    per stream, tens of thousands of small objects) is still held, which slowed both, by up to
    40% for the hand loop, in ways that depended on which one was held.
    """
    assert hand().equals(expected)
    assert flow.run(rows=table, progress=False)["rows"].equals(expected)
    seconds: list[float] = []

    def hand_round() -> None:
        started = time.perf_counter()
        hand()
        seconds.append(time.perf_counter() - started)

    def arrowflow_round() -> None:
        flow.run(rows=table, progress=False)

    benchmark.pedantic(
        arrowflow_round, setup=hand_round, rounds=rounds, iterations=1, warmup_rounds=1
    )
    return seconds[-rounds:]


@pytest.fixture(scope="session")
def expected(table: pa.Table) -> pa.Table:
    """The three steps over the whole table at once: what every run must return."""
    return hand_loop(table, max(table.num_rows, 1))


@pytest.mark.parametrize("stream_size", STREAM_SIZES, ids=lambda size: f"{size}")
def test_overhead(
    benchmark: Any,
    table: pa.Table,
    expected: pa.Table,
    overhead_report: OverheadReport,
    rounds: int,
    stream_size: int,
) -> None:
    """arrowflow's rounds are timed by pytest-benchmark; before each, untimed by it, the hand
    loop runs and is timed here, so the two alternate and share the machine's state."""
    benchmark.group = f"stream size {stream_size:,} ({table.num_rows:,} rows)"
    flow = streamed_flow(stream_size)
    timed = alternate(
        benchmark, lambda: hand_loop(table, stream_size), flow, table, rounds, expected
    )
    overhead_report.add(stream_size, "hand_loop", min(timed), statistics.median(timed), rounds)
    stats = benchmark.stats.stats
    overhead_report.add(stream_size, "arrowflow", stats.min, stats.median, rounds)


# --------------------------------------------------------------------------- identity steps

IDENTITY_STREAM_SIZE = 1_000
GOAL_IDENTITY_US = 10.0


class Identity(af.Agent):
    def call(self, context: Mapping[str, Any]) -> dict[str, Any]:
        return {"rows": context["rows"]}


def identity_flow(stream_size: int) -> af.Flow:
    @af.intelligent_streaming(stream_size, over="rows")
    class StreamedIdentity(Identity):
        pass

    return StreamedIdentity >> Identity >> Identity


def test_overhead_of_steps_that_do_nothing(
    benchmark: Any, table: pa.Table, figures: Figures, rounds: int
) -> None:
    """Three agents returning their input, against ``Table.slice`` + ``pa.concat_tables``: what
    a stream costs arrowflow itself (contexts, metadata, attempts, statistics, merge)."""
    size = IDENTITY_STREAM_SIZE
    benchmark.group = f"identity steps, stream size {size:,} ({table.num_rows:,} rows)"

    def slices() -> pa.Table:
        return pa.concat_tables(
            [table.slice(offset, size) for offset in range(0, table.num_rows, size)]
        )

    hand_seconds = alternate(benchmark, slices, identity_flow(size), table, rounds, table)
    hand = min(hand_seconds)
    best = benchmark.stats.stats.min
    per_stream = (best - hand) / -(-table.num_rows // size) * 1e6
    met = "met" if per_stream <= GOAL_IDENTITY_US else "missed"
    figures.add(
        "arrowflow overhead with steps that do nothing",
        f"three identity agents, {table.num_rows:,} rows, {size:,} per stream, best of {rounds}",
        f"slice + concat {hand:.3f} s, arrowflow {best:.3f} s: {per_stream:.1f} us per stream, "
        f"goal <= {GOAL_IDENTITY_US:.0f} us: {met}",
    )
