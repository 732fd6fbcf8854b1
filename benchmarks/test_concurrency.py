"""How close concurrent streams come to the ideal time of slow, I/O-bound agents.

Each stream's agent waits ``WAIT`` seconds: ``time.sleep`` in a thread, or ``asyncio.sleep`` in
an ``async def call`` agent on the event loop. With ``max_concurrency=LIMIT`` the ideal run takes
``STREAMS * WAIT / LIMIT`` seconds; the figure reported is ideal / measured time (1.0 is perfect,
the goal is at least 0.9).

``ARROWFLOW_BENCH_STREAMS`` sets the number of streams (default 200).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pytest

import arrowflow as af

if TYPE_CHECKING:
    from conftest import Figures

STREAMS = int(os.environ.get("ARROWFLOW_BENCH_STREAMS", "200"))
WAIT = 0.05
LIMIT = 16
GOAL = 0.9


def waiting_flow(kind: str) -> af.Flow:
    """One agent waiting ``WAIT`` seconds per stream of one row, ``LIMIT`` streams at once."""
    streaming = af.intelligent_streaming(1, over="rows", max_concurrency=LIMIT)

    if kind == "threads":

        @streaming
        class Blocking(af.Agent):
            def call(self, context: Any) -> None:
                time.sleep(WAIT)

        return af.Flow(Blocking)

    @streaming
    class Awaiting(af.Agent):
        async def call(self, context: Any) -> None:
            await asyncio.sleep(WAIT)

    return af.Flow(Awaiting)


@pytest.mark.parametrize("kind", ["threads", "async"])
def test_concurrent_waits(benchmark: Any, figures: Figures, rounds: int, kind: str) -> None:
    benchmark.group = f"{STREAMS} streams waiting {WAIT * 1000:.0f} ms, max_concurrency={LIMIT}"
    flow = waiting_flow(kind)
    rows = pa.table({"n": pa.array(range(STREAMS), pa.int64())})

    def run() -> af.PipelineResult:
        return flow.run(rows=rows, progress=False)

    result = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)

    assert result.stats[0]["successful_batches"] == STREAMS
    ideal = STREAMS * WAIT / LIMIT
    stats = benchmark.stats.stats
    best, median = ideal / stats.min, ideal / stats.median
    met = "met" if best >= GOAL else "missed"
    figures.add(
        "arrowflow concurrency: ideal time / measured time",
        f"{STREAMS} streams x {WAIT * 1000:.0f} ms, max_concurrency={LIMIT}, ideal "
        f"{ideal:.3f} s, best of {rounds} rounds",
        f"{kind:>8}: best {stats.min:.3f} s -> {best:.2f}  (median {stats.median:.3f} s -> "
        f"{median:.2f})  goal >= {GOAL}: {met}",
    )
