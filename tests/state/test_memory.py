"""MemoryState on its own: lifecycle, one run at a time, ownership, versions, what it answers
from the begin-run pass. The behaviour it shares with DuckDBState is tested against both in
``test_duckdb*.py`` (``every_store``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from state_helpers import Build, DuckDBState, MemoryState, called_keys, expected_scores, run

import arrowflow as af
from arrowflow.state import ScopeInfo, memory
from arrowflow.state.base import StreamInfo


def test_the_lifecycle_goes_closed_running_open_and_close_discards_everything(
    scoring_agent: Build, make_companies: Callable[..., pa.Table]
) -> None:
    store = MemoryState()
    assert (store.lifecycle, store.is_open, store.pending_streams) == ("closed", False, 0)
    parts = af.Flow(scoring_agent(store, 10)).stream(companies=make_companies(30))
    assert next(parts).stream_num == 1
    assert store.lifecycle == "running"
    assert list(parts)[-1].stream_num == 3
    assert (store.lifecycle, store.is_open) == ("open", True)
    assert store.to_arrow().num_rows == 30

    store.close()

    assert store.lifecycle == "closed"
    assert store.runs().num_rows == 0
    with pytest.raises(af.ExecutionError, match="holds no results yet"):
        store.to_arrow()


def test_a_second_run_fails_at_its_start_and_the_first_is_unharmed(
    scoring_agent: Build, calls: list[list[Any]], make_companies: Callable[..., pa.Table]
) -> None:
    with MemoryState() as store:
        first = af.Flow(scoring_agent(store, 10)).stream(companies=make_companies(30))
        next(first)
        calls.clear()
        with pytest.raises(af.ExecutionError, match="a run of this store is in progress"):
            run(scoring_agent(store, 10), companies=make_companies(30))
        assert calls == []
        assert [part.stream_num for part in first] == [2, 3]
        assert store.runs()["status"].to_pylist() == ["ok"]


def test_a_stream_of_an_ended_run_is_refused(make_companies: Callable[..., pa.Table]) -> None:
    companies = make_companies(10)
    scope = ScopeInfo(("m.A",), "companies", "id", companies.schema, "A", "A:1")
    with MemoryState() as store:
        store.begin_run(scope, companies)
        stream = StreamInfo(1, 0, 10, "A:1", {"companies": companies})
        assert not pc.any(store.skip(stream, companies)).as_py()
        store.end_run({}, "interrupted")

        for call in (
            lambda: store.skip(stream, companies),
            lambda: store.load(stream, companies),
            lambda: store.persist(stream, companies, companies),
        ):
            with pytest.raises(af.ExecutionError, match="has ended"):
                call()
        with pytest.raises(af.ExecutionError, match="no results yet"):
            store.to_arrow()


def test_another_scope_replaces_the_first_which_may_not_come_back(
    scoring_agent: Build, calls: list[list[Any]], make_companies: Callable[..., pa.Table]
) -> None:
    companies = make_companies(30)
    with MemoryState(table="shared") as store:
        run(scoring_agent(store, 10), companies=companies)
        calls.clear()
        replaced = run(scoring_agent(store, 10, rename="OtherFit"), companies=companies)
        assert sum(len(call) for call in calls) == 30
        calls.clear()

        with pytest.raises(af.ExecutionError, match="is shared by two scopes") as info:
            run(scoring_agent(store, 10), companies=companies)
        assert "OtherFit" in str(info.value)
        assert "its own table=" in str(info.value)
        assert calls == []
        assert store.to_arrow().equals(replaced["companies"])
        again = run(scoring_agent(store, 10, rename="OtherFit"), companies=companies)
        assert calls == []
        assert again["companies"].equals(replaced["companies"])


def test_two_scopes_of_one_flow_sharing_a_store_are_refused_before_any_agent_runs(
    make_companies: Callable[..., pa.Table],
) -> None:
    seen: list[str] = []

    def scope(store: MemoryState, name: str) -> type[af.Agent]:
        @af.intelligent_streaming(stream_size=10, over="companies", state=store)
        class Scope(af.Agent):
            def call(self, context: Any) -> None:
                seen.append(name)

        return type(name, (Scope,), {})

    @af.ends_batching
    class End(af.Agent):
        def call(self, context: Any) -> None:
            seen.append("end")

    with MemoryState(table="shared") as shared, MemoryState(table="shared") as other:
        with pytest.raises(af.ConfigurationError, match="one in-memory store"):
            (scope(shared, "First") >> End >> scope(shared, "Second")).run(
                companies=make_companies(20)
            )
        assert seen == []
        (scope(shared, "First") >> End >> scope(other, "Second")).run(companies=make_companies(20))
        assert seen == ["First", "First", "end", "Second", "Second"]


def _answering(store: MemoryState, answers: pa.Table, calls: list[int]) -> type[af.Agent]:
    """A trigger whose agent returns the rows of ``answers`` of the stream's ids."""

    @af.intelligent_streaming(stream_size=4, over="rows", state=store)
    class Answer(af.Agent):
        def call(self, context: Any) -> dict[str, pa.Table]:
            ids = context["rows"]["id"]
            calls.append(len(ids))
            return {"rows": answers.filter(pc.is_in(answers["id"], value_set=ids))}

    return Answer


def _scored(kind: str, n: int = 10) -> pa.Table:
    scores = {
        "int": pa.array(range(n), pa.int64()),
        "string": pa.array([f"{i} points" for i in range(n)]),
    }
    columns = {"id": pa.array(range(n), pa.int64()), "score": scores[kind.removesuffix("+tier")]}
    if kind.endswith("+tier"):
        columns["tier"] = pa.array(["big" if i % 2 else "small" for i in range(n)])
    return pa.table(columns)


def _ids(n: int, *, lazy: bool = False) -> pa.Table | pa.RecordBatchReader:
    table = pa.table({"id": pa.array(range(n), pa.int64())})
    return pa.RecordBatchReader.from_batches(table.schema, table.to_batches(3)) if lazy else table


@pytest.mark.parametrize("new", ["int", "string"])
def test_a_version_bump_recomputes_and_keeps_exactly_the_new_columns(new: str) -> None:
    calls: list[int] = []
    with MemoryState() as store:
        af.Flow(_answering(store, _scored("int+tier"), calls)).run(rows=_ids(10))
        calls.clear()
        store.version = 2

        bumped = af.Flow(_answering(store, _scored(new), calls)).run(rows=_ids(10))["rows"]

        assert sum(calls) == 10
        assert bumped.equals(_scored(new), check_metadata=True)
        calls.clear()
        for lazy in (False, True):
            again = af.Flow(_answering(store, _scored(new), calls)).run(rows=_ids(10, lazy=lazy))
            assert calls == []
            assert again["rows"].equals(bumped, check_metadata=True)
        assert store.to_arrow().select(["id", "score"]).equals(bumped)
        assert len(set(store.runs()["fingerprint"].to_pylist())) == 2


def test_rows_of_an_older_version_that_lost_a_column_are_recomputed_not_loaded() -> None:
    calls: list[int] = []
    with MemoryState() as store:
        af.Flow(_answering(store, _scored("int+tier"), calls)).run(rows=_ids(10))
        store.version = 2  # "score" holds strings now, for the first 6 rows only
        af.Flow(_answering(store, _scored("string"), calls)).run(rows=_ids(6))
        store.version = None
        calls.clear()

        back = af.Flow(_answering(store, _scored("int+tier"), calls)).run(rows=_ids(10))["rows"]

        assert sum(calls) == 10
        assert back.equals(_scored("int+tier"), check_metadata=True)


def test_a_type_change_within_one_version_is_a_clear_error() -> None:
    with MemoryState() as store:
        af.Flow(_answering(store, _scored("int"), [])).run(rows=_ids(6))
        later = pa.table({"id": pa.array(range(6, 10), pa.int64())})
        with pytest.raises(
            af.ExecutionError, match=r"column 'score' is int64.*bump the store's version="
        ):
            af.Flow(_answering(store, _scored("string"), [])).run(rows=later)


@pytest.mark.parametrize("rows_per_chunk", [1000, 37])
def test_a_table_input_is_answered_by_the_pass_made_when_the_run_begins(
    rows_per_chunk: int,
    monkeypatch: pytest.MonkeyPatch,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    companies = make_companies(1000)
    companies = pa.Table.from_batches(companies.to_batches(max_chunksize=rows_per_chunk))
    with MemoryState() as store:
        run(scoring_agent(store, 100, min_employees=20), companies=companies.slice(0, 700))
        calls.clear()

        def no_query(*args: Any) -> None:
            raise AssertionError("a stream of a table input asked the store's pieces")

        monkeypatch.setattr(MemoryState, "_done", no_query)
        monkeypatch.setattr(memory, "stored_rows", no_query)
        result = run(scoring_agent(store, 100, min_employees=20), companies=companies)

    assert called_keys(calls) == list(range(700, 1000))
    assert result["companies"].equals(expected_scores(companies, 20))


def test_runs_and_failures_have_the_columns_of_duckdb_state() -> None:
    with MemoryState() as memory, DuckDBState() as duckdb:
        for store in (memory, duckdb):
            table = pa.table({"id": [1, 2]})
            scope = ScopeInfo(("m.A",), "rows", "id", table.schema, "A", f"A:{id(store)}")
            store.begin_run(scope, table)
            store.record_failure(StreamInfo(1, 0, 2, scope.scope_id, {}), table, ValueError("x"))
            store.end_run({"total_batches": 1, "failed_batches": 1}, "ok")
        for name in ("runs", "failures"):
            mine, theirs = getattr(memory, name)(), getattr(duckdb, name)()
            assert mine.column_names == theirs.column_names
            for field, other in zip(mine.schema, theirs.schema, strict=True):
                if pa.types.is_timestamp(field.type):
                    assert (field.type.unit, other.type.unit) == ("us", "us")
                    assert field.type.tz is not None
                    assert other.type.tz is not None
                else:
                    assert field.type == other.type, field.name
            row = mine.to_pylist()[0]
            assert row["table_name"] == "quick_fit"
        assert memory.runs()["failed_batches"].to_pylist() == [1]
        assert memory.failures()["error"].to_pylist() == ["ValueError: x"]
