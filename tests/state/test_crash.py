"""A run killed with SIGKILL loses at most the streams in flight and those completed within the
last ``commit_interval``, and a rerun resumes (§5)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")

STREAM_SIZE = 50
ROWS = 1000
BLOCK_AT = 5  # streams 1..4 are persisted when stream 5 blocks

PIPELINE = f"""
import json
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import arrowflow as af
from arrowflow.state import DuckDBState

state_path, log_path, ready_path, block_at, out_path, interval = sys.argv[1:7]
store = DuckDBState(state_path, table="enriched", key="id", commit_interval=float(interval))


@af.intelligent_streaming(stream_size={STREAM_SIZE}, over="companies", state=store)
class Enrich(af.Agent):
    def call(self, context):
        rows = context["companies"]
        with open(log_path, "a") as log:
            log.write(json.dumps(rows["id"].to_pylist()) + "\\n")
        if context["_batch_metadata"]["batch_number"] == int(block_at):
            # With commit_interval=0, the streams before this one are being committed.
            while float(interval) == 0 and store.pending_streams:
                threading.Event().wait(0.01)
            Path(ready_path).write_text("blocked")
            threading.Event().wait(120)  # until killed; bounded should the test die first
        kept = rows.filter(pa.array(rows["id"].to_numpy() % 7 != 0))
        return {{"companies": kept.append_column("score", pc.multiply(kept["id"], 3))}}


ids = pa.array([(i * 379) % {ROWS} for i in range({ROWS})], pa.int64())
companies = pa.table({{"id": ids, "name": pc.cast(ids, pa.string())}})
result = af.Flow(Enrich).run(companies=companies)
pq.write_table(result["companies"], out_path)
"""


def input_ids() -> list[int]:
    return [(i * 379) % ROWS for i in range(ROWS)]


def logged_ids(log: Path) -> list[int]:
    return [key for line in log.read_text().splitlines() for key in json.loads(line)]


def run_pipeline(script: Path, state: Path, log: Path, out: Path) -> None:
    ready = str(log) + ".ready"
    done = subprocess.run(
        [sys.executable, str(script), str(state), str(log), ready, "0", str(out), "1.0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("interval", "committed"),
    [(0.0, BLOCK_AT - 1), (600.0, 0)],
    ids=["each stream committed", "nothing committed yet"],
)
def test_a_killed_run_resumes_where_it_stopped(
    tmp_path: Path, interval: float, committed: int
) -> None:
    """With ``commit_interval=0`` the streams before the one in flight are durable when it
    runs; with an interval longer than the run, nothing is, and the rerun does everything."""
    script = tmp_path / "pipeline.py"
    script.write_text(PIPELINE)
    state, log, ready = tmp_path / "state.duckdb", tmp_path / "calls.log", tmp_path / "ready"
    arguments = [str(state), str(log), str(ready), str(BLOCK_AT), "-", str(interval)]
    killed = subprocess.Popen(
        [sys.executable, str(script), *arguments],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert killed.poll() is None, killed.communicate()[1]
            assert time.monotonic() < deadline, "the pipeline never reached the blocking stream"
            time.sleep(0.02)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
    finally:
        if killed.poll() is None:
            killed.kill()
            killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL

    ids = input_ids()
    persisted = ids[: committed * STREAM_SIZE]
    assert logged_ids(log) == ids[: BLOCK_AT * STREAM_SIZE]
    log.unlink()

    resumed_out = tmp_path / "resumed.parquet"
    run_pipeline(script, state, log, resumed_out)

    called = logged_ids(log)
    assert not set(called) & set(persisted)
    assert called == ids[len(persisted) :]

    fresh_out = tmp_path / "uninterrupted.parquet"
    run_pipeline(script, tmp_path / "fresh.duckdb", tmp_path / "fresh.log", fresh_out)
    resumed, uninterrupted = pq.read_table(resumed_out), pq.read_table(fresh_out)
    assert resumed.equals(uninterrupted)
    assert resumed.num_rows == sum(1 for key in ids if key % 7)

    with duckdb.connect(str(state), read_only=True) as con:
        counts = con.sql("select count(*), count(distinct id) from enriched").fetchall()
    assert counts == [(resumed.num_rows, resumed.num_rows)]
