"""How a run ends: every clean-up step runs, the final hook fires, each run has its own loop."""

from __future__ import annotations

import asyncio
import threading
import tomllib
from importlib import import_module
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

import arrowflow as af
from arrowflow.state import DuckDBState

ROOT = Path(__file__).resolve().parents[1]
WAIT = 30.0


def _streaming(**options: Any) -> Any:
    return af.intelligent_streaming(10, over="companies", **options)


class BrokenSink:
    """A sink that writes to memory and fails to close or to abort, as asked."""

    def __init__(self, *, close_fails: bool = False, abort_fails: bool = False) -> None:
        self.tables: list[pa.Table] = []
        self.close_fails = close_fails
        self.abort_fails = abort_fails
        self.aborted = False

    def write(self, table: pa.Table) -> None:
        self.tables.append(table)

    def close(self) -> None:
        if self.close_fails:
            raise OSError("disk full while finishing the file")

    def abort(self) -> None:
        self.aborted = True
        if self.abort_fails:
            raise OSError("cannot keep the partial file")

    def read_back(self, schema: pa.Schema) -> pa.RecordBatchReader:
        table = pa.concat_tables(self.tables) if self.tables else schema.empty_table()
        return pa.RecordBatchReader.from_batches(table.schema, table.to_batches())


def test_a_failing_sink_close_still_ends_the_run_in_the_store(make_companies, tmp_path) -> None:
    store = DuckDBState(tmp_path / "state.duckdb", table="t", key="id")

    @_streaming(state=store)
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            return None

    with pytest.raises(OSError, match="disk full"):
        af.Flow(Work).run(companies=make_companies(30), sink=BrokenSink(close_fails=True))
    assert not store.is_open
    assert store.runs()["status"].to_pylist() == ["failed"]
    assert len(store.to_arrow()) == 30  # the streams that completed stay persisted


def test_the_runs_own_error_is_not_hidden_by_a_clean_up_error(make_companies, tmp_path) -> None:
    store = DuckDBState(tmp_path / "state.duckdb", table="t", key="id")
    sink = BrokenSink(abort_fails=True)

    @_streaming(state=store)
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            if context["_batch_metadata"]["batch_number"] == 2:
                raise ValueError("bad row")

    with pytest.raises(af.BatchExecutionError) as caught:
        af.Flow(Work).run(companies=make_companies(30), sink=sink)

    assert isinstance(caught.value.original_error, ValueError)
    notes = getattr(caught.value, "__notes__", [])
    assert any("the sink" in note and "cannot keep the partial file" in note for note in notes)
    assert sink.aborted
    assert store.runs()["status"].to_pylist() == ["failed"]
    assert not store.is_open


def test_a_failing_progress_bar_does_not_skip_the_rest(make_companies, tmp_path, monkeypatch):
    import arrowflow.progress

    class Bar:
        def __init__(self, description: str, total: int | None) -> None:
            pass

        def update(self, rows_in: int, failed: bool, total: int | None) -> None:
            pass

        def close(self) -> None:
            raise RuntimeError("terminal went away")

    monkeypatch.setattr(arrowflow.progress, "ProgressBar", Bar)
    store = DuckDBState(tmp_path / "state.duckdb", table="t", key="id")
    sink = BrokenSink()

    @_streaming(state=store)
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            return None

    with pytest.raises(RuntimeError, match="terminal went away"):
        af.Flow(Work).run(companies=make_companies(20), sink=sink, progress=True)
    assert store.runs()["status"].to_pylist() == ["failed"]
    assert not store.is_open


# ------------------------------------------------------------------ the final hook


def test_the_final_hook_fires_when_every_stream_failed(make_companies) -> None:
    seen: list[tuple[Any, Any, int]] = []

    @_streaming(on_error="continue")
    class Failing(af.Agent):
        def call(self, context: Any) -> None:
            raise ValueError("always")

        def on_stream_complete(self, stream_num: Any, total: Any, results: pa.Table) -> None:
            seen.append((stream_num, total, results.num_rows))

    companies = make_companies(30)
    result = af.Flow(Failing).run(companies=companies)
    assert seen == [(3, 3, 0)]
    assert result["companies"].schema.equals(companies.schema)
    assert result.stats[0]["failed_batches"] == 3


def test_the_final_hook_gets_its_own_reader_with_a_sink(make_companies, tmp_path) -> None:
    seen: list[int] = []

    @_streaming()
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            return None

        def on_stream_complete(self, stream_num: Any, total: Any, results: Any) -> None:
            seen.append(results.read_all().num_rows)  # consumes the hook's reader

    result = af.Flow(Work).run(companies=make_companies(25), sink=tmp_path / "out.parquet")
    assert seen == [25]
    assert result["companies"].read_all().num_rows == 25  # the result's reader is untouched


def test_no_hook_fires_for_an_empty_input(make_companies) -> None:
    seen: list[Any] = []

    @_streaming(on_stream_complete=lambda *args: seen.append(args))
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            return None

    af.Flow(Work).run(companies=make_companies(0))
    assert seen == []


# ------------------------------------------------------------------ event loops


def test_each_run_has_its_own_event_loop_closed_at_the_end(make_companies) -> None:
    loops: list[asyncio.AbstractEventLoop] = []

    @_streaming(max_concurrency=2)
    class Work(af.Agent):
        async def call(self, context: Any) -> None:
            loops.append(asyncio.get_running_loop())

    af.Flow(Work).run(companies=make_companies(20))
    af.Flow(Work).run(companies=make_companies(20))
    assert len(loops) == 4
    assert loops[0] is loops[1]
    assert loops[2] is loops[3]
    assert loops[0] is not loops[2]
    assert all(loop.is_closed() for loop in loops)


def test_a_run_that_blocks_its_loop_cannot_make_a_later_run_time_out(make_companies) -> None:
    unblock = threading.Event()

    @_streaming(timeout=0.3, on_error="continue")
    class Blocking(af.Agent):
        async def call(self, context: Any) -> None:
            unblock.wait(WAIT)  # blocks the event loop itself, not just this coroutine

    @_streaming(timeout=5.0)
    class Polite(af.Agent):
        async def call(self, context: Any) -> None:
            await asyncio.sleep(0)

    try:
        blocked = af.Flow(Blocking).run(companies=make_companies(10))
        assert blocked.stats[0]["streams"]["status"].to_pylist() == ["failed"]
        later = af.Flow(Polite).run(companies=make_companies(30))
        assert later.stats[0]["streams"]["status"].to_pylist() == ["ok", "ok", "ok"]
    finally:
        unblock.set()


def test_an_async_agent_outside_a_scope_gets_a_loop_closed_after_it() -> None:
    loops: list[asyncio.AbstractEventLoop] = []

    class Fetch(af.Agent):
        async def call(self, context: Any) -> dict[str, Any]:
            loops.append(asyncio.get_running_loop())
            return {"answer": 42}

    assert af.Flow(Fetch).run()["answer"] == 42
    assert loops[0].is_closed()


# ------------------------------------------------------------------ contract gaps


def test_a_scope_without_a_trigger_is_invalid_and_refuses_to_run() -> None:
    scope = af.BatchingScope(None)
    assert scope.is_valid() is False
    assert scope.chunk_size is None
    assert scope.array_field is None
    with pytest.raises(af.ConfigurationError, match=r"BatchingScope\(None\) cannot run"):
        af.PipelineBatchExecutor(scope).execute_in_batches({"rows": pa.table({"n": [1]})})


def test_every_console_script_declared_exists() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for name, target in project.get("scripts", {}).items():
        module, _, function = target.partition(":")
        assert callable(getattr(import_module(module), function)), name
