"""Peak memory and throughput of a dataset larger than the memory it is allowed.

A Parquet dataset of about ``ARROWFLOW_BENCH_MEMORY_GB`` GiB of Arrow data (default 2; int64,
float64 and string columns, several files of several row groups, from a fixed seed) is generated
once into ``benchmarks/.data/`` (or ``ARROWFLOW_BENCH_DATA_DIR``) and reused by later sessions.
Each run happens in a child process of its own, which reports its own peak RSS
(``ru_maxrss``) and the seconds from opening the dataset to the end of the run:

- **scan + sink**: ``af.scan_parquet`` into a three-agent scope (add a column, drop a third of
  the rows, add a column) at 100,000 rows per stream, written by ``run(sink=...)`` to Parquet.
  Goal: peak RSS at most 400 MB whatever the dataset's size.
- **read whole**: the same scope over ``af.read_parquet`` (the whole dataset in memory), no
  sink. Goal: scan + sink at least 0.8x its throughput.
- **read + sink**: ``af.read_parquet`` into the same sink: the cost of writing the output,
  apart from the cost of reading lazily.

Goals are reported, never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from conftest import Figures

GIB = 2**30
SIZE_GB = float(os.environ.get("ARROWFLOW_BENCH_MEMORY_GB", "2"))
ROUNDS = int(os.environ.get("ARROWFLOW_BENCH_MEMORY_ROUNDS", "1"))
DATA_DIR = Path(os.environ.get("ARROWFLOW_BENCH_DATA_DIR", str(Path(__file__).parent / ".data")))
SEED = 20240601
STREAM_SIZE = 100_000
CHUNK_ROWS = 1_000_000  # rows generated at once: the generator's own memory stays low
FILE_CHUNKS = 8  # chunks (and row groups) per file
GOAL_RSS_MB = 400
GOAL_THROUGHPUT = 0.8
RUNNERS = {"scan_sink": "scan + sink", "read_whole": "read whole", "read_sink": "read + sink"}


# --------------------------------------------------------------------------- dataset


def _chunk(index: int) -> pa.Table:
    """Chunk ``index`` of the dataset: ``CHUNK_ROWS`` rows from a seed of its own."""
    import numpy as np

    rng = np.random.default_rng([SEED, index])
    start = index * CHUNK_ROWS
    k = pa.array(rng.integers(0, 1_000_000, CHUNK_ROWS))
    return pa.table(
        {
            "id": pa.array(np.arange(start, start + CHUNK_ROWS, dtype=np.int64)),
            "x": pa.array(rng.random(CHUNK_ROWS)),
            "k": k,
            "name": pc.binary_join_element_wise("company-", pc.cast(k, pa.string()), ""),
        }
    )


def dataset_dir(size_gb: float = SIZE_GB) -> Path:
    """The dataset's directory, generated on first use; a ``_COMPLETE`` file marks it done."""
    directory = DATA_DIR / f"memory-{size_gb:g}gib-seed{SEED}"
    if (directory / "_COMPLETE").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.parquet"):
        stale.unlink()
    chunks = max(1, round(size_gb * GIB / _chunk(0).nbytes))
    writer: pq.ParquetWriter | None = None
    for index in range(chunks):
        chunk = _chunk(index)
        if index % FILE_CHUNKS == 0:
            if writer is not None:
                writer.close()
            path = directory / f"part-{index // FILE_CHUNKS:04d}.parquet"
            writer = pq.ParquetWriter(path, chunk.schema)
        assert writer is not None
        writer.write_table(chunk, row_group_size=CHUNK_ROWS)
    assert writer is not None
    writer.close()
    summary = {"rows": chunks * CHUNK_ROWS, "arrow_bytes": chunks * _chunk(0).nbytes}
    (directory / "_COMPLETE").write_text(json.dumps(summary))
    return directory


# --------------------------------------------------------------------------- child process


def _flow() -> Any:
    import arrowflow as af

    @af.intelligent_streaming(STREAM_SIZE, over="rows")
    class DoubleX(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            rows = context["rows"]
            return {"rows": rows.append_column("y", pc.multiply(rows["x"], 2.0))}

    class DropThirds(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            rows = context["rows"]
            return {"rows": rows.filter(pc.not_equal(pc.remainder(rows["k"], 3), 0))}

    class AddId(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            rows = context["rows"]
            z = pc.add(rows["y"], pc.cast(rows["id"], pa.float64()))
            return {"rows": rows.append_column("z", z)}

    return DoubleX >> DropThirds >> AddId


def child(runner: str, data: str, out: str) -> dict[str, Any]:
    """One run, measured from inside the process that does it."""
    import resource
    import time

    import arrowflow as af

    flow = _flow()
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if runner in ("scan_sink", "read_sink"):
        rows = af.scan_parquet(data) if runner == "scan_sink" else af.read_parquet(data)
        result = flow.run(rows=rows, sink=out, progress=False)
        seconds = time.perf_counter() - started
        assert isinstance(result["rows"], pa.RecordBatchReader)
        rows_out = pq.read_metadata(out).num_rows
        # A dataset scan left open when the interpreter exits may crash it (apache/arrow#36389).
        result["rows"].close()
    else:
        result = flow.run(rows=af.read_parquet(data), progress=False)
        seconds = time.perf_counter() - started
        rows_out = result["rows"].num_rows
    stats = result.stats[0]
    return {
        "seconds": seconds,
        "rows_in": stats["total_items"],
        "rows_out": rows_out,
        "streams": stats["total_batches"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "baseline_rss_mb": baseline_kb / 1024,
    }


# A process's ru_maxrss keeps the peak of the image it replaced by exec: a child exec'd straight
# from this (large) pytest process would report pytest's own peak. A small Python process in
# between, which forks the measured one, leaves it a high-water mark of its own.
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def run_child(runner: str, data: Path, out: Path) -> dict[str, Any]:
    """Run ``child(runner, ...)`` in a fresh process and return what it measured."""
    command = [sys.executable, __file__, runner, str(data), str(out)]
    completed = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *command],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{runner} child failed:\n{completed.stderr}")
    measured: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return measured


# --------------------------------------------------------------------------- benchmark


def _report(figures: Figures, data: Path, results: dict[str, dict[str, Any]]) -> None:
    summary = json.loads((data / "_COMPLETE").read_text())
    disk = sum(path.stat().st_size for path in data.glob("*.parquet"))
    files = len(list(data.glob("*.parquet")))
    heading = (
        f"{summary['rows']:,} rows, {summary['arrow_bytes'] / GIB:.2f} GiB as Arrow, "
        f"{disk / GIB:.2f} GiB of Parquet in {files} files, {STREAM_SIZE:,} rows per stream, "
        f"best of {ROUNDS} round(s)"
    )
    lines = []
    for runner, label in RUNNERS.items():
        if runner not in results:
            continue
        found = results[runner]
        rate = found["rows_in"] / found["seconds"] / 1e6
        lines.append(
            f"{label:>12}: {found['seconds']:7.2f} s  {rate:6.2f} M rows/s  peak RSS "
            f"{found['peak_rss_mb']:7.0f} MB (after imports {found['baseline_rss_mb']:.0f} MB)"
        )
    if results.keys() == RUNNERS.keys():
        scan, whole, sunk = results["scan_sink"], results["read_whole"], results["read_sink"]
        ratio = whole["seconds"] / scan["seconds"]
        rss_met = "met" if scan["peak_rss_mb"] <= GOAL_RSS_MB else "missed"
        ratio_met = "met" if ratio >= GOAL_THROUGHPUT else "missed"
        lines.append(f"scan + sink peak RSS <= {GOAL_RSS_MB} MB: {rss_met}")
        lines.append(
            f"scan + sink throughput / read whole: {ratio:.2f}x; goal >= {GOAL_THROUGHPUT}: "
            f"{ratio_met}"
        )
        lines.append(
            f"scan + sink throughput / read + sink: {sunk['seconds'] / scan['seconds']:.2f}x "
            "(both write the same output)"
        )
    for line in lines:
        figures.add("arrowflow memory: scan + sink against read whole", heading, line)


_RESULTS: dict[str, dict[str, Any]] = {}


def _benchmark_runner(benchmark: Any, figures: Figures, tmp_path: Path, runner: str) -> None:
    data = dataset_dir()
    benchmark.group = f"memory: {SIZE_GB:g} GiB dataset"
    rounds: list[dict[str, Any]] = []

    def run() -> None:
        rounds.append(run_child(runner, data, tmp_path / f"out-{len(rounds)}.parquet"))

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    best = min(rounds, key=lambda found: found["seconds"])
    assert all(found["rows_in"] == best["rows_in"] > 0 for found in rounds)
    _RESULTS[runner] = best
    if len(_RESULTS) == len(RUNNERS):
        assert len({found["rows_out"] for found in _RESULTS.values()}) == 1
        _report(figures, data, _RESULTS)
    benchmark.extra_info.update(best)


def test_scan_into_sink(benchmark: Any, figures: Figures, tmp_path: Path) -> None:
    _benchmark_runner(benchmark, figures, tmp_path, "scan_sink")


def test_read_whole(benchmark: Any, figures: Figures, tmp_path: Path) -> None:
    _benchmark_runner(benchmark, figures, tmp_path, "read_whole")


def test_read_into_sink(benchmark: Any, figures: Figures, tmp_path: Path) -> None:
    _benchmark_runner(benchmark, figures, tmp_path, "read_sink")


if __name__ == "__main__":
    print(json.dumps(child(*sys.argv[1:4])))
