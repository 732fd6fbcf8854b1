"""Concurrent streams, async agents, timeouts, retries and bounded memory (DESIGN §3, §4).

Out-of-order completion is forced with events, never with sleeps: in each group of
``max_concurrency`` streams, stream k waits until stream k + 1 has finished, so the group finishes
last-to-first. Every wait has a generous timeout, so a scheduling bug fails a test instead of
hanging it.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import arrowflow as af
from arrowflow import _retry

WAIT = 10.0  # seconds any test waits for another stream before declaring a deadlock
BLOCK = 30.0  # seconds an abandoned attempt blocks; the run must end long before


class Boom(Exception):
    """The error the failing agents of these tests raise."""


def _slices(table: pa.Table, size: int) -> list[pa.Table]:
    return [table.slice(offset, size) for offset in range(0, table.num_rows, size)]


def _tag(table: pa.Table, stream_num: int) -> pa.Table:
    return table.append_column("stream", pa.array([stream_num] * table.num_rows, pa.int64()))


def _tagged(table: pa.Table, size: int, streams: list[int] | None = None) -> pa.Table:
    """What a scope tagging each row with its stream number returns for ``streams``."""
    pieces = list(enumerate(_slices(table, size), 1))
    chosen = [_tag(piece, k) for k, piece in pieces if streams is None or k in streams]
    if not chosen:
        return _tag(table.slice(0, 0), 0)
    return pa.concat_tables(chosen)


def _stream_num(context: Any) -> int:
    return int(context["_batch_metadata"]["batch_number"])


def _streaming(size: int, **options: Any) -> Any:
    return af.intelligent_streaming(size, over="companies", **options)


class ReverseGroups:
    """Makes each group of ``limit`` streams finish last-to-first, and records the order.

    ``finish(k)`` blocks stream k until stream k + 1 (same group) has finished, then marks k
    finished. The last stream of a group (and of the run) does not wait.
    """

    def __init__(self, limit: int, total: int) -> None:
        self.limit = limit
        self.total = total
        self.done = {k: threading.Event() for k in range(1, total + 2)}
        self.finished: list[int] = []
        self._lock = threading.Lock()

    def waits(self, k: int) -> bool:
        return k % self.limit != 0 and k != self.total

    def finish(self, k: int) -> None:
        if self.waits(k) and not self.done[k + 1].wait(WAIT):
            raise RuntimeError(f"stream {k + 1} never finished: streams are not concurrent")
        self._mark(k)

    async def finish_async(self, k: int, events: dict[int, asyncio.Event]) -> None:
        if self.waits(k):
            async with asyncio.timeout(WAIT):
                await events[k + 1].wait()
        self._mark(k)
        events[k].set()

    def _mark(self, k: int) -> None:
        with self._lock:
            self.finished.append(k)
        self.done[k].set()

    def first_group(self) -> list[int]:
        """How the first group must finish: last stream first."""
        return list(range(min(self.limit, self.total), 0, -1))


class Peak:
    """Counts callers inside a block at once (thread-safe) and remembers the highest count."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        with self._lock:
            self.now -= 1

    def __enter__(self) -> Peak:
        self.enter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.leave()


# --------------------------------------------------------------------------- stream order


LIMITS = [2, 4]


@pytest.mark.parametrize("limit", LIMITS)
def test_results_and_stats_in_order_when_later_streams_finish_first(
    make_companies, passthrough, limit: int
) -> None:
    table = make_companies(50)
    groups = ReverseGroups(limit, total=10)

    @_streaming(5, max_concurrency=limit)
    class Work(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            k = _stream_num(context)
            groups.finish(k)
            return {"companies": _tag(context["companies"], k)}

    result = (Work >> passthrough).run(companies=table)

    assert groups.finished[:limit] == groups.first_group()
    assert result["companies"].equals(_tagged(table, 5))
    streams = result.stats[0]["streams"]
    assert streams["stream_num"].to_pylist() == list(range(1, 11))
    assert streams["rows_in"].to_pylist() == [5] * 10


@pytest.mark.parametrize("limit", LIMITS)
def test_on_stream_complete_in_order(make_companies, passthrough, limit: int) -> None:
    table = make_companies(40)
    groups = ReverseGroups(limit, total=8)
    completed: list[tuple[int, int | None, list[int]]] = []

    @_streaming(5, incremental=True, max_concurrency=limit)
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            groups.finish(_stream_num(context))

        def on_stream_complete(self, stream_num: int, total: int, results: pa.Table) -> None:
            completed.append((stream_num, total, results["id"].to_pylist()))

    (Work >> passthrough).run(companies=table)

    assert groups.finished[:limit] == groups.first_group()
    expected = [(k, 8, piece["id"].to_pylist()) for k, piece in enumerate(_slices(table, 5), 1)]
    assert completed == expected


def test_on_stream_complete_once_at_the_end_when_not_incremental(
    make_companies, passthrough
) -> None:
    table = make_companies(40)
    groups = ReverseGroups(4, total=8)
    completed: list[tuple[int, int, pa.Table]] = []

    @_streaming(5, max_concurrency=4)
    class Work(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            k = _stream_num(context)
            groups.finish(k)
            return {"companies": _tag(context["companies"], k)}

        def on_stream_complete(self, stream_num: int, total: int, results: pa.Table) -> None:
            completed.append((stream_num, total, results))

    (Work >> passthrough).run(companies=table)
    assert [(k, total) for k, total, _ in completed] == [(8, 8)]
    assert completed[0][2].equals(_tagged(table, 5))


@pytest.mark.parametrize("limit", LIMITS)
def test_stream_delivers_in_order(make_companies, events, terminator, limit: int) -> None:
    table = make_companies(30)
    groups = ReverseGroups(limit, total=6)

    @_streaming(5, max_concurrency=limit)
    class Work(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            k = _stream_num(context)
            groups.finish(k)
            return {"companies": _tag(context["companies"], k)}

    flow = Work >> terminator
    parts = flow.stream(companies=table)
    delivered = [(part.stream_num, part.total, part.results) for part in parts]

    assert groups.finished[:limit] == groups.first_group()
    assert [(k, total) for k, total, _ in delivered] == [(k, 6) for k in range(1, 7)]
    for k, _, results in delivered:
        assert results.equals(_tagged(table, 5, [k]))
    assert events == [("end", 30)]
    assert parts.result is not None
    assert parts.result["companies"].equals(_tagged(table, 5))


@pytest.mark.parametrize("limit", LIMITS)
def test_persist_each_stream_in_order(make_companies, passthrough, limit: int) -> None:
    table = make_companies(40)
    groups = ReverseGroups(limit, total=8)
    persisted: list[tuple[int, list[int]]] = []

    def persist(results: pa.Table, context: Any) -> None:
        persisted.append((_stream_num(context), results["id"].to_pylist()))

    @_streaming(5, max_concurrency=limit, persist_each_stream=persist)
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            groups.finish(_stream_num(context))

    (Work >> passthrough).run(companies=table)

    assert groups.finished[:limit] == groups.first_group()
    expected = [(k, piece["id"].to_pylist()) for k, piece in enumerate(_slices(table, 5), 1)]
    assert persisted == expected


def test_other_fields_merged_in_stream_order(make_companies, passthrough) -> None:
    table = make_companies(30)
    groups = ReverseGroups(3, total=6)

    @_streaming(5, max_concurrency=3)
    class Work(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            k = _stream_num(context)
            groups.finish(k)
            return {"label": f"stream-{k}", "sums": pa.table({"k": [k]})}

    result = (Work >> passthrough).run(companies=table)

    assert groups.finished[:3] == [3, 2, 1]
    assert result["label"] == [f"stream-{k}" for k in range(1, 7)]
    assert result["sums"]["k"].to_pylist() == list(range(1, 7))
    assert result["companies"].equals(table)


# --------------------------------------------------------------------------- parallelism


@pytest.mark.parametrize("limit", [1, 2, 3, 5])
def test_parallelism_reaches_the_limit_and_never_exceeds_it(
    make_companies, passthrough, limit: int
) -> None:
    """A barrier of ``limit`` parties in the first streams proves they really run at once."""
    barrier = threading.Barrier(limit, timeout=WAIT)
    peak = Peak()

    @_streaming(3, max_concurrency=limit)
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            with peak:
                if _stream_num(context) <= limit:
                    barrier.wait()
                # Give other streams a chance to enter while this one is inside.
                time.sleep(0.001)

    result = (Work >> passthrough).run(companies=make_companies(60))

    assert peak.peak == limit
    assert result.stats[0]["successful_batches"] == 20


@pytest.mark.parametrize("input_kind", ["table", "reader"])
def test_a_free_thread_takes_the_next_stream_while_an_earlier_one_runs(
    make_companies, passthrough, input_kind: str
) -> None:
    """Stream 1 runs until stream 3 has started, on two threads: from a table, stream 3 waits
    for a thread beyond ``max_concurrency`` and the thread that ran stream 2 takes it at once;
    from a reader, no stream is cut beyond ``max_concurrency`` (memory), so stream 3 starts
    only once stream 1 completed."""
    table = make_companies(12)
    third_started = threading.Event()
    waited: list[bool] = []

    @_streaming(3, max_concurrency=2)
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            stream = _stream_num(context)
            if stream == 3:
                third_started.set()
            elif stream == 1:
                waited.append(third_started.wait(WAIT if input_kind == "table" else 0.2))

    source = table if input_kind == "table" else _counting_reader(table, 3, [0])
    result = (Work >> passthrough).run(companies=source)

    assert waited == [input_kind == "table"]
    assert result["companies"].equals(table)
    assert result.stats[0]["successful_batches"] == 4


def test_sequential_scope_runs_one_stream_at_a_time(make_companies, passthrough) -> None:
    peak = Peak()

    @_streaming(3)
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            with peak:
                time.sleep(0.001)

    (Work >> passthrough).run(companies=make_companies(30))
    assert peak.peak == 1


def test_every_agent_of_the_scope_counts_in_the_limit(make_companies) -> None:
    """Up to ``max_concurrency`` streams, not agents: a stream's agents run one after another."""
    limit = 3
    barrier = threading.Barrier(limit, timeout=WAIT)
    peak = Peak()
    order: dict[int, list[str]] = {}
    lock = threading.Lock()

    def body(name: str, context: Any) -> None:
        k = _stream_num(context)
        with lock:
            order.setdefault(k, []).append(name)
        if name == "First" and k <= limit:
            barrier.wait()

    @_streaming(2, max_concurrency=limit)
    class First(af.Agent):
        def call(self, context: Any) -> None:
            peak.enter()
            body("First", context)

    class Second(af.Agent):
        def call(self, context: Any) -> None:
            body("Second", context)
            peak.leave()

    (First >> Second).run(companies=make_companies(20))
    assert peak.peak == limit
    assert order == {k: ["First", "Second"] for k in range(1, 11)}


# --------------------------------------------------------------------------- async agents


def test_async_agent_in_a_sequential_scope(make_companies, passthrough) -> None:
    table = make_companies(25)

    @_streaming(10)
    class Work(af.Agent):
        async def call(self, context: Any) -> dict[str, Any]:
            await asyncio.sleep(0)
            return {"companies": _tag(context["companies"], _stream_num(context))}

    class Member(af.Agent):
        async def call(self, context: Any) -> dict[str, Any]:
            return {"rows": context["companies"].num_rows}

    @af.ends_batching
    class After(af.Agent):
        async def call(self, context: Any) -> dict[str, Any]:
            return {"total": context["companies"].num_rows}

    result = (Work >> Member >> After).run(companies=table)
    assert result["companies"].equals(_tagged(table, 10))
    assert result["rows"] == [10, 10, 5]
    assert result["total"] == 25


@pytest.mark.parametrize("limit", LIMITS)
def test_async_results_in_order_when_later_streams_finish_first(
    make_companies, passthrough, limit: int
) -> None:
    table = make_companies(40)
    groups = ReverseGroups(limit, total=8)
    events = {k: asyncio.Event() for k in range(1, 10)}
    delivered: list[int] = []

    @_streaming(5, incremental=True, max_concurrency=limit)
    class Work(af.Agent):
        async def call(self, context: Any) -> dict[str, Any]:
            k = _stream_num(context)
            await groups.finish_async(k, events)
            return {"companies": _tag(context["companies"], k)}

        def on_stream_complete(self, stream_num: int, total: int, results: pa.Table) -> None:
            delivered.append(stream_num)

    result = (Work >> passthrough).run(companies=table)

    assert groups.finished[:limit] == groups.first_group()
    assert delivered == list(range(1, 9))
    assert result["companies"].equals(_tagged(table, 5))


@pytest.mark.parametrize("limit", [1, 3, 6])
def test_async_concurrency_reaches_the_limit_and_never_exceeds_it(
    make_companies, passthrough, limit: int
) -> None:
    barrier = asyncio.Barrier(limit)
    peak = Peak()
    loops: set[int] = set()

    @_streaming(2, max_concurrency=limit)
    class Work(af.Agent):
        async def call(self, context: Any) -> None:
            loops.add(id(asyncio.get_running_loop()))
            with peak:
                if _stream_num(context) <= limit:
                    async with asyncio.timeout(WAIT):
                        await barrier.wait()
                await asyncio.sleep(0.001)

    result = (Work >> passthrough).run(companies=make_companies(40))

    assert peak.peak == limit
    assert len(loops) == 1, "async agents run on one event loop"
    assert result.stats[0]["successful_batches"] == 20


def test_async_agent_runs_when_the_caller_already_runs_an_event_loop(
    make_companies, passthrough
) -> None:
    """As in a notebook: ``run()`` called from code running inside an event loop."""
    table = make_companies(12)

    @_streaming(5, max_concurrency=2)
    class Work(af.Agent):
        async def call(self, context: Any) -> dict[str, Any]:
            await asyncio.sleep(0)
            return {"companies": _tag(context["companies"], _stream_num(context))}

    async def notebook_cell() -> pa.Table:
        result: pa.Table = (Work >> passthrough).run(companies=table)["companies"]
        return result

    assert asyncio.run(notebook_cell()).equals(_tagged(table, 5))


# --------------------------------------------------------------------------- bounded memory


def _counting_reader(table: pa.Table, batch_rows: int, pulled: list[int]) -> pa.RecordBatchReader:
    """A reader over ``table`` that counts the batches pulled from it in ``pulled[0]``."""

    def batches() -> Any:
        for batch in table.to_batches(max_chunksize=batch_rows):
            pulled[0] += 1
            yield batch

    return pa.RecordBatchReader.from_batches(table.schema, batches())


@pytest.mark.parametrize("limit", [1, 3])
def test_reader_pulled_only_as_streams_are_scheduled(
    make_companies, passthrough, limit: int
) -> None:
    size, total = 4, 15
    table = make_companies(size * total)
    pulled = [0]
    seen: dict[int, int] = {}
    groups = ReverseGroups(limit, total)

    @_streaming(size, max_concurrency=limit)
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            k = _stream_num(context)
            seen[k] = pulled[0]
            groups.finish(k)

    result = (Work >> passthrough).run(companies=_counting_reader(table, size, pulled))

    assert sorted(seen) == list(range(1, total + 1))
    for k, batches in seen.items():
        assert batches <= k + limit + 2, f"stream {k} ran after {batches} batches were pulled"
    assert pulled[0] == total
    assert result["companies"].equals(table)


class _CountingSink:
    """A sink that drops what it is given: memory held is then the executor's only."""

    def __init__(self) -> None:
        self.written: list[int] = []

    def write(self, table: pa.Table) -> None:
        self.written.append(table.num_rows)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def read_back(self, schema: pa.Schema) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(schema, [])


def _allocating_run(
    limit: int, sink: Any, streams: int, size: int, *, from_table: bool = False
) -> tuple[list[int], af.PipelineResult]:
    """Stream ``streams`` freshly allocated batches (or, ``from_table``, the slices of a table
    allocated before the run) through a scope adding a column.

    Returns Arrow's allocated bytes (over the run's start) seen by each stream's agent, and the
    run's result.
    """
    schema = pa.schema([("x", pa.float64())])
    base = pa.array(range(size), pa.float64())
    table = None
    if from_table:
        table = pa.concat_arrays([pc.add(base, float(k)) for k in range(streams)])
    start = pa.total_allocated_bytes()
    seen: list[int] = []
    lock = threading.Lock()

    def batches() -> Any:
        for k in range(streams):
            yield pa.record_batch([pc.add(base, float(k))], schema=schema)

    @af.intelligent_streaming(size, over="rows", max_concurrency=limit)
    class Double(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            rows = context["rows"]
            doubled = rows.append_column("y", pc.multiply(rows["x"], 2.0))
            with lock:
                seen.append(pa.total_allocated_bytes() - start)
            return {"rows": doubled}

    if table is not None:
        return seen, af.Flow(Double).run(rows=pa.table({"x": table}), sink=sink)
    reader = pa.RecordBatchReader.from_batches(schema, batches())
    return seen, af.Flow(Double).run(rows=reader, sink=sink)


def _column_bytes(size: int) -> int:
    """What Arrow allocates for the column the agent of :func:`_allocating_run` adds to a stream
    of ``size`` rows: a little more than 8 bytes a row (a kernel over a table's column)."""
    rows = pa.table({"x": pa.array(range(size), pa.float64())})
    before = pa.total_allocated_bytes()
    column = pc.multiply(rows["x"], 2.0)
    allocated = pa.total_allocated_bytes() - before
    del column
    return allocated


@pytest.mark.parametrize("limit", [1, 4])
@pytest.mark.parametrize("from_table", [False, True], ids=["reader", "table"])
def test_at_most_limit_plus_two_streams_held(limit: int, from_table: bool) -> None:
    """From a reader, each stream allocates its input column and the added one; from a table in
    memory, only the added one (a slice costs nothing, even one waiting for a thread). Beyond
    the streams, the run holds a few small arrays of its own (``run_bytes``), whatever the
    number of streams."""
    size = 20_000
    stream_bytes = _column_bytes(size) * (1 if from_table else 2)
    run_bytes = 4096
    sink = _CountingSink()
    seen, _ = _allocating_run(limit, sink, streams=60, size=size, from_table=from_table)
    assert sink.written == [size] * 60
    assert max(seen) <= (limit + 2) * stream_bytes + run_bytes, (
        f"{max(seen) / stream_bytes:.1f} streams held at once, at most {limit + 2} allowed"
    )


@pytest.mark.parametrize("limit", [1, 4])
def test_parquet_sink_keeps_memory_flat(tmp_path, limit: int) -> None:
    size, streams = 20_000, 80
    stream_bytes = size * 8 * 2
    sink = af.ParquetSink(tmp_path / "out.parquet")
    seen, result = _allocating_run(limit, sink, streams, size)
    assert isinstance(result["rows"], pa.RecordBatchReader)
    assert sum(batch.num_rows for batch in result["rows"]) == streams * size
    early, late = seen[: streams // 4], seen[streams // 2 :]
    # The writer keeps buffers of its own, but a fixed amount: nothing grows with the streams.
    # Which streams are alive when one is measured varies by up to the streams in flight, and
    # the sink's thread may hold up to three more (one queued, one being encoded, and the
    # encoder's pages).
    sink_streams = 3
    assert max(late) <= max(early) + (limit + 2 + sink_streams) * stream_bytes
    assert max(seen) <= streams * stream_bytes // 4


# --------------------------------------------------------------------------- timeouts


@pytest.mark.parametrize("limit", [1, 3])
def test_timeout_fails_the_attempt_with_timeout_error(
    make_companies, passthrough, limit: int
) -> None:
    release = threading.Event()
    errors: list[tuple[int, BaseException]] = []

    @_streaming(
        5,
        max_concurrency=limit,
        timeout=0.2,
        on_error="continue",
        on_stream_error=lambda k, total, error, context: errors.append((k, error)),
    )
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            if _stream_num(context) == 2:
                release.wait(BLOCK)

    table = make_companies(30)
    started = time.monotonic()
    try:
        result = (Work >> passthrough).run(companies=table)
        elapsed = time.monotonic() - started
    finally:
        release.set()

    assert elapsed < BLOCK / 6, "the run waited for the abandoned attempt"
    assert [(k, type(error)) for k, error in errors] == [(2, TimeoutError)]
    streams = result.stats[0]["streams"]
    assert streams["status"].to_pylist() == ["ok", "failed", "ok", "ok", "ok", "ok"]
    assert streams["error"][1].as_py().startswith("TimeoutError")
    assert result["companies"].equals(pa.concat_tables([table.slice(0, 5), table.slice(10)]))


def test_timeout_raises_batch_execution_error(make_companies, passthrough) -> None:
    release = threading.Event()

    @_streaming(5, max_concurrency=2, timeout=0.2)
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            if _stream_num(context) == 2:
                release.wait(BLOCK)

    started = time.monotonic()
    try:
        with pytest.raises(af.BatchExecutionError) as exc_info:
            (Work >> passthrough).run(companies=make_companies(30))
        elapsed = time.monotonic() - started
    finally:
        release.set()

    assert elapsed < BLOCK / 6
    assert exc_info.value.batch_number == 2
    assert type(exc_info.value.original_error) is TimeoutError
    assert exc_info.value.__cause__ is exc_info.value.original_error


@pytest.mark.parametrize("limit", [1, 3])
def test_timeout_is_retried_and_the_next_attempt_succeeds(
    make_companies, passthrough, limit: int
) -> None:
    release = threading.Event()
    attempts: dict[int, int] = {}
    lock = threading.Lock()

    @_streaming(5, max_concurrency=limit, timeout=0.2, retries=2, backoff=0)
    class Work(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            k = _stream_num(context)
            with lock:
                attempts[k] = attempts.get(k, 0) + 1
                attempt = attempts[k]
            if k == 2 and attempt == 1:
                release.wait(BLOCK)
            return {"companies": _tag(context["companies"], k)}

    table = make_companies(30)
    started = time.monotonic()
    try:
        result = (Work >> passthrough).run(companies=table)
        elapsed = time.monotonic() - started
    finally:
        release.set()

    assert elapsed < BLOCK / 6
    assert result["companies"].equals(_tagged(table, 5))
    assert result.stats[0]["streams"]["attempts"].to_pylist() == [1, 2, 1, 1, 1, 1]
    assert result.stats[0]["failed_batches"] == 0


def test_timeout_not_reached_keeps_every_result(make_companies, passthrough) -> None:
    table = make_companies(30)

    @_streaming(5, max_concurrency=3, timeout=WAIT)
    class Work(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            return {"companies": _tag(context["companies"], _stream_num(context))}

    result = (Work >> passthrough).run(companies=table)
    assert result["companies"].equals(_tagged(table, 5))
    assert result.stats[0]["streams"]["attempts"].to_pylist() == [1] * 6


def test_timeout_of_an_async_agent_cancels_the_coroutine(make_companies, passthrough) -> None:
    cancelled = threading.Event()
    loops: list[asyncio.AbstractEventLoop] = []

    @_streaming(5, max_concurrency=3, timeout=0.2, on_error="continue")
    class Work(af.Agent):
        async def call(self, context: Any) -> None:
            if _stream_num(context) == 2:
                loops.append(asyncio.get_running_loop())
                try:
                    await asyncio.Event().wait()  # never set: only cancellation ends it
                except asyncio.CancelledError:
                    cancelled.set()
                    raise

    started = time.monotonic()
    result = (Work >> passthrough).run(companies=make_companies(20))
    elapsed = time.monotonic() - started

    assert elapsed < BLOCK / 6
    assert cancelled.wait(WAIT), "the timed-out coroutine was never cancelled"
    streams = result.stats[0]["streams"]
    assert streams["status"].to_pylist() == ["ok", "failed", "ok", "ok"]
    assert streams["error"][1].as_py().startswith("TimeoutError")
    assert loops[0].is_closed()  # the run's own loop, closed when the run ended


# --------------------------------------------------------------------------- retries


def _fails(k: int, attempt: int) -> bool:
    """Whether attempt ``attempt`` of stream ``k`` fails: a third of calls, reproducibly."""
    return random.Random(f"flaky-{k}-{attempt}").random() < 1 / 3


def _expected_attempts(streams: int) -> list[int]:
    attempts = []
    for k in range(1, streams + 1):
        attempt = 1
        while _fails(k, attempt):
            attempt += 1
        attempts.append(attempt)
    return attempts


@pytest.mark.parametrize("limit", [1, 4])
def test_flaky_agent_finishes_every_stream(make_companies, passthrough, limit: int) -> None:
    streams = 40
    expected_attempts = _expected_attempts(streams)
    assert max(expected_attempts) <= 7  # retries=6 is enough for this seed
    assert sum(expected_attempts) > streams * 1.3  # and about a third of the calls fail
    table = make_companies(streams * 3)
    calls: dict[int, int] = {}
    lock = threading.Lock()
    errors: list[int] = []

    @_streaming(
        3,
        max_concurrency=limit,
        retries=6,
        backoff=0,
        incremental=True,
        on_stream_error=lambda k, *args: errors.append(k),
    )
    class Flaky(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            k = _stream_num(context)
            with lock:
                calls[k] = calls.get(k, 0) + 1
                attempt = calls[k]
            if _fails(k, attempt):
                raise ConnectionError(f"stream {k}, attempt {attempt}")
            return {"companies": _tag(context["companies"], k)}

    result = (Flaky >> passthrough).run(companies=table)

    assert errors == []
    assert result["companies"].equals(_tagged(table, 3))
    stats = result.stats[0]
    assert stats["successful_batches"] == streams
    assert stats["failed_batches"] == 0
    assert stats["streams"]["attempts"].to_pylist() == expected_attempts
    assert [calls[k] for k in range(1, streams + 1)] == expected_attempts


def _record_backoff(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The backoff delays the run computes, in order; the run then retries without waiting."""
    delays: list[float] = []
    computed = _retry.backoff_delay

    def record(base: float, attempt: int) -> float:
        delays.append(computed(base, attempt))
        return 0.0

    monkeypatch.setattr(_retry, "backoff_delay", record)
    return delays


def test_backoff_is_exponential_with_jitter(make_companies, passthrough, monkeypatch) -> None:
    delays = _record_backoff(monkeypatch)
    calls: dict[int, int] = {}

    @_streaming(5, retries=3, backoff=0.1)
    class Flaky(af.Agent):
        def call(self, context: Any) -> None:
            k = _stream_num(context)
            calls[k] = calls.get(k, 0) + 1
            if calls[k] <= 3:
                raise ConnectionError("try again")

    result = (Flaky >> passthrough).run(companies=make_companies(20))

    assert result.stats[0]["streams"]["attempts"].to_pylist() == [4, 4, 4, 4]
    assert len(delays) == 12
    for retry, delay in enumerate(delays):
        base = 0.1 * 2 ** (retry % 3)
        assert 0.5 * base <= delay <= 1.5 * base, (retry, delay)
    assert len(set(delays)) == len(delays), "the delays are jittered"


def test_backoff_zero_retries_at_once(make_companies, passthrough, monkeypatch) -> None:
    delays = _record_backoff(monkeypatch)
    calls: list[int] = []

    @_streaming(5, retries=2, backoff=0, max_concurrency=2)
    class Flaky(af.Agent):
        def call(self, context: Any) -> None:
            calls.append(_stream_num(context))
            if calls.count(_stream_num(context)) <= 2:
                raise ConnectionError("try again")

    result = (Flaky >> passthrough).run(companies=make_companies(10))
    assert result.stats[0]["streams"]["attempts"].to_pylist() == [3, 3]
    assert all(delay == 0 for delay in delays)


def test_retry_on_other_types_fail_at_once_under_concurrency(make_companies, passthrough) -> None:
    calls: dict[int, int] = {}
    lock = threading.Lock()

    @_streaming(
        5,
        max_concurrency=3,
        retries=5,
        backoff=0,
        retry_on=(ConnectionError,),
        on_error="continue",
    )
    class Picky(af.Agent):
        def call(self, context: Any) -> None:
            k = _stream_num(context)
            with lock:
                calls[k] = calls.get(k, 0) + 1
                attempt = calls[k]
            if k % 2 and attempt == 1:
                raise ConnectionError("retried")
            if k == 4:
                raise ValueError("not retried")

    result = (Picky >> passthrough).run(companies=make_companies(30))
    streams = result.stats[0]["streams"]
    assert streams["attempts"].to_pylist() == [2, 1, 2, 1, 2, 1]
    assert streams["status"].to_pylist() == ["ok", "ok", "ok", "failed", "ok", "ok"]
    assert streams["error"][3].as_py() == "ValueError: not retried"


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("limit", LIMITS)
def test_failure_stops_scheduling_and_keeps_completed_streams_in_order(
    make_companies, limit: int
) -> None:
    table = make_companies(60)
    failing = 3
    timeline: list[tuple[str, int]] = []
    called: set[int] = set()
    persisted: list[int] = []
    lock = threading.Lock()

    def persist(results: pa.Table, context: Any) -> None:
        persisted.append(_stream_num(context))

    @_streaming(
        5,
        max_concurrency=limit,
        persist_each_stream=persist,
        on_stream_start=lambda k, total, context: timeline.append(("start", k)),
        on_stream_error=lambda k, total, error, context: timeline.append(("error", k)),
    )
    class Work(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            k = _stream_num(context)
            with lock:
                called.add(k)
            if k == failing:
                raise Boom(f"boom in stream {k}")
            return {"companies": _tag(context["companies"], k)}

    @af.ends_batching
    class After(af.Agent):
        def call(self, context: Any) -> None:
            raise AssertionError("no agent after the scope runs when it fails")

    with pytest.raises(af.BatchExecutionError) as exc_info:
        (Work >> After).run(companies=table)

    error = exc_info.value
    assert error.batch_number == failing
    assert error.total_batches == 12
    assert isinstance(error.original_error, Boom)
    assert error.__cause__ is error.original_error

    started = [k for event, k in timeline if event == "start"]
    assert started == list(range(1, len(started) + 1))
    # Nothing is scheduled once the failure is known, beyond the streams then in flight:
    # max_concurrency of them, and one waiting for a thread (a slice of a table).
    assert timeline.index(("error", failing)) == len(timeline) - 1
    assert max(started) <= failing + limit - 1 + (limit > 1)
    assert called == set(started)

    completed = sorted(called - {failing})
    assert persisted == completed
    partial = error.partial_results["companies"]
    assert isinstance(partial, pa.Table)
    assert partial.equals(_tagged(table, 5, completed))
    assert set(range(1, failing)) <= set(completed)


def test_failure_waits_for_streams_in_flight(make_companies, passthrough) -> None:
    """A stream in flight when the failure is handled still completes before the raise."""
    failure_seen = threading.Event()
    entered: set[int] = set()
    exited: set[int] = set()
    lock = threading.Lock()

    @_streaming(
        5,
        max_concurrency=2,
        on_stream_error=lambda *args: failure_seen.set(),
    )
    class Work(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            k = _stream_num(context)
            with lock:
                entered.add(k)
            try:
                if k == 3:
                    raise Boom("boom")
                if k == 4 and not failure_seen.wait(WAIT):
                    raise RuntimeError("the failure of stream 3 was never handled")
                return {"companies": _tag(context["companies"], k)}
            finally:
                with lock:
                    exited.add(k)

    table = make_companies(50)
    with pytest.raises(af.BatchExecutionError) as exc_info:
        (Work >> passthrough).run(companies=table)

    # Stream 5 is in flight too if stream 2 completed before stream 3 failed (it waited for a
    # thread beyond max_concurrency): it completes as well.
    assert entered == exited
    assert {1, 2, 3, 4} <= entered <= {1, 2, 3, 4, 5}
    completed = sorted(entered - {3})
    assert exc_info.value.partial_results["companies"].equals(_tagged(table, 5, completed))


def test_stream_stops_delivering_at_the_failure(make_companies, passthrough) -> None:
    @_streaming(5, max_concurrency=3)
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            if _stream_num(context) == 3:
                raise Boom("boom")

    parts = (Work >> passthrough).stream(companies=make_companies(50))
    delivered = [next(parts).stream_num, next(parts).stream_num]
    with pytest.raises(af.BatchExecutionError):
        next(parts)
    assert delivered == [1, 2]


def test_stopping_the_stream_early_schedules_nothing_more(make_companies) -> None:
    started: list[int] = []
    later: list[str] = []

    @_streaming(5, max_concurrency=3, on_stream_start=lambda k, *args: started.append(k))
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            return None

    @af.ends_batching
    class After(af.Agent):
        def call(self, context: Any) -> None:
            later.append("after")

    parts = (Work >> After).stream(companies=make_companies(100))
    first = next(parts)
    parts.close()
    assert first.stream_num == 1
    assert started == list(range(1, len(started) + 1))
    assert len(started) <= 3 + 1  # max_concurrency, and one waiting for a thread
    assert later == []


@pytest.mark.parametrize("limit", LIMITS)
def test_continue_under_concurrency(make_companies, passthrough, limit: int) -> None:
    table = make_companies(50)
    groups = ReverseGroups(limit, total=10)

    @_streaming(5, max_concurrency=limit, on_error="continue")
    class Work(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            k = _stream_num(context)
            groups.finish(k)
            if k in (2, 7):
                raise Boom(f"boom {k}")
            return {"companies": _tag(context["companies"], k)}

    result = (Work >> passthrough).run(companies=table)
    ok = [k for k in range(1, 11) if k not in (2, 7)]
    assert result["companies"].equals(_tagged(table, 5, ok))
    stats = result.stats[0]
    assert stats["failed_batches"] == 2
    assert stats["streams"]["status"].to_pylist() == [
        "failed" if k in (2, 7) else "ok" for k in range(1, 11)
    ]


# --------------------------------------------------------------------------- hooks


@pytest.mark.parametrize("limit", [1, 4])
def test_hooks_are_never_called_concurrently(make_companies, passthrough, limit: int) -> None:
    busy = threading.Lock()
    overlaps: list[str] = []
    calls: list[tuple[str, int]] = []

    def hook(name: str, k: int) -> None:
        if not busy.acquire(blocking=False):
            overlaps.append(name)
            return
        try:
            calls.append((name, k))
            time.sleep(0.001)  # widens the window a concurrent call would fall into
        finally:
            busy.release()

    class Work(af.Agent):
        def call(self, context: Any) -> None:
            if _stream_num(context) % 5 == 0:
                raise Boom("every fifth stream fails")

        def on_stream_start(self, k: int, total: int, context: Any) -> None:
            hook("on_stream_start", k)

        def on_stream_complete(self, k: int, total: int, results: pa.Table) -> None:
            hook("on_stream_complete", k)

        def on_stream_error(self, k: int, total: int, error: Exception, context: Any) -> None:
            hook("on_stream_error", k)

        def persist_each_stream(self, results: pa.Table, context: Any) -> None:
            hook("persist_each_stream", _stream_num(context))

    Work.intelligent_streaming(
        2, over="companies", incremental=True, max_concurrency=limit, on_error="continue"
    )
    (Work >> passthrough).run(companies=make_companies(40))

    assert overlaps == []
    assert Counter(name for name, _ in calls) == {
        "on_stream_start": 20,
        "on_stream_complete": 16,
        "on_stream_error": 4,
        "persist_each_stream": 16,
    }
    completions = [k for name, k in calls if name in ("on_stream_complete", "on_stream_error")]
    assert completions == list(range(1, 21))


# --------------------------------------------------------------------------- property


PROPERTY_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _property_flow(size: int, limit: int) -> af.Flow:
    @af.intelligent_streaming(size, over="rows", max_concurrency=limit)
    class Tag(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            k = _stream_num(context)
            rows = _tag(context["rows"], k)
            return {"rows": rows.filter(pa.array(rows["n"].to_numpy() % 3 != k % 3))}

    class Double(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            rows = context["rows"]
            return {"rows": rows.append_column("m", pc.multiply(rows["n"], 2))}

    return Tag >> Double


def _comparable(stats: dict[str, Any]) -> dict[str, Any]:
    counts = {key: value for key, value in stats.items() if key.endswith(("_batches", "_items"))}
    return {**counts, "streams": stats["streams"].drop_columns(["seconds"])}


@PROPERTY_SETTINGS
@given(
    limit=st.integers(min_value=1, max_value=8),
    size=st.integers(min_value=1, max_value=50),
    rows=st.integers(min_value=0, max_value=500),
)
def test_concurrent_run_equals_the_sequential_run(limit: int, size: int, rows: int) -> None:
    table = pa.table({"n": pa.array(range(rows), pa.int64())})
    sequential = _property_flow(size, 1).run(rows=table)
    concurrent = _property_flow(size, limit).run(rows=table)
    assert concurrent["rows"].equals(sequential["rows"])
    assert _comparable(concurrent.stats[0]) == _comparable(sequential.stats[0])
