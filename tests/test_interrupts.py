"""Ctrl-C stops a run promptly and keeps what is done (DESIGN §4 "Interrupts").

Each case runs a real pipeline in a subprocess that receives a real SIGINT while one stream is
blocked (in an agent, in a DuckDB statement, with ``on_error="continue"``, with retries, with a
stuck agent among concurrent streams). The process must exit with a ``KeyboardInterrupt``
within 2 s plus the grace period, leave the state file released with the run recorded as
``interrupted``, leave no complete-looking output, and a rerun must resume and return what an
uninterrupted run returns.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import arrowflow as af
from arrowflow.executor import INTERRUPT_GRACE
from arrowflow.state import DuckDBState

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGINT delivery is POSIX")

STREAM_SIZE = 50
ROWS = 1000
BLOCK_AT = 5
WAIT = 60.0  # generous bound on anything the test waits for

PIPELINE = f"""
import asyncio
import json
import sys
import threading
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

import arrowflow as af
from arrowflow.state import DuckDBState

state_path, out_path, log_path, stats_path, mode, block = sys.argv[1:7]
block_at = int(block)
blocked = threading.Event()


def say(line):
    # Tells the test where the run is, on stdout: one write, so threads never mix lines.
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()


class SlowStore(DuckDBState):
    def persist(self, stream, results, processed):
        if mode == "duckdb" and stream.num == block_at and not blocked.is_set():
            blocked.set()
            say("blocked")
            # A statement that runs until SIGINT interrupts it.
            duckdb.sql("select sum(hash(range)) from range(100000000000)").fetchall()
        super().persist(stream, results, processed)


store = SlowStore(state_path, table="enriched", key="id")
options = dict(state=store)
if mode == "continue":
    options.update(on_error="continue")
elif mode == "retries":
    options.update(retries=3, backoff=0)
elif mode == "stuck":
    options.update(max_concurrency=4)


@af.intelligent_streaming(stream_size={STREAM_SIZE}, over="companies", **options)
class Enrich(af.Agent):
    def call(self, context):
        rows = context["companies"]
        stream = context["_batch_metadata"]["batch_number"]
        with open(log_path, "a") as log:
            log.write(json.dumps(rows["id"].to_pylist()) + "\\n")
        if mode != "duckdb" and stream == block_at:
            say("blocked")
            # Stuck: in stuck mode in a worker thread, out of reach of SIGINT.
            threading.Event().wait(600 if mode == "stuck" else {WAIT})
        kept = rows.filter(pa.array(rows["id"].to_numpy() % 7 != 0))
        result = kept.append_column("score", pc.multiply(kept["id"], 3))
        say(f"done {{stream}}")
        return {{"companies": result}}


class Total(af.Agent):
    def call(self, context):
        return {{"rows": context["companies"].num_rows}}


ids = pa.array([(i * 379) % {ROWS} for i in range({ROWS})], pa.int64())
companies = pa.table({{"id": ids, "name": pc.cast(ids, pa.string())}})
try:
    result = (Enrich >> Total).run(companies=companies, sink=out_path, progress=False)
except KeyboardInterrupt as interrupted:
    streams = interrupted.execution_stats["streams"]
    Path(stats_path).write_text(json.dumps(streams.to_pydict()))
    raise
"""


def input_ids() -> list[int]:
    return [(i * 379) % ROWS for i in range(ROWS)]


def logged_ids(log: Path) -> list[int]:
    if not log.exists():
        return []
    return [key for line in log.read_text().splitlines() for key in json.loads(line)]


class Case:
    """One pipeline's files in a temporary directory."""

    def __init__(self, root: Path, name: str) -> None:
        root.mkdir(exist_ok=True)
        self.script = root / "pipeline.py"
        self.script.write_text(PIPELINE)
        self.state = root / f"{name}.duckdb"
        self.out = root / f"{name}.parquet"
        self.log = root / f"{name}.log"
        self.stats = root / f"{name}.stats.json"

    def command(self, mode: str, block_at: int) -> list[str]:
        files = (self.state, self.out, self.log, self.stats)
        return [sys.executable, str(self.script), *map(str, files), mode, str(block_at)]

    def run(self, mode: str) -> None:
        done = subprocess.run(
            self.command(mode, 0), capture_output=True, text=True, timeout=WAIT, check=False
        )
        assert done.returncode == 0, done.stderr


def _sigint_by_default() -> None:
    """In the child, before it starts: SIGINT as a terminal sends it. A test run started as a
    background job ignores SIGINT, and a child would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in this process during the test, as it does in a
    terminal (a test run started as a background job ignores it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def interrupt(case: Case, mode: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Start the pipeline, wait until it blocks, send SIGINT; the process and its exit delay."""
    process = subprocess.Popen(
        case.command(mode, BLOCK_AT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_by_default,
    )
    # In stuck mode, the streams started with the stuck one complete first, so some are kept.
    awaited = {"blocked"} | (
        {f"done {BLOCK_AT + k}" for k in (1, 2, 3)} if mode == "stuck" else set()
    )
    try:
        _read_until(process, awaited)
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=WAIT)
        elapsed = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=WAIT)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err), elapsed


def _read_until(process: subprocess.Popen[str], awaited: set[str]) -> None:
    """Read the pipeline's stdout until every line of ``awaited`` has come.

    Straight from the file descriptor: a buffered reader could hold a line that ``select``
    then never reports.
    """
    assert process.stdout is not None
    descriptor = process.stdout.fileno()
    missing, pending = set(awaited), b""
    with selectors.DefaultSelector() as selector:
        selector.register(descriptor, selectors.EVENT_READ)
        deadline = time.monotonic() + WAIT
        while missing:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"never printed {missing}"
            assert selector.select(remaining), f"never printed {missing}"
            chunk = os.read(descriptor, 65536)
            assert chunk, f"the pipeline ended early: {process.communicate()[1]}"
            *lines, pending = (pending + chunk).split(b"\n")
            missing -= {line.decode().strip() for line in lines}


def runs_of(state: Path) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(state)) as con:  # read-write: the file must not be locked
        return con.sql("select run_id, status from arrowflow.runs order by run_id").fetchall()


def kept_streams(state: Path, run_id: int) -> list[int]:
    with duckdb.connect(str(state), read_only=True) as con:
        rows = con.sql(
            "select stream_num from arrowflow.streams where run_id = ? and status = 'ok' "
            "order by stream_num",
            params=[run_id],
        ).fetchall()
    return [row[0] for row in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    case = Case(tmp_path_factory.mktemp("uninterrupted"), "fresh")
    case.run("agent")
    return pq.read_table(case.out)


@pytest.mark.parametrize("mode", ["agent", "duckdb", "continue", "retries", "stuck"])
def test_ctrl_c_stops_the_run_and_a_rerun_resumes(
    tmp_path: Path, mode: str, uninterrupted: pa.Table
) -> None:
    case = Case(tmp_path, mode)
    done, elapsed = interrupt(case, mode)

    assert done.returncode == -signal.SIGINT, done.stderr  # died of KeyboardInterrupt
    assert "KeyboardInterrupt" in done.stderr
    assert "completed stream(s) kept" in done.stderr
    assert elapsed < 2 + INTERRUPT_GRACE, f"took {elapsed:.2f}s to stop"

    # The store is released, the run recorded as interrupted, completed streams kept.
    assert runs_of(case.state) == [(1, "interrupted")]
    kept = kept_streams(case.state, 1)
    streams = json.loads(case.stats.read_text())
    statuses = dict(zip(streams["stream_num"], streams["status"], strict=True))
    assert [num for num, status in statuses.items() if status == "ok"] == kept
    assert "failed" not in streams["status"]  # an interrupt is never a stream failure
    if mode == "stuck":
        # Streams 6 to 8 had returned from the agent when the signal was sent, and stream 9
        # (in flight beyond max_concurrency, waiting for a thread) may have run too; each is
        # kept if it had also completed, else cut off with stream 5, still stuck.
        assert kept[:4] == [1, 2, 3, 4]
        assert set(kept[4:]) <= {6, 7, 8, 9}
        cut = [num for num, status in statuses.items() if status == "interrupted"]
        assert sorted(kept + cut) == list(range(1, 10))
        assert 5 in cut
    else:
        assert kept == list(range(1, BLOCK_AT))
    called = logged_ids(case.log)
    if mode == "retries":
        assert called.count(input_ids()[(BLOCK_AT - 1) * STREAM_SIZE]) == 1  # never retried

    # No complete-looking output: only the partial file.
    assert not case.out.exists()
    assert Path(f"{case.out}.partial").exists()

    case.log.unlink()
    case.run(mode)
    done_keys = {k for n in kept for k in input_ids()[(n - 1) * STREAM_SIZE : n * STREAM_SIZE]}
    assert not done_keys & set(logged_ids(case.log)), "a kept stream was processed again"
    assert pq.read_table(case.out).equals(uninterrupted)
    assert runs_of(case.state) == [(1, "interrupted"), (2, "ok")]


# ---------------------------------------------------------------- in process, real SIGINT


@pytest.mark.usefixtures("ctrl_c_raises")
def test_abandoned_streams_never_reopen_the_store(tmp_path: Path) -> None:
    """A stream stuck when Ctrl-C comes is abandoned: when it lets go, it is not retried and
    never reopens the state file."""
    store = DuckDBState(tmp_path / "state.duckdb", table="t", key="id")
    release, stuck = threading.Event(), threading.Event()
    calls: dict[int, int] = {}

    @af.intelligent_streaming(10, over="rows", state=store, max_concurrency=2, retries=3)
    class Work(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            stream = context["_batch_metadata"]["batch_number"]
            calls[stream] = calls.get(stream, 0) + 1
            if stream == 1:
                stuck.set()
                release.wait(WAIT)
                raise ConnectionError("failed after the run ended: must not be retried")
            if stream == 2:
                assert stuck.wait(WAIT)
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while stream 1 is stuck
                release.wait(WAIT)  # completes only after the run was interrupted
            return {"rows": context["rows"]}

    with pytest.raises(KeyboardInterrupt) as caught:
        af.Flow(Work).run(rows=pa.table({"id": range(40)}), progress=False)
    assert type(caught.value) is KeyboardInterrupt
    assert not store.is_open

    release.set()
    for thread in threading.enumerate():
        if thread.name.startswith("arrowflow-stream"):
            thread.join(WAIT)
    assert calls[1] == 1
    assert not store.is_open
    with duckdb.connect(str(tmp_path / "state.duckdb")) as con:  # not locked
        assert con.sql("select status from arrowflow.runs").fetchall() == [("interrupted",)]
    stats = caught.value.execution_stats
    assert stats["streams"]["status"].to_pylist() == ["interrupted", "interrupted"]
    assert store.runs()["status"].to_pylist() == ["interrupted"]


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_cancels_running_coroutines(make_companies) -> None:
    cancelled, started = threading.Event(), threading.Event()

    @af.intelligent_streaming(10, over="companies", max_concurrency=2)
    class Fetch(af.Agent):
        async def call(self, context: Any) -> None:
            stream = context["_batch_metadata"]["batch_number"]
            if stream == 1:
                started.set()
                try:
                    await asyncio.Event().wait()  # an API call that never answers
                except asyncio.CancelledError:
                    cancelled.set()
                    raise
            else:
                # Waited for off the loop: stream 1's coroutine may not have started on it yet.
                assert await asyncio.to_thread(started.wait, WAIT)
                os.kill(os.getpid(), signal.SIGINT)
                await asyncio.Event().wait()

    with pytest.raises(KeyboardInterrupt):
        af.Flow(Fetch).run(companies=make_companies(40), progress=False)
    assert cancelled.is_set()  # cancelled before the run returned, within its grace period


def test_system_exit_in_a_stream_stops_the_run_as_an_interrupt(make_companies, tmp_path) -> None:
    store = DuckDBState(tmp_path / "state.duckdb", table="t", key="id")
    calls: list[int] = []

    @af.intelligent_streaming(
        10, over="companies", state=store, max_concurrency=2, retries=3, on_error="continue"
    )
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            stream = context["_batch_metadata"]["batch_number"]
            calls.append(stream)
            if stream == 2:
                sys.exit(3)

    with pytest.raises(SystemExit) as caught:
        af.Flow(Work).run(companies=make_companies(50), progress=False)
    assert caught.value.code == 3
    assert calls.count(2) == 1
    assert store.runs()["status"].to_pylist() == ["interrupted"]
    assert not store.is_open


def test_ctrl_c_in_the_body_of_a_stream_loop_is_an_interrupt(make_companies, tmp_path) -> None:
    store = DuckDBState(tmp_path / "state.duckdb", table="t", key="id")

    @af.intelligent_streaming(10, over="companies", state=store)
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            return None

    def consume() -> None:
        with af.Flow(Work).stream(companies=make_companies(50)) as parts:
            for part in parts:
                if part.stream_num == 2:
                    raise KeyboardInterrupt  # Ctrl-C while the caller handles stream 2

    with pytest.raises(KeyboardInterrupt) as caught:
        consume()

    assert store.runs()["status"].to_pylist() == ["interrupted"]
    assert not store.is_open
    assert "2 completed stream(s) kept" in "".join(caught.value.__notes__)
    assert store.to_arrow()["id"].to_pylist() == list(range(20))
