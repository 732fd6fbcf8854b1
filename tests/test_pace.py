"""How many streams run at once: threads while they pay, one at a time when that is faster
(:mod:`arrowflow._pace`), and the executor following that choice with order kept."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import pyarrow as pa

import arrowflow as af
from arrowflow import _pace, executor
from arrowflow._pace import LONG_IN_A_ROW, SHORT_SECONDS, WINDOW_SECONDS, WINDOW_STREAMS, Pace
from arrowflow._stream import StreamOutcome

if TYPE_CHECKING:
    import pytest

ROWS = 1_000


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _outcome(seconds: float) -> StreamOutcome:
    outcome = StreamOutcome(1, ROWS)
    outcome.tries.seconds = seconds
    return outcome


def _window(pace: Pace, clock: Clock, *, every: float, seconds: float, on_thread: bool) -> None:
    """One completion, then a window's worth more, ``every`` seconds apart."""
    streams = max(WINDOW_STREAMS, int(WINDOW_SECONDS / every) + 1)
    for _ in range(streams + 1):
        clock.now += every
        pace.completed(_outcome(seconds), on_thread=on_thread)


def test_one_stream_at_a_time_is_settled_from_the_start() -> None:
    pace = Pace(1)
    assert pace.width == 1
    _window(pace, Clock(), every=0.001, seconds=0.001, on_thread=False)
    assert pace.width == 1


def test_streams_that_wait_keep_their_threads() -> None:
    """Long streams using no CPU (a model call, an API): threads, for good."""
    clock = Clock()
    pace = Pace(16, clock)
    _window(pace, clock, every=0.003, seconds=SHORT_SECONDS * 10, on_thread=True)
    assert pace.width == 16
    _window(pace, clock, every=0.0001, seconds=0.0001, on_thread=True)
    assert pace.width == 16  # settled: short streams later do not change it


def test_short_streams_whose_work_runs_at_once_keep_their_threads() -> None:
    """Short streams that complete more rows per second on threads (kernels releasing the
    GIL) go back to threads after the window one at a time, for good."""
    clock = Clock()
    pace = Pace(2, clock)
    _window(pace, clock, every=0.001, seconds=0.002, on_thread=True)
    assert pace.width == 1  # short streams: measured one at a time too
    _window(pace, clock, every=0.0015, seconds=0.0015, on_thread=False)
    assert pace.width == 2
    _window(pace, clock, every=0.0001, seconds=0.0001, on_thread=True)
    assert pace.width == 2


def test_short_streams_taking_turns_run_one_at_a_time_when_that_is_faster() -> None:
    clock = Clock()
    pace = Pace(2, clock)
    # On threads: a stream every 0.4 ms, each thread mostly waiting for the GIL.
    _window(pace, clock, every=0.0004, seconds=0.0008, on_thread=True)
    assert pace.width == 1  # now trying one at a time
    _window(pace, clock, every=0.0003, seconds=0.0003, on_thread=False)
    assert pace.width == 1
    # Settled one at a time: further short streams keep it so.
    _window(pace, clock, every=0.0003, seconds=0.0003, on_thread=False)
    assert pace.width == 1


def test_one_at_a_time_slower_than_threads_goes_back_to_threads() -> None:
    clock = Clock()
    pace = Pace(2, clock)
    _window(pace, clock, every=0.0004, seconds=0.0008, on_thread=True)
    assert pace.width == 1
    _window(pace, clock, every=0.0006, seconds=0.0006, on_thread=False)
    assert pace.width == 2


def test_long_streams_while_one_at_a_time_send_the_run_back_to_threads() -> None:
    clock = Clock()
    pace = Pace(4, clock)
    _window(pace, clock, every=0.0004, seconds=0.0008, on_thread=True)
    _window(pace, clock, every=0.0003, seconds=0.0003, on_thread=False)
    assert pace.width == 1
    for _ in range(LONG_IN_A_ROW):
        clock.now += SHORT_SECONDS
        pace.completed(_outcome(SHORT_SECONDS), on_thread=False)
    assert pace.width == 4
    _window(pace, clock, every=0.0003, seconds=0.0003, on_thread=True)
    assert pace.width == 4  # for good


def test_one_stream_held_up_by_a_pause_keeps_the_run_one_at_a_time() -> None:
    """A garbage collection or another process stalls one stream: not a change of the work."""
    clock = Clock()
    pace = Pace(4, clock)
    _window(pace, clock, every=0.0004, seconds=0.0008, on_thread=True)
    _window(pace, clock, every=0.0003, seconds=0.0003, on_thread=False)
    for _ in range(3):
        for seconds in (SHORT_SECONDS * 4, *[0.0003] * (LONG_IN_A_ROW - 1)):
            clock.now += seconds
            pace.completed(_outcome(seconds), on_thread=False)
    assert pace.width == 1


def test_streams_started_before_a_change_do_not_count_in_the_next_window() -> None:
    """The threads' streams still in flight when the run tries one at a time complete first:
    they are not measured as streams run one at a time."""
    clock = Clock()
    pace = Pace(2, clock)
    _window(pace, clock, every=0.0004, seconds=0.0008, on_thread=True)
    # Thread streams completing fast would make one at a time look faster than it is.
    _window(pace, clock, every=0.00001, seconds=0.0001, on_thread=True)
    _window(pace, clock, every=0.0006, seconds=0.0006, on_thread=False)
    assert pace.width == 2


# --------------------------------------------------------------------------- in a run


class Scripted(Pace):
    """A pace that goes one at a time once stream 3 completed, threads again once stream 7
    completed."""

    def completed(self, outcome: StreamOutcome, *, on_thread: bool) -> None:
        self.width = 1 if 3 <= outcome.stream_num < 7 else self.limit


def test_the_run_follows_its_pace_and_keeps_stream_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor, "Pace", Scripted)
    ran_on: dict[int, bool] = {}
    completed: list[int] = []

    @af.intelligent_streaming(
        2,
        over="rows",
        max_concurrency=2,
        incremental=True,
        on_stream_complete=lambda num, total, results: completed.append(num),
    )
    class Tag(af.Agent):
        def call(self, context: Any) -> dict[str, pa.Table]:
            stream = context["_batch_metadata"]["batch_number"]
            ran_on[stream] = threading.current_thread() is threading.main_thread()
            rows = context["rows"]
            return {"rows": rows.append_column("stream", pa.array([stream] * rows.num_rows))}

    rows = pa.table({"n": range(20)})
    result = af.Flow(Tag).run(rows=rows)

    # Stream k completes before stream k + 1 starts once the width is 1. Three streams are in
    # flight on threads (max_concurrency, and one waiting for a thread: a slice of a table), so
    # 4 and 5 start while 3 is still on a thread; 6 and 7 run on the run's own thread, 8 on a
    # thread again.
    assert [k for k, here in sorted(ran_on.items()) if here] == [6, 7]
    assert result["rows"]["n"].to_pylist() == list(range(20))
    assert result["rows"]["stream"].to_pylist() == [k // 2 + 1 for k in range(20)]
    assert completed == list(range(1, 11))
    assert result.stats[0]["successful_batches"] == 10


def test_short_cpu_streams_end_up_on_the_runs_own_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short streams, max_concurrency=2: after the first windows, streams run on the run's own
    thread, and the result is what one thread gives. The measurements are fixed (every stream
    short, both ways equally fast: one at a time is kept when not slower) so
    that the run's following of the rule is under test, not the machine's speed."""
    monkeypatch.setattr(_pace, "WINDOW_STREAMS", 4)
    monkeypatch.setattr(_pace, "WINDOW_SECONDS", 0.0)
    monkeypatch.setattr(_pace, "SHORT_SECONDS", float("inf"))
    monkeypatch.setattr(_pace._Window, "rate", lambda window: 1.0)
    ran_on: list[bool] = []

    @af.intelligent_streaming(10, over="rows", max_concurrency=2)
    class Count(af.Agent):
        def call(self, context: Any) -> dict[str, pa.Table]:
            ran_on.append(threading.current_thread() is threading.main_thread())
            return {"rows": context["rows"]}

    rows = pa.table({"n": range(2_000)})
    result = af.Flow(Count).run(rows=rows)

    assert result["rows"].equals(rows)
    assert not any(ran_on[:5])  # the first window (and the stream that opens it): threads
    assert all(ran_on[-190:])
