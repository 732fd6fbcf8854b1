"""Attempts mean what they say; interrupts are never retried; abandoned attempts write nothing."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pytest

import arrowflow as af
from arrowflow._retry import is_interrupt
from arrowflow.state import DuckDBState

if TYPE_CHECKING:
    import pyarrow as pa

WAIT = 30.0  # generous bound on anything a test waits for


def _streaming(**options: Any) -> Any:
    return af.intelligent_streaming(10, over="companies", **options)


def test_a_clean_stream_with_a_state_store_is_one_attempt(make_companies, tmp_path) -> None:
    store = DuckDBState(tmp_path / "state.duckdb", table="t", key="id")

    @_streaming(state=store, retries=2)
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            return None

    result = af.Flow(Work).run(companies=make_companies(30))
    assert result.stats[0]["streams"]["attempts"].to_pylist() == [1, 1, 1]


class FlakyStore(DuckDBState):
    """A store whose persist fails ``failures`` times in a row before it succeeds."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path, table="t", key="id")
        self.failures = failures
        self.persists = 0

    def persist_each_stream(self, results: pa.Table, context: Any) -> None:
        self.persists += 1
        if self.persists <= self.failures:
            raise ConnectionError(f"disk hiccup {self.persists}")
        super().persist_each_stream(results, context)


def test_persisting_has_its_own_retry_budget(make_companies, tmp_path) -> None:
    store = FlakyStore(tmp_path / "state.duckdb", failures=1)
    calls: list[int] = []

    @_streaming(state=store, retries=1, backoff=0)
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            calls.append(context["_batch_metadata"]["batch_number"])

    result = af.Flow(Work).run(companies=make_companies(20))

    assert calls == [1, 2]  # the agents ran once per stream: persisting was retried alone
    assert result.stats[0]["streams"]["attempts"].to_pylist() == [1, 1]
    assert store.persists == 3
    assert result.stats[0]["successful_batches"] == 2


def test_a_persist_failing_past_its_budget_names_its_attempts(make_companies, tmp_path) -> None:
    store = FlakyStore(tmp_path / "state.duckdb", failures=10)

    @_streaming(state=store, retries=2, backoff=0)
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            return None

    with pytest.raises(af.BatchExecutionError) as caught:
        af.Flow(Work).run(companies=make_companies(20))

    message = str(caught.value)
    assert "persist_each_stream" in message
    assert "(after 3 attempt(s) to persist)" in message
    assert store.persists == 3
    assert store.runs()["status"].to_pylist() == ["failed"]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (KeyboardInterrupt(), True),
        (SystemExit(1), True),
        (RuntimeError("Query interrupted"), True),
        (duckdb.InterruptException("INTERRUPT Error: Interrupted!"), True),
        (RuntimeError("something else"), False),
        (duckdb.IOException("disk"), False),
        (ValueError("Query interrupted"), False),
    ],
)
def test_what_counts_as_an_interrupt(error: BaseException, expected: bool) -> None:
    assert is_interrupt(error) is expected


@pytest.mark.parametrize("on_error", ["raise", "continue"])
def test_a_duckdb_interrupt_is_never_retried_nor_swallowed(make_companies, on_error) -> None:
    calls: list[int] = []

    @_streaming(retries=3, backoff=0, on_error=on_error)
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            calls.append(1)
            raise RuntimeError("Query interrupted")

    with pytest.raises(KeyboardInterrupt) as caught:
        af.Flow(Work).run(companies=make_companies(30))
    assert calls == [1]
    assert isinstance(caught.value.__cause__, RuntimeError)
    stats = caught.value.execution_stats  # type: ignore[attr-defined]
    assert stats["failed_batches"] == 0


def test_an_abandoned_attempt_never_writes_to_the_store_or_the_sink(
    make_companies, tmp_path
) -> None:
    """A thread that overran its timeout finishes after the run ended: nothing of it lands."""
    store = DuckDBState(tmp_path / "state.duckdb", table="t", key="id")
    release, finished = threading.Event(), threading.Event()
    agents_called: list[int] = []

    @_streaming(state=store, timeout=0.2, on_error="continue")
    class Slow(af.Agent):
        def call(self, context: Any) -> None:
            stream = context["_batch_metadata"]["batch_number"]
            if stream == 2:
                release.wait(WAIT)
            agents_called.append(stream)

    class After(af.Agent):  # a second agent of the scope: never reached by the abandoned one
        def call(self, context: Any) -> None:
            stream = context["_batch_metadata"]["batch_number"]
            agents_called.append(-stream)
            if stream == 2:
                finished.set()

    sink = tmp_path / "out.parquet"
    result = (Slow >> After).run(companies=make_companies(30), sink=sink)
    assert result.stats[0]["streams"]["status"].to_pylist() == ["ok", "failed", "ok"]

    release.set()
    for thread in threading.enumerate():
        if thread.name == "arrowflow-attempt":
            thread.join(WAIT)
    assert 2 in agents_called  # the abandoned call did finish, in the background,
    assert -2 not in agents_called  # but its attempt stopped before the next agent
    assert not finished.is_set()
    assert not store.is_open
    assert store.to_arrow()["id"].to_pylist() == list(range(10)) + list(range(20, 30))
    assert af.read_parquet(sink).num_rows == 20
