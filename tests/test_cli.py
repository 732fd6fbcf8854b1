"""The ``arrowflow`` command, run as users run it: ``python -m arrowflow`` and the installed
script, in subprocesses, on a pipeline module and Parquet files written to ``tmp_path``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from arrowflow.cli import main

SCRIPT = Path(sys.executable).with_name("arrowflow")

PIPELINE = '''
import os
import time
from pathlib import Path

import pyarrow.compute as pc

import arrowflow as af


@af.intelligent_streaming(stream_size=4, over="rows")
class Double(af.Agent):
    def call(self, context):
        rows = context["rows"]
        return {"rows": rows.append_column("double", pc.multiply(rows["n"], 2))}


class Doubling(af.Pipeline):
    flow = Double


doubling = af.Flow(Double)


@af.intelligent_streaming(stream_size=4, over="rows")
class Fails(af.Agent):
    def call(self, context):
        if context["_batch_metadata"]["batch_number"] == 2:
            raise ValueError("boom")
        return None


@af.intelligent_streaming(stream_size=2, over="rows", key="id")
class Blocks(af.Agent):
    """Blocks in its third stream while BLOCK_MARKER is set, after writing that file."""

    def call(self, context):
        marker = os.environ.get("BLOCK_MARKER")
        if marker and context["_batch_metadata"]["batch_number"] == 3:
            Path(marker).write_text("blocked")
            released = Path(marker + ".never")
            deadline = time.monotonic() + 60
            while not released.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        rows = context["rows"]
        return {"rows": rows.append_column("double", pc.multiply(rows["n"], 2))}


def helper():
    return None
'''

ROWS = pa.table({"id": pa.array(range(10), pa.int64()), "n": pa.array(range(10), pa.int64())})


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A directory holding ``pipe.py``, a module that fails to import and ``in.parquet``."""
    (tmp_path / "pipe.py").write_text(PIPELINE)
    (tmp_path / "broken.py").write_text("raise RuntimeError('cannot start')\n")
    pq.write_table(ROWS, tmp_path / "in.parquet")
    return tmp_path


@pytest.fixture
def in_project(project: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The project as the working directory of this process, for calls of ``main()``; the
    project's modules it imports are forgotten afterwards (each test writes its own)."""
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield project
    for module in ("pipe", "broken"):
        sys.modules.pop(module, None)


def arrowflow(
    cwd: Path, *args: str, script: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the command in ``cwd``; ``script`` runs the installed console script."""
    if script:
        assert SCRIPT.exists(), f"the console script is not installed at {SCRIPT}"
    command = [str(SCRIPT)] if script else [sys.executable, "-m", "arrowflow"]
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=_environment(env),
    )


def _environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k != "ARROWFLOW_TRACEBACK"}
    return {**environment, **(extra or {})}


def one_error_line(completed: subprocess.CompletedProcess[str], kind: str = "error") -> str:
    """The single line the command wrote on stderr, checked to be a user error's."""
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith(f"arrowflow: {kind}: "), completed.stderr
    return lines[0]


def expected_output() -> pa.Table:
    return ROWS.append_column("double", pc.multiply(ROWS["n"], 2))


@pytest.mark.parametrize(
    ("verb", "mentions"),
    [
        (None, ["run", "demo", "bench", "stats", "--traceback"]),
        (
            "run",
            [
                "MODULE:PIPELINE",
                "--input",
                "--output",
                "--field",
                "--state",
                "--key",
                "--stream-size",
                "--max-concurrency",
                "--engine",
                "--progress",
                "--no-progress",
            ],
        ),
        ("demo", ["--stream-size", "--fresh"]),
        ("bench", ["--stream-sizes", "--repeat", "--warmup", "--plot", "--json", "--field"]),
        ("stats", ["STATE.duckdb", "--table"]),
    ],
)
def test_help_of_the_program_and_of_each_verb(
    tmp_path: Path, verb: str | None, mentions: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    if verb is None:
        completed = arrowflow(tmp_path, "--help", script=True)
        assert completed.returncode == 0, completed.stderr
        shown = completed.stdout
    else:
        with pytest.raises(SystemExit) as exit_info:
            main([verb, "--help"])
        assert exit_info.value.code == 0
        shown = capsys.readouterr().out
    for option in mentions:
        assert option in shown


@pytest.mark.parametrize(
    "target",
    # A Pipeline by module name, a Flow by file path, an agent by module name.
    ["pipe:Doubling", "pipe.py:doubling", "pipe:Double"],
)
def test_run_writes_the_field_and_prints_a_line_per_scope(project: Path, target: str) -> None:
    completed = arrowflow(
        project, "run", target, "--input", "in.parquet", "--output", "out.parquet"
    )
    assert completed.returncode == 0, completed.stderr
    assert pq.read_table(project / "out.parquet").equals(expected_output())
    assert "Double: 3 streams, 10 rows in, 10 out, 0 skipped, 0 loaded, " in completed.stdout
    assert completed.stderr == ""


def test_the_output_may_be_a_duckdb_table(project: Path) -> None:
    completed = arrowflow(
        project, "run", "pipe:Doubling", "--input", "in.parquet", "--output", "out.duckdb::doubled"
    )
    assert completed.returncode == 0, completed.stderr
    with duckdb.connect(str(project / "out.duckdb"), read_only=True) as con:
        assert pa.table(con.sql("select * from doubled")).equals(expected_output())


def test_a_file_path_is_imported_from_any_directory(project: Path) -> None:
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    target = f"{project / 'pipe.py'}:doubling"
    completed = arrowflow(elsewhere, "run", target, "--input", str(project / "in.parquet"))
    assert completed.returncode == 0, completed.stderr
    assert "Double: 3 streams" in completed.stdout


def test_the_input_may_be_a_directory_of_parquet_files(
    in_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parts = in_project / "parts"
    parts.mkdir()
    pq.write_table(ROWS.slice(0, 6), parts / "a.parquet")
    pq.write_table(ROWS.slice(6), parts / "b.parquet")
    args = ["--output", "out.parquet", "--no-progress", "--engine", "local"]
    assert main(["run", "pipe:Doubling", "--input", "parts", *args]) == 0
    assert "Double: 3 streams, 10 rows in, 10 out" in capsys.readouterr().out
    assert pq.read_table(in_project / "out.parquet").equals(expected_output())


def test_stream_size_changes_the_number_of_streams(project: Path) -> None:
    completed = arrowflow(
        project, "run", "pipe:Double", "--input", "in.parquet", "--stream-size", "2", script=True
    )
    assert completed.returncode == 0, completed.stderr
    assert "Double: 5 streams, 10 rows in, 10 out" in completed.stdout


def test_a_rerun_with_state_skips_everything(project: Path) -> None:
    args = ["run", "pipe:Doubling", "--input", "in.parquet", "--state", "state.duckdb"]
    first = arrowflow(project, *args, "--key", "id", "--max-concurrency", "2")
    assert first.returncode == 0, first.stderr
    assert "0 skipped" in first.stdout
    again = arrowflow(project, *args, "--key", "id", "--output", "out.parquet")
    assert again.returncode == 0, again.stderr
    assert "10 rows in, 10 out, 10 skipped, 10 loaded" in again.stdout
    assert pq.read_table(project / "out.parquet").equals(expected_output())
    stored = duckdb.connect(str(project / "state.duckdb"), read_only=True)
    assert stored.sql("select count(*) from double").fetchall() == [(10,)]
    stored.close()


def test_a_failing_agent_exits_1_with_one_line_naming_it(project: Path) -> None:
    args = ["run", "pipe:Fails", "--input", "in.parquet"]
    failed = arrowflow(project, *args)
    assert failed.returncode == 1
    line = one_error_line(failed)
    assert "Agent 'Fails', stream 2/3" in line
    assert "ValueError: boom" in line
    assert "1 stream of 'Fails' completed" in line
    assert "Traceback" not in failed.stderr

    shown = arrowflow(project, "--traceback", *args)
    assert shown.returncode == 1
    assert "Traceback (most recent call last)" in shown.stderr
    assert shown.stderr.splitlines()[-1] == line


@pytest.mark.parametrize("asked", ["option", "environment"])
def test_the_traceback_is_shown_when_asked(
    in_project: Path,
    asked: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["run", "pipe:Fails", "--input", "in.parquet"]
    if asked == "option":
        args.append("--traceback")  # after the verb, this time
    else:
        monkeypatch.setenv("ARROWFLOW_TRACEBACK", "1")
    assert main(args) == 1
    shown = capsys.readouterr().err
    assert "Traceback (most recent call last)" in shown
    assert "ValueError: boom" in shown
    assert shown.splitlines()[-1].startswith("arrowflow: error: Agent 'Fails', stream 2/3")


USAGE_ERRORS = [
    (["run", "pipe", "--input", "in.parquet"], "expected MODULE:PIPELINE"),
    (["run", "missing:Double", "--input", "in.parquet"], "no module named 'missing'"),
    (["run", "broken:Double", "--input", "in.parquet"], "RuntimeError: cannot start"),
    (["run", "pipe:Nope", "--input", "in.parquet"], "has no attribute 'Nope'"),
    (["run", "pipe:Double", "--input", "missing.parquet"], "no such file or directory"),
    (["run", "pipe:Double", "--input", "in.parquet", "--field", "other"], "unknown field"),
    (["run", "pipe:Double", "--input", "in.parquet", "--stream-size", "0"], "positive"),
    (["run", "pipe:Double", "--input", "in.parquet", "--stream-size", "abc"], "integer"),
    (["run", "pipe:Double", "--input", "in.parquet", "--state", "s.duckdb"], "--key"),
    (["stats", "in.parquet"], "is not a DuckDB database: it is a Parquet file"),
    (["bench", "pipe:Double", "--input", "in.parquet", "--stream-sizes", "2,x"], "integer"),
]


def test_usage_errors_exit_2_with_one_line(project: Path) -> None:
    # A few at a time: each is a process of its own, and they only read the project.
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = list(pool.map(lambda case: arrowflow(project, *case[0]), USAGE_ERRORS))
    for (args, message), completed in zip(USAGE_ERRORS, runs, strict=True):
        assert completed.returncode == 2, (args, completed.stderr)
        assert message in one_error_line(completed), args
        assert "Traceback" not in completed.stderr
    assert not (project / "s.duckdb").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "missing.py:Double", "--input", "in.parquet"], "no such file: missing.py"),
        (["run", "pipe:helper", "--input", "in.parquet"], "not a Pipeline subclass"),
        (["run", "pipe:Double", "--input", "pipe.py"], "--input pipe.py: cannot scan Parquet"),
        (["run", "pipe:Double", "--input", "in.parquet", "--engine", "warp"], "invalid choice"),
        (["run", "pipe:Double", "--input", "in.parquet", "--key", "id"], "give --state"),
        (["run", "pipe:Double"], "required: --input"),
        (["stats", "plain.duckdb"], "not an arrowflow state file"),
        (["stats", "missing.duckdb"], "does not exist"),
        (["stats", "."], "is a directory"),
    ],
)
def test_more_usage_errors_in_process(
    in_project: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = duckdb.connect(str(in_project / "plain.duckdb"))
    plain.execute("create table t (x integer)")
    plain.close()
    assert main(args) == 2
    captured = capsys.readouterr()
    completed = subprocess.CompletedProcess(args, 2, captured.out, captured.err)
    assert message in one_error_line(completed)


def test_ctrl_c_keeps_the_completed_streams_for_a_rerun(project: Path) -> None:
    marker = project / "blocked"
    args = ["run", "pipe:Blocks", "--input", "in.parquet", "--state", "state.duckdb"]
    process = subprocess.Popen(
        [sys.executable, "-m", "arrowflow", *args, "--output", "out.parquet"],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_environment({"BLOCK_MARKER": str(marker)}),
        # Ctrl-C's default action, whatever this process inherited (a shell's background job
        # ignores SIGINT, and Python then leaves it ignored).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the agent never reached its third stream"
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130, stderr
    completed = subprocess.CompletedProcess(args, 130, "", stderr)
    line = one_error_line(completed, kind="interrupted")
    assert "2 streams of 'Blocks' completed and were saved to" in line
    assert "Rows written so far are in out.parquet.partial" in line
    assert not (project / "out.parquet").exists()

    stats = arrowflow(project, "stats", "state.duckdb")
    assert stats.returncode == 0, stats.stderr
    assert "table blocks (key id): 4 result rows, 4 rows done" in stats.stdout
    assert "#1 interrupted" in stats.stdout

    again = arrowflow(project, *args, "--output", "out.parquet")
    assert again.returncode == 0, again.stderr
    assert "Blocks: 5 streams, 10 rows in, 10 out, 4 skipped, 4 loaded" in again.stdout
    assert pq.read_table(project / "out.parquet").equals(expected_output())


def test_stats_of_one_table_with_its_failures(
    in_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["run", "pipe:Fails", "--input", "in.parquet", "--state", "s.duckdb", "--key", "id"]
    assert main(args) == 1
    assert main(args) == 1
    failed = capsys.readouterr().err.splitlines()
    assert len(failed) == 2
    saved = f"1 stream of 'Fails' completed and was saved to {in_project / 's.duckdb'}"
    assert saved in failed[1]
    assert main(["stats", "s.duckdb", "--table", "FAILS"]) == 0
    shown = capsys.readouterr().out
    assert "table fails (key id): 4 result rows, 4 rows done" in shown
    assert "#1 failed" in shown
    assert "#2 failed" in shown
    assert "(4 skipped, 4 loaded)" in shown
    assert "run #2, stream 2, 4 rows: ValueError: boom" in shown
    assert main(["stats", "s.duckdb", "--table", "other"]) == 2
    assert "has no table 'other' (tables: fails)" in capsys.readouterr().err


def test_bench_prints_json_and_saves_a_plot(project: Path) -> None:
    completed = arrowflow(
        project,
        *("bench", "pipe:Double", "--input", "in.parquet", "--stream-sizes", "2,5"),
        *("--repeat", "1", "--warmup", "0", "--json", "--plot", "curve.png"),
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert [row["stream_size"] for row in report["rows"]] == [2, 5]
    assert [row["streams"] for row in report["rows"]] == [5, 2]
    assert report["best"] in (2, 5)
    png = (project / "curve.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert len(png) > 1_000
