"""State stores skip what is done, load it, persist what is new, by key (DESIGN §5).

Every test that makes its store with ``make_store`` runs against ``DuckDBState`` and
``MemoryState`` (``every_store``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from state_helpers import (
    Build,
    DuckDBState,
    MakeStore,
    MemoryState,
    called_keys,
    every_store,
    expected_scores,
    is_released,
    reader_of,
    run,
)

import arrowflow as af
from arrowflow.state import ScopeInfo
from arrowflow.state.duckdb import fingerprint

pytestmark = every_store

# -- the seed example -----------------------------------------------------------------------


@pytest.mark.parametrize("done", ["first_700", "scattered_700"])
def test_seed_example_processes_only_the_300_new_rows(
    state_path: str,
    done: str,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    companies = make_companies(1000)
    if done == "first_700":
        before = companies.slice(0, 700)
    else:
        before = companies.filter(pa.array(companies["id"].to_numpy() % 10 < 7))
    assert before.num_rows == 700
    store = make_store(state_path, table="quick_fit", key="id")

    first = run(scoring_agent(store, 100), companies=before)["companies"]
    calls.clear()
    result = run(scoring_agent(store, 100), companies=companies)
    rows = result["companies"]

    new_ids = sorted(set(companies["id"].to_pylist()) - set(before["id"].to_pylist()))
    assert sorted(called_keys(calls)) == new_ids
    assert len(called_keys(calls)) == 300
    assert rows.num_rows == 1000
    assert rows["id"].to_pylist() == companies["id"].to_pylist()
    assert rows.equals(expected_scores(companies))
    loaded = rows.filter(pc.is_in(rows["id"], value_set=before["id"]))
    assert loaded.equals(first)
    assert store.to_arrow().equals(expected_scores(companies))
    stats = result.stats[0]
    assert (stats["skipped_items"], stats["loaded_items"], stats["processed_items"]) == (
        700,
        700,
        300,
    )


def test_everything_done_calls_no_agent_and_persists_nothing(
    state_path: str,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    companies = make_companies(1000)
    store = make_store(state_path)
    first = run(scoring_agent(store, 100), companies=companies)
    assert len(store.persisted) == 10
    calls.clear()
    store.persisted.clear()

    again = run(scoring_agent(store, 100), companies=companies)

    assert calls == []
    assert store.persisted == []
    assert store.loaded == [100] * 10
    assert again["companies"].equals(first["companies"])
    stats = again.stats[0]
    assert stats["total_batches"] == 10
    assert (stats["skipped_items"], stats["loaded_items"], stats["processed_items"]) == (
        1000,
        1000,
        0,
    )


def test_stats_count_skipped_loaded_and_processed_rows_per_stream(
    make_store: MakeStore, scoring_agent: Build, make_companies: Callable[..., pa.Table]
) -> None:
    companies = make_companies(250)
    store = make_store()
    run(scoring_agent(store, 100, min_employees=50), companies=companies.slice(0, 150))

    result = run(scoring_agent(store, 100, min_employees=50), companies=companies)

    kept = pc.greater_equal(companies["employees"], 50)
    kept_before = [pc.sum(kept[:100]).as_py(), pc.sum(kept[100:150]).as_py(), 0]
    streams = result.stats[0]["streams"]
    assert streams["rows_in"].to_pylist() == [100, 100, 50]
    assert streams["skipped"].to_pylist() == [100, 50, 0]
    assert streams["loaded"].to_pylist() == kept_before
    stats = result.stats[0]
    assert stats["skipped_items"] == 150
    assert stats["loaded_items"] == sum(kept_before)
    assert stats["processed_items"] == 100
    assert result["companies"].equals(expected_scores(companies, 50))


# -- what the fingerprint covers --------------------------------------------------------------


@pytest.mark.parametrize("lazy", [False, True], ids=["table", "reader"])
@pytest.mark.parametrize("change", ["version", "agent_renamed", "field", "key"])
def test_a_changed_fingerprint_reprocesses_and_replaces_stored_rows(
    tmp_path: Path,
    change: str,
    lazy: bool,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    path = tmp_path / "state.duckdb"
    companies = make_companies(300)
    run(scoring_agent(make_store(path), 100), companies=companies)
    calls.clear()

    store = make_store(path, version="2" if change == "version" else None)
    options: dict[str, Any] = {"min_employees": 50}
    source: Any = reader_of(companies) if lazy else companies
    fields = {"companies": source}
    if change == "agent_renamed":
        options["rename"] = "DeepFit"
    elif change == "field":
        options["over"] = "firms"
        fields = {"firms": source}
    elif change == "key":
        options["key"] = "name"
    result = run(scoring_agent(store, 100, **options), **fields)

    assert sorted(called_keys(calls)) == companies["id"].to_pylist()
    expected = expected_scores(companies, 50)
    assert result[next(iter(fields))].equals(expected)
    stored = store.to_arrow()
    assert sorted(stored["id"].to_pylist()) == expected["id"].to_pylist()
    assert pc.min(stored["employees"]).as_py() >= 50


def test_a_changed_stream_size_reuses_the_work(
    state_path: str,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    companies = make_companies(300)
    store = make_store(state_path)
    first = run(scoring_agent(store, 100), companies=companies)
    calls.clear()

    again = run(scoring_agent(store, 7), companies=companies)

    assert calls == []
    assert again["companies"].equals(first["companies"])


def test_fingerprint_is_recorded_and_independent_of_the_process(
    make_store: MakeStore, scoring_agent: Build, make_companies: Callable[..., pa.Table]
) -> None:
    store = make_store(version=3)
    agent = scoring_agent(store, 10)
    run(agent, companies=make_companies(20))
    names = (f"{agent.__module__}.{agent.__qualname__}",)
    expected, _ = fingerprint(names, "companies", "id", 3)
    assert store.fingerprint == expected
    assert store.runs()["fingerprint"].to_pylist() == [expected]


# -- filtered rows, failures --------------------------------------------------------------


def test_filtered_out_keys_are_done_and_never_invented(
    state_path: str,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    companies = make_companies(400)
    store = make_store(state_path)
    first = run(scoring_agent(store, 100, min_employees=60), companies=companies)
    kept = expected_scores(companies, 60)
    assert first["companies"].equals(kept)
    calls.clear()

    again = run(scoring_agent(store, 100, min_employees=60), companies=companies)

    assert calls == []
    assert again["companies"].equals(kept)
    assert again.stats[0]["loaded_items"] == kept.num_rows
    assert store.to_arrow().num_rows == kept.num_rows


def test_a_failed_stream_is_recorded_and_a_rerun_fills_the_gap(
    state_path: str,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    companies = make_companies(500)
    store = make_store(state_path)
    first = run(
        scoring_agent(store, 100, fail_streams=(3,), on_error="continue"), companies=companies
    )
    assert first["companies"].num_rows == 400
    failures = store.failures()
    assert failures.num_rows == 1
    failure = failures.to_pylist()[0]
    assert (failure["stream_num"], failure["rows"], failure["keys"]) == (3, 100, 100)
    assert failure["error"] == "RuntimeError: boom in stream 3"
    assert failure["fingerprint"] == store.fingerprint
    run_row = store.runs().to_pylist()[0]
    assert (run_row["status"], run_row["failed_batches"]) == ("ok", 1)
    calls.clear()

    again = run(scoring_agent(store, 100, on_error="continue"), companies=companies)

    assert called_keys(calls) == list(range(200, 300))
    assert again["companies"].equals(expected_scores(companies))


def test_a_run_that_raises_is_recorded_as_failed_and_keeps_completed_streams(
    tmp_path: Path,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    companies = make_companies(300)
    store = make_store(tmp_path / "state.duckdb")
    with pytest.raises(af.BatchExecutionError):
        run(scoring_agent(store, 100, fail_streams=(2,)), companies=companies)
    assert is_released(store)
    assert store.runs()["status"].to_pylist() == ["failed"]
    calls.clear()

    again = run(scoring_agent(store, 100), companies=companies)

    assert called_keys(calls) == list(range(100, 300))
    assert again["companies"].equals(expected_scores(companies))


def test_a_stopped_stream_is_recorded_and_the_database_released(
    tmp_path: Path,
    make_store: MakeStore,
    scoring_agent: Build,
    make_companies: Callable[..., pa.Table],
) -> None:
    store = make_store(tmp_path / "state.duckdb")
    parts = af.Flow(scoring_agent(store, 100)).stream(companies=make_companies(300))
    assert next(parts).stream_num == 1
    parts.close()
    assert is_released(store)
    assert store.runs()["status"].to_pylist() == ["stopped"]
    assert store.to_arrow()["id"].to_pylist() == list(range(100))


def test_an_in_memory_store_lives_until_closed(
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    companies = make_companies(100)
    with make_store() as store:
        run(scoring_agent(store, 50), companies=companies)
        assert store.is_open
        calls.clear()
        run(scoring_agent(store, 50), companies=companies)
        assert calls == []
    assert not store.is_open
    run(scoring_agent(store, 50), companies=companies)
    assert len(called_keys(calls)) == 100


# -- the store on its own ---------------------------------------------------------------


def test_the_store_callables_work_as_keyword_options(
    state_path: str,
    make_store: MakeStore,
    make_companies: Callable[..., pa.Table],
    calls: list[list[Any]],
) -> None:
    store = make_store(state_path)

    def build() -> type[af.Agent]:
        @af.intelligent_streaming(
            stream_size=100,
            over="companies",
            key="id",
            skip_if=store.skip_if,
            load_existing=store.load_existing,
            persist_each_stream=store.persist_each_stream,
        )
        class Score(af.Agent):
            def call(self, context: Any) -> dict[str, pa.Table]:
                rows = context["companies"]
                calls.append(rows["id"].to_pylist())
                return {"companies": expected_scores(rows, 10)}

        return Score

    companies = make_companies(1000)
    af.Flow(build()).run(companies=companies.slice(0, 700))
    calls.clear()
    result = af.Flow(build()).run(companies=companies)

    assert called_keys(calls) == list(range(700, 1000))
    assert result["companies"].equals(expected_scores(companies, 10))
    assert store.is_open  # no run to end: held until closed
    store.close()
    assert not store.is_open


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"table": ""}, "table="),
        ({"key": 3}, "key="),
        ({"version": 1.5}, "version="),
        ({"path": 42}, "path="),
    ],
)
def test_bad_options_are_configuration_errors(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(af.ConfigurationError, match=fragment):
        DuckDBState(**options)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [({"table": ""}, "table="), ({"key": 3}, "key="), ({"version": 1.5}, "version=")],
)
def test_bad_options_of_a_memory_store_are_configuration_errors(
    options: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(af.ConfigurationError, match=fragment):
        MemoryState(**options)


@pytest.mark.parametrize("pieces", ["slices", "copies"])
def test_skip_if_from_several_threads_agrees_with_one(
    pieces: str, make_store: MakeStore, make_companies: Callable[..., pa.Table]
) -> None:
    companies = make_companies(2000)
    store = make_store()
    is_done = pa.array(companies["id"].to_numpy() % 3 == 0)
    done = companies.filter(is_done)
    scope = ScopeInfo(("m.A",), "companies", "id", companies.schema, "A")
    store.begin_run(scope, done)
    store.persist_each_stream(done, {"companies": done})
    store.end_run({}, "ok")
    store.begin_run(scope, companies)
    batches = [companies.slice(offset, 100) for offset in range(0, 2000, 100)]
    if pieces == "copies":
        batches = [batch.take(pa.array(range(batch.num_rows))) for batch in batches]
    with ThreadPoolExecutor(4) as pool:
        masks = list(pool.map(lambda batch: store.skip_if(batch, {}), batches))
    store.end_run({}, "ok")
    assert pa.chunked_array(masks).to_pylist() == is_done.to_pylist()


# -- scopes of several agents -----------------------------------------------------------------


def scope_agent(column: str) -> type[af.Agent]:
    """An agent for after the trigger: adds ``column = score + 1``; its class is ``column``."""

    class Second(af.Agent):
        def call(self, context: Any) -> dict[str, pa.Table]:
            rows = context["companies"]
            return {"companies": rows.append_column(column, pc.add(rows["score"], 1))}

    return type(column.title(), (Second,), {})


def terminator_named(name: str) -> type[af.Agent]:
    """An ``ends_batching`` agent that changes nothing, whose class is ``name``."""

    class End(af.Agent):
        def call(self, context: Any) -> None:
            return None

    return af.ends_batching(type(name, (End,), {}))


def with_column(table: pa.Table, column: str) -> pa.Table:
    """What ``scope_agent(column)`` adds to ``table``."""
    return table.append_column(column, pc.add(table["score"], 1))


@pytest.mark.parametrize("lazy", [False, True], ids=["table", "reader"])
def test_changing_a_later_agent_of_the_scope_reprocesses_every_key(
    state_path: str,
    lazy: bool,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    companies = make_companies(300)
    store = make_store(state_path)
    first = (scoring_agent(store, 100) >> scope_agent("tier")).run(companies=companies)
    assert first["companies"].equals(with_column(expected_scores(companies), "tier"))
    calls.clear()

    source: Any = reader_of(companies) if lazy else companies
    result = (scoring_agent(store, 100) >> scope_agent("band")).run(companies=source)

    assert called_keys(calls) == companies["id"].to_pylist()
    expected = with_column(expected_scores(companies), "band")
    assert result["companies"].equals(expected)
    assert store.to_arrow().select(expected.column_names).equals(expected)
    fingerprints = store.runs()["fingerprint"].to_pylist()
    assert len(set(fingerprints)) == 2


def test_a_multi_agent_scope_resumes_where_it_stopped(
    state_path: str,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    companies = make_companies(1000)
    store = make_store(state_path)

    def flow(end: str) -> af.Flow:
        return scoring_agent(store, 100) >> scope_agent("tier") >> terminator_named(end)

    first = flow("End").run(companies=companies.slice(0, 700))["companies"]
    calls.clear()

    # The terminator is outside the scope: another one leaves the done keys valid.
    result = flow("OtherEnd").run(companies=companies)

    assert called_keys(calls) == list(range(700, 1000))
    expected = with_column(expected_scores(companies), "tier")
    assert result["companies"].equals(expected)
    assert result["companies"].slice(0, 700).equals(first)
    assert store.to_arrow().equals(expected)
    assert result.stats[0]["skipped_items"] == 700
    calls.clear()

    again = flow("End").run(companies=companies)

    assert calls == []
    assert again["companies"].equals(expected)


# -- keys in increasing order: the fast path of the duplicate check --------------------------


def _sorted_ids_with_duplicate(where: str, n: int = 250) -> tuple[list[int], int]:
    """``n`` increasing keys, one of them twice (at the start, in stream 2, at the end)."""
    ids = list(range(n - 1))
    twice = {"start": 0, "middle": 149, "end": n - 2}[where]
    return [*ids[: twice + 1], twice, *ids[twice + 1 :]], twice


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_a_duplicate_in_sorted_keys_is_refused_before_any_agent_runs(
    tmp_path: Path,
    where: str,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    ids, twice = _sorted_ids_with_duplicate(where)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids) - 1
    companies = make_companies(250).set_column(0, "id", pa.array(ids, pa.int64()))
    store = make_store(tmp_path / "state.duckdb")

    with pytest.raises(af.ExecutionError, match="1 duplicate") as info:
        run(scoring_agent(store, 100), companies=companies)

    assert calls == []
    assert "'id'" in str(info.value)
    assert f"{twice} (2 times)" in str(info.value)
    assert is_released(store)


@pytest.mark.parametrize(("where", "stream"), [("start", 1), ("middle", 2), ("end", 3)])
def test_a_duplicate_in_sorted_keys_of_a_reader_fails_its_stream(
    tmp_path: Path,
    where: str,
    stream: int,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    ids, _ = _sorted_ids_with_duplicate(where)
    companies = make_companies(250).set_column(0, "id", pa.array(ids, pa.int64()))
    store = make_store(tmp_path / "state.duckdb")

    with pytest.raises(af.BatchExecutionError) as info:
        run(scoring_agent(store, 100), companies=reader_of(companies))

    assert info.value.batch_number == stream
    assert isinstance(info.value.original_error, af.ExecutionError)
    assert "duplicate" in str(info.value.original_error)
    assert len(calls) == stream - 1
    if stream == 1:
        with pytest.raises(af.ExecutionError, match="no results yet"):
            store.to_arrow()
    else:
        assert store.to_arrow()["id"].to_pylist() == ids[: 100 * (stream - 1)]
