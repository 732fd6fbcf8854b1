"""State stores refuse bad inputs before any agent runs, and check lazy inputs per stream.

The tests run against ``DuckDBState`` and ``MemoryState`` (``every_store``), but those about
the database file and DuckDB's own queries (``duckdb_only``).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from state_helpers import (
    Build,
    MakeStore,
    called_keys,
    duckdb_only,
    every_store,
    expected_scores,
    is_released,
    reader_of,
    run,
)

import arrowflow as af
from arrowflow.state import ScopeInfo
from arrowflow.state._results import ResultTable

pytestmark = every_store

# -- bad inputs: refused before any agent runs ----------------------------------------------


def refused(calls: list[list[Any]], action: Callable[[], object], *fragments: str) -> str:
    with pytest.raises(af.ArrowflowError) as info:
        action()
    assert calls == []
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message
    return message


def test_missing_key_column_is_refused(
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    store = make_store()
    companies = make_companies(10).drop_columns(["id"]).append_column("code", pa.array(range(10)))
    refused(calls, lambda: run(scoring_agent(store, 5), companies=companies), "'id'")
    scope = ScopeInfo(("m.A",), "companies", "id", companies.schema, "A")
    refused(calls, lambda: store.begin_run(scope, companies), "'quick_fit'", "'id'", "missing")


def test_null_keys_are_refused(
    tmp_path: Path,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    companies = make_companies(10)
    ids = pa.array([0, 1, None, 3, 4, 5, None, 7, 8, 9], pa.int64())
    companies = companies.set_column(0, "id", ids)
    store = make_store(tmp_path / "state.duckdb")
    refused(
        calls,
        lambda: run(scoring_agent(store, 5), companies=companies),
        "'quick_fit'",
        "'id'",
        "2 null",
        "rows 2, 6",
    )
    assert is_released(store)


def test_duplicate_keys_are_refused(
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    companies = make_companies(10)
    companies = companies.set_column(0, "id", pa.array([0, 1, 2, 3, 1, 5, 6, 7, 3, 1]))
    refused(
        calls,
        lambda: run(scoring_agent(make_store(), 5), companies=companies),
        "'quick_fit'",
        "'id'",
        "2 duplicate",
        "1 (3 times)",
    )


def test_a_key_type_other_than_the_stored_one_is_refused(
    state_path: str,
    store_kind: str,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    store = make_store(state_path)
    companies = make_companies(10)
    run(scoring_agent(store, 5), companies=companies)
    calls.clear()
    as_text = companies.set_column(0, "id", pc.cast(companies["id"], pa.string()))
    # The types as the store knows them: DuckDB's, or Arrow's.
    types = {"duckdb": ("BIGINT", "VARCHAR"), "memory": ("int64", "string")}[store_kind]
    refused(
        calls,
        lambda: run(scoring_agent(store, 5), companies=as_text),
        "'quick_fit'",
        "'id'",
        *types,
    )


@duckdb_only  # a DuckDB file held by another process
def test_a_locked_database_is_refused(
    tmp_path: Path,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    path = tmp_path / "state.duckdb"
    hold = "import duckdb, sys\nc = duckdb.connect(sys.argv[1])\nprint('ready', flush=True)\n"
    hold += "sys.stdin.read()\n"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        store = make_store(path)
        refused(
            calls,
            lambda: run(scoring_agent(store, 5), companies=make_companies(10)),
            str(path),
            "locked",
        )
        assert not store.is_open
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)


@duckdb_only  # a DuckDB file written over
@pytest.mark.parametrize(
    "damage",
    ["garbage", "truncated", "newer_layout", "unknown_layout"],
)
def test_a_damaged_or_foreign_database_is_refused(
    tmp_path: Path,
    damage: str,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    path = tmp_path / "state.duckdb"
    run(scoring_agent(make_store(path), 50), companies=make_companies(100))
    calls.clear()
    if damage == "garbage":
        path.write_bytes(bytes(range(256)) * 64)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    else:
        with duckdb.connect(str(path)) as con:
            value = "99" if damage == "newer_layout" else "v-one"
            con.execute(
                "UPDATE arrowflow.meta SET value = ? WHERE name = 'layout_version'", [value]
            )
    fragment = {"newer_layout": "newer", "unknown_layout": "unknown layout"}.get(damage, "damaged")
    store = make_store(path)
    refused(
        calls,
        lambda: run(scoring_agent(store, 5), companies=make_companies(10)),
        str(path),
        fragment,
    )
    assert not store.is_open


# -- lazy inputs: keys checked stream by stream ---------------------------------------------


def test_a_reader_input_resumes(
    state_path: str,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    companies = make_companies(1000)
    store = make_store(state_path)
    run(scoring_agent(store, 100, min_employees=30), companies=reader_of(companies.slice(0, 700)))
    calls.clear()

    result = run(scoring_agent(store, 100, min_employees=30), companies=reader_of(companies))

    assert called_keys(calls) == list(range(700, 1000))
    assert result["companies"].equals(expected_scores(companies, 30))
    assert result.stats[0]["skipped_items"] == 700


@pytest.mark.parametrize(
    ("ids", "stream", "fragment"),
    [
        ([*range(150), None, *range(151, 250)], 2, "null"),
        ([*range(200), 5, *range(201, 250)], 3, "earlier stream"),
        ([*range(120), 110, *range(121, 250)], 2, "duplicate"),
    ],
    ids=["null", "duplicate_across_streams", "duplicate_within_stream"],
)
def test_a_reader_input_has_its_keys_checked_at_the_stream_where_they_fail(
    tmp_path: Path,
    ids: list[int | None],
    stream: int,
    fragment: str,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    companies = make_companies(250).set_column(0, "id", pa.array(ids, pa.int64()))
    store = make_store(tmp_path / "state.duckdb")
    with pytest.raises(af.BatchExecutionError) as info:
        run(scoring_agent(store, 100), companies=reader_of(companies))
    assert info.value.batch_number == stream
    assert isinstance(info.value.original_error, af.ExecutionError)
    assert fragment in str(info.value.original_error)
    assert "'quick_fit'" in str(info.value.original_error)
    assert len(calls) == stream - 1
    assert store.to_arrow().num_rows == 100 * (stream - 1)


# -- table inputs -------------------------------------------------------------------------


@duckdb_only  # DuckDB's per-stream queries are made to fail
@pytest.mark.parametrize("rows_per_chunk", [1000, 37])
def test_a_table_input_is_answered_by_the_query_made_when_the_run_begins(
    rows_per_chunk: int,
    monkeypatch: pytest.MonkeyPatch,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    companies = make_companies(1000)
    companies = pa.Table.from_batches(companies.to_batches(max_chunksize=rows_per_chunk))
    store = make_store()
    run(scoring_agent(store, 100, min_employees=20), companies=companies.slice(0, 700))
    calls.clear()

    def no_query(*args: Any) -> None:
        raise AssertionError("a stream of a table input queried the database")

    monkeypatch.setattr(ResultTable, "stored_keys", no_query)
    monkeypatch.setattr(ResultTable, "load", no_query)
    result = run(scoring_agent(store, 100, min_employees=20), companies=companies)

    assert called_keys(calls) == list(range(700, 1000))
    assert result["companies"].equals(expected_scores(companies, 20))


@duckdb_only  # DuckDB identifiers ignore case; a MemoryState is one table
def test_table_names_differing_only_in_case_are_one_table(
    tmp_path: Path,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    path = tmp_path / "state.duckdb"
    run(scoring_agent(make_store(path, table="Quick_Fit"), 50), companies=make_companies(100))
    calls.clear()
    again = run(
        scoring_agent(make_store(path, table="quick_fit"), 50), companies=make_companies(100)
    )
    assert calls == []
    assert again["companies"].num_rows == 100
