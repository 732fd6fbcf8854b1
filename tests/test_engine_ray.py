"""``engine="ray"``: the same flows run locally and on a real local Ray runtime, compared.

One runtime for the module (2 CPUs, no dashboard), started by the ``ray_runtime`` fixture; the
engine finds it initialised and leaves it running. Agents run in worker processes, so they
tell the test what they saw through files in ``tmp_path``; hooks run on the driver, so they
append to lists. Runs that need a runtime of their own (lifecycle, a driver killed, the CLI)
are subprocesses.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray

import arrowflow as af
from arrowflow.demo import DEFAULT_INPUT, pipeline_for
from arrowflow.engines.ray import _Pool

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 120.0  # seconds a worker waits for a file the test writes


@pytest.fixture(scope="module")
def ray_runtime() -> Iterator[str]:
    """A local runtime for this module; its address, for subprocesses to join."""
    path = os.pathsep.join(entry for entry in sys.path if entry and os.path.isdir(entry))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def rows(n: int) -> pa.Table:
    return pa.table({"id": pa.array(range(n), pa.int64()), "x": pa.array(range(n), pa.float64())})


def comparable(stats: dict[str, Any]) -> dict[str, Any]:
    """A scope's statistics without what differs between runs: times."""
    kept = {name: value for name, value in stats.items() if not name.endswith("_time")}
    kept["streams"] = stats["streams"].drop_columns(["seconds"])
    return kept


def wait_for(path: Path) -> None:
    """In a worker: wait until the test writes ``path`` (never for longer than DEADLINE)."""
    deadline = time.monotonic() + DEADLINE
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


def mark(directory: Path, name: str, text: str = "") -> None:
    (directory / f"{name}-{uuid.uuid4().hex}").write_text(text)


def marks(directory: Path, name: str) -> list[str]:
    return [path.read_text() for path in directory.glob(f"{name}-*")]


@af.intelligent_streaming(stream_size=250, over="rows", max_concurrency=2)
class Metadata(af.Agent):
    """Writes the stream's metadata into its rows, and the worker's pid into a column."""

    def call(self, context: Any) -> dict[str, Any]:
        meta = context["_batch_metadata"]
        table = context["rows"]
        n = table.num_rows
        for name in ("batch_number", "total_batches", "batch_size", "array_field"):
            table = table.append_column(name, pa.array([meta[name]] * n))
        trigger = meta["scope_id"].split(":")[0]
        return {"rows": table.append_column("scope", pa.array([trigger] * n))}


class Squares(af.Agent):
    def call(self, context: Any) -> dict[str, Any]:
        table = context["rows"]
        return {"rows": table.append_column("square", pc.multiply(table["x"], table["x"]))}


def test_the_prospect_pipeline_gives_the_same_result_on_ray(
    ray_runtime: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline = pipeline_for(stream_size=700)(input_path=str(ROOT / DEFAULT_INPUT))
    local = pipeline.run()
    local_output = capsys.readouterr().out
    remote = pipeline.run(engine="ray")
    assert remote["companies"].equals(local["companies"])
    assert local["companies"].num_rows > 0
    assert comparable(remote.stats[0]) == comparable(local.stats[0])
    # The hooks print on the driver, in stream order.
    assert capsys.readouterr().out == local_output
    assert local_output.count("\n") == local.stats[0]["total_batches"] > 1


def test_metadata_order_and_statistics_are_the_local_ones(ray_runtime: str) -> None:
    flow = Metadata >> Squares >> af.ends_batching(type("End", (af.Agent,), {"call": _none}))
    local = flow.run(rows=rows(1_000))
    remote = flow.run(rows=rows(1_000), engine="ray")
    assert remote["rows"].equals(local["rows"])
    assert (
        remote["rows"]["batch_number"].to_pylist() == [1] * 250 + [2] * 250 + [3] * 250 + [4] * 250
    )
    assert comparable(remote.stats[0]) == comparable(local.stats[0])
    assert set(remote) == set(local)
    assert "_batch_metadata" not in remote


def _none(self: Any, context: Any) -> None:
    return None


def test_agents_run_on_workers_and_hooks_on_the_driver_in_stream_order(
    ray_runtime: str, tmp_path: Path
) -> None:
    calls: list[tuple[str, int, int]] = []
    seen = tmp_path

    @af.intelligent_streaming(
        stream_size=100,
        over="rows",
        incremental=True,
        max_concurrency=2,
        on_stream_start=lambda num, total, context: calls.append(("start", num, os.getpid())),
        on_stream_complete=lambda num, total, results: calls.append(("done", num, os.getpid())),
    )
    class Where(af.Agent):
        def call(self, context: Any) -> None:
            mark(seen, "pid", str(os.getpid()))

    af.Flow(Where).run(rows=rows(600), engine="ray")
    assert [name for name, _, _ in calls if name == "done"] == ["done"] * 6
    assert [num for name, num, _ in calls if name == "done"] == [1, 2, 3, 4, 5, 6]
    assert [num for name, num, _ in calls if name == "start"] == [1, 2, 3, 4, 5, 6]
    assert {pid for _, _, pid in calls} == {os.getpid()}
    workers = {int(pid) for pid in marks(seen, "pid")}
    assert len(marks(seen, "pid")) == 6
    assert workers
    assert os.getpid() not in workers


def test_stream_delivers_a_stream_while_later_ones_still_run(
    ray_runtime: str, tmp_path: Path
) -> None:
    go, finished = tmp_path / "go", tmp_path / "finished"

    @af.intelligent_streaming(stream_size=100, over="rows", incremental=True, max_concurrency=2)
    class Second(af.Agent):
        def call(self, context: Any) -> None:
            if context["_batch_metadata"]["batch_number"] == 2:
                wait_for(go)
                finished.write_text("")

    with af.Flow(Second).stream(rows=rows(400), engine="ray") as parts:
        first = next(parts)
        assert first.stream_num == 1
        assert not finished.exists()  # stream 2 is still running on a worker
        go.write_text("")
        rest = [part.stream_num for part in parts]
    assert rest == [2, 3, 4]
    assert finished.exists()
    assert parts.result is not None
    assert parts.result["rows"].equals(rows(400))


def fails_once(directory: Path, stream: int) -> type[af.Agent]:
    @af.intelligent_streaming(stream_size=100, over="rows", retries=2, backoff=0)
    class FailsOnce(af.Agent):
        def call(self, context: Any) -> None:
            flag = directory / f"failed-{stream}"
            if context["_batch_metadata"]["batch_number"] == stream and not flag.exists():
                flag.write_text("")
                raise ConnectionError("flaky")

    return FailsOnce


def test_retries_count_as_they_do_locally(ray_runtime: str, tmp_path: Path) -> None:
    results = {}
    for engine in ("local", "ray"):
        directory = tmp_path / engine
        directory.mkdir()
        results[engine] = af.Flow(fails_once(directory, 3)).run(rows=rows(500), engine=engine)
    local, remote = results["local"], results["ray"]
    assert remote["rows"].equals(local["rows"])
    assert remote.stats[0]["streams"]["attempts"].to_pylist() == [1, 1, 2, 1, 1]
    assert comparable(remote.stats[0]) == comparable(local.stats[0])


def times_out_once(directory: Path) -> type[af.Agent]:
    @af.intelligent_streaming(stream_size=100, over="rows", timeout=1.0, retries=1, backoff=0)
    class Stalls(af.Agent):
        def call(self, context: Any) -> None:
            flag = directory / "stalled"
            if context["_batch_metadata"]["batch_number"] == 2 and not flag.exists():
                flag.write_text("")
                deadline = time.monotonic() + 5  # past the timeout: abandoned, then ends
                while time.monotonic() < deadline:
                    time.sleep(0.01)

    return Stalls


def test_a_timeout_bounds_each_attempt_on_the_worker(ray_runtime: str, tmp_path: Path) -> None:
    results = {}
    for engine in ("local", "ray"):
        directory = tmp_path / engine
        directory.mkdir()
        results[engine] = af.Flow(times_out_once(directory)).run(rows=rows(300), engine=engine)
    local, remote = results["local"], results["ray"]
    assert remote["rows"].equals(rows(300))
    assert remote.stats[0]["streams"]["attempts"].to_pylist() == [1, 2, 1]
    assert comparable(remote.stats[0]) == comparable(local.stats[0])


@af.intelligent_streaming(stream_size=100, over="rows", on_error="continue")
class FailsThird(af.Agent):
    def call(self, context: Any) -> None:
        if context["_batch_metadata"]["batch_number"] == 3:
            raise ValueError("stream three is bad")


def test_on_error_continue_records_the_same_failures(ray_runtime: str) -> None:
    local = af.Flow(FailsThird).run(rows=rows(500))
    remote = af.Flow(FailsThird).run(rows=rows(500), engine="ray")
    assert remote["rows"].equals(local["rows"])
    assert remote["rows"].num_rows == 400
    assert comparable(remote.stats[0]) == comparable(local.stats[0])
    streams = remote.stats[0]["streams"]
    assert streams["status"].to_pylist()[2] == "failed"
    assert streams["error"].to_pylist()[2] == "ValueError: stream three is bad"


@af.intelligent_streaming(stream_size=100, over="rows")
class RaisesThird(af.Agent):
    def call(self, context: Any) -> None:
        if context["_batch_metadata"]["batch_number"] == 3:
            raise ValueError("stream three is bad")


def test_on_error_raise_keeps_the_completed_streams_in_order(ray_runtime: str) -> None:
    errors = {}
    for engine in ("local", "ray"):
        with pytest.raises(af.BatchExecutionError) as caught:
            af.Flow(RaisesThird).run(rows=rows(500), engine=engine)
        errors[engine] = caught.value
    local, remote = errors["local"], errors["ray"]
    assert remote.batch_number == local.batch_number == 3
    assert str(remote) == str(local)
    assert isinstance(remote.original_error, ValueError)
    assert remote.partial_results["rows"].equals(local.partial_results["rows"])
    assert remote.partial_results["rows"]["id"].to_pylist() == list(range(200))


def test_an_agent_breaking_its_contract_fails_the_run_as_locally(ray_runtime: str) -> None:
    @af.intelligent_streaming(stream_size=100, over="rows")
    class ReturnsList(af.Agent):
        def call(self, context: Any) -> Any:
            return [1, 2]

    with pytest.raises(af.ConfigurationError) as local:
        af.Flow(ReturnsList).run(rows=rows(300))
    with pytest.raises(af.ConfigurationError) as remote:
        af.Flow(ReturnsList).run(rows=rows(300), engine="ray")
    assert str(remote.value) == str(local.value)


def test_a_field_that_cannot_be_sent_is_named(ray_runtime: str) -> None:
    with pytest.raises(af.ConfigurationError, match="field 'lock' cannot be sent to Ray workers"):
        af.Flow(Metadata).run(rows=rows(300), lock=threading.Lock(), engine="ray")


def test_async_agents_run_on_the_workers_event_loop(ray_runtime: str) -> None:
    @af.intelligent_streaming(stream_size=100, over="rows", max_concurrency=4)
    class Awaits(af.Agent):
        async def call(self, context: Any) -> dict[str, Any]:
            await asyncio.sleep(0.001)
            table = context["rows"]
            return {"rows": table.append_column("y", pc.add(table["x"], 1))}

    local = af.Flow(Awaits).run(rows=rows(1_000))
    remote = af.Flow(Awaits).run(rows=rows(1_000), engine=af.RayEngine(actors=2))
    assert remote["rows"].equals(local["rows"])
    assert comparable(remote.stats[0]) == comparable(local.stats[0])


def test_set_up_happens_once_per_actor(ray_runtime: str, tmp_path: Path) -> None:
    @af.intelligent_streaming(stream_size=10, over="rows", max_concurrency=2)
    class SetUp(af.Agent):
        def __init__(self) -> None:
            mark(tmp_path, "init", str(os.getpid()))

        def call(self, context: Any) -> None:
            mark(tmp_path, "call", str(os.getpid()))

    af.Flow(SetUp).run(rows=rows(400), engine=af.RayEngine(actors=2))
    on_workers = [pid for pid in marks(tmp_path, "init") if int(pid) != os.getpid()]
    assert len(marks(tmp_path, "call")) == 40
    assert 1 <= len(on_workers) <= 2
    assert len(set(on_workers)) == len(on_workers)


def counting_reader(n: int, size: int, pulled: list[int]) -> pa.RecordBatchReader:
    table = rows(n)

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in table.to_batches(max_chunksize=size):
            pulled.append(batch.num_rows)
            yield batch

    return pa.RecordBatchReader.from_batches(table.schema, batches())


def test_a_reader_is_read_as_streams_are_dispatched(ray_runtime: str) -> None:
    pulled: list[int] = []
    ahead: list[int] = []
    concurrency = 2

    @af.intelligent_streaming(
        stream_size=50,
        over="rows",
        incremental=True,
        max_concurrency=concurrency,
        on_stream_complete=lambda num, total, results: ahead.append(len(pulled) - num),
    )
    class Slow(af.Agent):
        def call(self, context: Any) -> None:
            return None

    result = af.Flow(Slow).run(rows=counting_reader(1_000, 50, pulled), engine="ray")
    assert result["rows"].equals(rows(1_000))
    assert len(ahead) == 20
    assert max(ahead) <= concurrency + 2


def test_a_parquet_input_and_a_sink_written_in_order_on_the_driver(
    ray_runtime: str, tmp_path: Path
) -> None:
    source = tmp_path / "in.parquet"
    pq.write_table(rows(2_000), source, row_group_size=300)
    flow = af.Flow(Metadata) >> Squares
    outputs = {}
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}.parquet"
        result = flow.run(rows=af.scan_parquet(source), sink=out, engine=engine)
        assert isinstance(result["rows"], pa.RecordBatchReader)
        outputs[engine] = pq.read_table(out)
    assert outputs["ray"].equals(outputs["local"])
    assert outputs["ray"]["id"].to_pylist() == list(range(2_000))


def test_done_rows_are_skipped_on_the_driver_and_never_shipped(
    ray_runtime: str, tmp_path: Path
) -> None:
    state = tmp_path / "state.duckdb"
    seen, fail = tmp_path / "seen", tmp_path / "fail"
    seen.mkdir()

    @af.intelligent_streaming(
        stream_size=100, over="rows", state=af.DuckDBState(state, table="done", key="id")
    )
    class Remembered(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            table = context["rows"]
            opened = any(
                os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(state))
                for fd in os.listdir("/proc/self/fd")
            )
            ids = ",".join(map(str, table["id"].to_pylist()))
            mark(seen, "ids", ids)
            mark(seen, "opened", str(opened))
            if context["_batch_metadata"]["batch_number"] == 3 and fail.exists():
                raise ValueError("not yet")
            return {"rows": table.append_column("y", pc.multiply(table["x"], 3))}

    expected = af.Flow(Remembered).with_options(state=af.MemoryState(key="id")).run(rows=rows(500))
    for path in seen.iterdir():
        path.unlink()
    fail.write_text("")
    with pytest.raises(af.BatchExecutionError):
        af.Flow(Remembered).run(rows=rows(500), engine="ray")
    for path in seen.iterdir():
        path.unlink()
    fail.unlink()
    resumed = af.Flow(Remembered).run(rows=rows(500), engine="ray")
    assert resumed["rows"].equals(expected["rows"])
    shipped = sorted(int(i) for ids in marks(seen, "ids") for i in ids.split(","))
    assert shipped == list(range(200, 500))
    assert resumed.stats[0]["skipped_items"] == 200
    assert resumed.stats[0]["loaded_items"] == 200
    assert marks(seen, "opened")
    assert set(marks(seen, "opened")) == {"False"}


def test_a_worker_killed_mid_run_is_a_failed_attempt_retried(
    ray_runtime: str, tmp_path: Path
) -> None:
    def killer(retries: int, on_error: str) -> type[af.Agent]:
        flag = tmp_path / f"killed-{retries}"

        @af.intelligent_streaming(
            stream_size=100, over="rows", retries=retries, backoff=0, on_error=on_error
        )
        class KillsItsWorker(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                if context["_batch_metadata"]["batch_number"] == 3 and not flag.exists():
                    flag.write_text("")
                    os.kill(os.getpid(), signal.SIGKILL)
                table = context["rows"]
                return {"rows": table.append_column("y", pc.add(table["x"], 1))}

        return KillsItsWorker

    (tmp_path / "killed-1").write_text("")  # locally, the agent must not kill the test
    expected = af.Flow(killer(1, "raise")).run(rows=rows(500))
    (tmp_path / "killed-1").unlink()
    retried = af.Flow(killer(1, "raise")).run(rows=rows(500), engine="ray")
    assert retried["rows"].equals(expected["rows"])
    assert retried.stats[0]["streams"]["attempts"].to_pylist() == [1, 1, 2, 1, 1]

    given_up = af.Flow(killer(0, "continue")).run(rows=rows(500), engine="ray")
    streams = given_up.stats[0]["streams"]
    assert streams["status"].to_pylist() == ["ok", "ok", "failed", "ok", "ok"]
    assert streams["error"][2].as_py().startswith("WorkerLostError: the Ray worker")
    assert given_up["rows"]["id"].to_pylist() == [*range(200), *range(300, 500)]


def test_stopping_the_pool_waits_for_its_recovery_threads(ray_runtime: str) -> None:
    """A thread waiting for a lost worker is joined before the runtime may shut down; none
    starts after. (One calling Ray after the shutdown reconnected from that thread, and a
    connection opened while the old one closed aborted the driver at Ctrl-C.)"""
    pool = _Pool(1, 1)
    waiting, ended = threading.Event(), []

    def recovering() -> None:
        waiting.set()
        pool.stopped.wait()
        ended.append("recovering")

    assert pool.in_background(recovering)
    assert waiting.wait(DEADLINE)
    pool.kill()
    assert ended == ["recovering"]  # joined before kill() returned
    assert not pool.in_background(ended.append, "too late")
    assert ended == ["recovering"]


def test_with_options_and_pipelines_take_the_engine(ray_runtime: str) -> None:
    class Tagging(af.Pipeline):
        flow = Metadata >> Squares

    local = Tagging(rows=rows(600)).run()
    by_option = Tagging.with_options(engine="ray")(rows=rows(600)).run()
    by_run = Tagging(rows=rows(600)).run(engine=af.RayEngine(actors=1))
    for remote in (by_option, by_run):
        assert remote["rows"].equals(local["rows"])
        assert comparable(remote.stats[0]) == comparable(local.stats[0])
    with Tagging(rows=rows(600)).stream(engine="ray") as parts:
        assert [part.stream_num for part in parts] == [1, 2, 3]
    assert parts.result is not None
    assert parts.result["rows"].equals(local["rows"])
    with pytest.raises(af.ConfigurationError, match="Unknown engine 'spark'"):
        af.Flow(Metadata).with_options(engine="spark")


DRIVER = """
import os, sys, time
from pathlib import Path
import pyarrow as pa, pyarrow.compute as pc
import arrowflow as af

here = Path(sys.argv[1])

@af.intelligent_streaming(
    stream_size=100,
    over="rows",
    # Committed as soon as the store's writer thread can.
    state=af.DuckDBState(here / "state.duckdb", table="t", key="id", commit_interval=0),
)
class Blocks(af.Agent):
    def call(self, context):
        if context["_batch_metadata"]["batch_number"] == 4 and (here / "block").exists():
            (here / "reached").write_text("")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                time.sleep(0.01)
        table = context["rows"]
        return {"rows": table.append_column("y", pc.multiply(table["x"], 2))}

rows = pa.table({"id": pa.array(range(700), pa.int64()), "x": pa.array(range(700), pa.float64())})
result = af.Flow(Blocks).run(rows=rows, engine=sys.argv[2])
import pyarrow.parquet as pq
pq.write_table(result["rows"], here / f"out-{sys.argv[2]}.parquet")
print(result.stats[0]["skipped_items"])
"""


def _sigint_by_default() -> None:
    """In the child: SIGINT raises, as from a terminal (a background test run ignores it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_a_driver_stopped_mid_run_resumes_with_nothing_lost(
    ray_runtime: str, tmp_path: Path, stop: signal.Signals
) -> None:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "RAY_ADDRESS": ray_runtime}
    (tmp_path / "block").write_text("")
    driver = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), "ray"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_by_default,
    )
    try:
        deadline = time.monotonic() + DEADLINE
        while not (tmp_path / "reached").exists():
            assert driver.poll() is None, "the driver ended before stream 4"
            assert time.monotonic() < deadline, "stream 4 never started"
            time.sleep(0.01)
        driver.send_signal(stop)
        _, err = driver.communicate(timeout=60)  # a Ctrl-C returns although stream 4 is stuck
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(30)
    if stop == signal.SIGINT:
        assert "KeyboardInterrupt" in err
        assert "3 completed stream(s) kept (streams 1, 2, 3)" in err
    (tmp_path / "block").unlink()
    resumed = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "ray"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    skipped = int(resumed.stdout)
    if stop == signal.SIGINT:
        assert skipped == 300  # streams 1-3 were kept before the interrupt returned
    else:
        # Streams 1-3 completed before stream 4 started; a kill loses what the store's writer
        # thread had not committed yet, whole streams: the rerun runs them again.
        assert skipped in (0, 100, 200, 300)
    (tmp_path / "state.duckdb").unlink()
    subprocess.run([sys.executable, str(script), str(tmp_path), "local"], timeout=300, check=True)
    assert pq.read_table(tmp_path / "out-ray.parquet").equals(
        pq.read_table(tmp_path / "out-local.parquet")
    )


LIFECYCLE = """
import ray
import pyarrow as pa
import arrowflow as af

@af.intelligent_streaming(stream_size=10, over="rows", max_concurrency=2)
class Pass(af.Agent):
    def call(self, context):
        return None

rows = pa.table({"n": range(50)})
assert not ray.is_initialized()
af.Flow(Pass).run(rows=rows, engine="ray")
print("after a run:", ray.is_initialized())
warm = af.RayEngine(keep_running=True)
af.Flow(Pass).run(rows=rows, engine=warm)
pool = warm._pool
af.Flow(Pass).run(rows=rows, engine=warm)
print("kept running:", ray.is_initialized(), warm._pool is pool)
warm.shutdown()
print("after shutdown:", ray.is_initialized())
"""


def test_a_runtime_the_engine_started_is_stopped_unless_kept() -> None:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", LIFECYCLE],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert done.stdout.splitlines() == [
        "after a run: False",
        "kept running: True True",
        "after shutdown: False",
    ]


CLI_PIPELINE = """
import pyarrow.compute as pc
import arrowflow as af

@af.intelligent_streaming(stream_size=100, over="rows", max_concurrency=2)
class Double(af.Agent):
    def call(self, context):
        rows = context["rows"]
        return {"rows": rows.append_column("double", pc.multiply(rows["x"], 2))}
"""


def test_the_command_line_runs_on_a_cluster(ray_runtime: str, tmp_path: Path) -> None:
    (tmp_path / "pipe.py").write_text(CLI_PIPELINE)
    pq.write_table(rows(1_000), tmp_path / "in.parquet")
    command = [sys.executable, "-m", "arrowflow", "run", f"{tmp_path / 'pipe.py'}:Double"]
    command += ["--input", str(tmp_path / "in.parquet")]
    outputs = {}
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}.parquet"
        extra = ["--ray-address", ray_runtime] if engine == "ray" else []
        done = subprocess.run(
            [*command, "--output", str(out), "--engine", engine, *extra],
            capture_output=True,
            text=True,
            timeout=300,
            env={key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"},
        )
        assert done.returncode == 0, done.stderr
        outputs[engine] = pq.read_table(out)
    assert outputs["ray"].equals(outputs["local"])
    usage = subprocess.run(
        [*command, "--ray-address", ray_runtime],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert usage.returncode == 2
    assert "--ray-address names the cluster of --engine ray" in usage.stderr
    assert "Traceback" not in usage.stderr


def test_a_warm_pool_leaves_the_runtimes_cpus_to_other_work(ray_runtime: str) -> None:
    warm = af.RayEngine(keep_running=True)
    try:
        result = af.Flow(Metadata).run(rows=rows(1_000), engine=warm)  # 2 actors, kept
        assert result["rows"].num_rows == 1_000

        @ray.remote(num_cpus=2)
        def needs_every_cpu() -> str:
            return "ran"

        assert ray.get(needs_every_cpu.remote(), timeout=DEADLINE) == "ran"
    finally:
        warm.shutdown()
    assert ray.is_initialized()  # the runtime was not the engine's: it is left running
