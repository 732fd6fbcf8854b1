"""The store touches only what it created, and holds its file for one run at a time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pytest

import arrowflow as af
from arrowflow.state import DuckDBState

if TYPE_CHECKING:
    from collections.abc import Callable

    import pyarrow as pa
    from state_helpers import CountingState

    Build = Callable[..., type[af.Agent]]
    MakeStore = Callable[..., CountingState]


def run(agent: type[af.Agent], **fields: Any) -> af.PipelineResult:
    return af.Flow(agent).run(progress=False, **fields)


@pytest.mark.parametrize("name", ["quick_fit", "Quick_Fit"])
def test_a_table_arrowflow_did_not_create_is_refused_and_left_untouched(
    tmp_path: Path,
    name: str,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    path = tmp_path / "state.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute(f'CREATE TABLE "{name}" (id BIGINT, note VARCHAR)')
        con.execute(f"INSERT INTO \"{name}\" VALUES (1, 'mine'), (2, 'also mine')")
    store = make_store(path, table="quick_fit")

    with pytest.raises(af.ExecutionError, match="arrowflow did not create it"):
        run(scoring_agent(store, 10), companies=make_companies(30))

    assert calls == []
    assert not store.is_open
    with duckdb.connect(str(path)) as con:
        rows = con.sql(f'SELECT * FROM "{name}" ORDER BY id').fetchall()
    assert rows == [(1, "mine"), (2, "also mine")]


def test_a_second_run_on_the_same_store_fails_at_its_start(
    tmp_path: Path,
    make_store: MakeStore,
    scoring_agent: Build,
    make_companies: Callable[..., pa.Table],
) -> None:
    store = make_store(tmp_path / "state.duckdb")
    first = af.Flow(scoring_agent(store, 10)).stream(companies=make_companies(30))
    assert next(first).stream_num == 1  # the first run is in progress

    with pytest.raises(af.ExecutionError, match="a run of this store is in progress"):
        run(scoring_agent(store, 10), companies=make_companies(30))

    rest = list(first)  # the first run is unharmed by the refused one
    assert [part.stream_num for part in rest] == [2, 3]
    assert store.runs()["status"].to_pylist() == ["ok"]
    assert (
        run(scoring_agent(store, 10), companies=make_companies(30)).stats[0]["skipped_items"] == 30
    )


def test_a_second_run_on_the_same_file_fails_at_its_start(
    tmp_path: Path,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    path = tmp_path / "state.duckdb"
    first_store, second_store = make_store(path, table="a"), make_store(path, table="b")
    with af.Flow(scoring_agent(first_store, 10)).stream(companies=make_companies(30)) as first:
        next(first)
        calls.clear()
        with pytest.raises(af.ExecutionError, match="in use by a run of table 'a'"):
            run(scoring_agent(second_store, 10), companies=make_companies(30))
        assert calls == []
    # Once the first run has ended, the file is free.
    assert (
        run(scoring_agent(second_store, 10), companies=make_companies(30)).stats[0][
            "successful_batches"
        ]
        == 3
    )


def test_a_run_on_a_file_another_process_holds_fails_at_its_start(
    tmp_path: Path,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    path = tmp_path / "state.duckdb"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys; con = duckdb.connect(sys.argv[1]); print('held', flush=True); "
            "sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(af.ExecutionError, match="locked by another process"):
            run(scoring_agent(make_store(path), 10), companies=make_companies(30))
        assert calls == []
    finally:
        holder.communicate("", timeout=60)


def test_a_run_left_running_by_a_killed_process_is_shown_as_killed(
    tmp_path: Path,
    scoring_agent: Build,
    make_companies: Callable[..., pa.Table],
) -> None:
    path = tmp_path / "state.duckdb"
    store = DuckDBState(path)
    agent = scoring_agent(store, 10)
    # A process that began a run of this scope and died before ending it, as kill -9 does.
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            KILLED_MID_RUN,
            str(path),
            f"{agent.__module__}.{agent.__qualname__}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert killed.returncode == 9, killed.stderr
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.sql("select status from arrowflow.runs").fetchall() == [("running",)]

    run(agent, companies=make_companies(30))
    assert store.runs()["status"].to_pylist() == ["killed", "ok"]


KILLED_MID_RUN = """
import os, sys
import pyarrow as pa
from arrowflow.state import DuckDBState, ScopeInfo

rows = pa.table({"id": pa.array([1, 2, 3], pa.int64())})
store = DuckDBState(sys.argv[1])
store.begin_run(ScopeInfo((sys.argv[2],), "companies", "id", rows.schema, "Fit"), rows)
os._exit(9)
"""


def test_a_missing_parent_directory_is_created(
    tmp_path: Path, scoring_agent: Build, make_companies: Callable[..., pa.Table]
) -> None:
    store = DuckDBState(tmp_path / "state" / "nested" / "state.duckdb")
    result = run(scoring_agent(store, 10), companies=make_companies(30))
    assert result.stats[0]["successful_batches"] == 3
    assert (tmp_path / "state" / "nested" / "state.duckdb").is_file()


def test_a_path_under_a_file_gets_a_clear_error(
    tmp_path: Path, scoring_agent: Build, make_companies: Callable[..., pa.Table]
) -> None:
    (tmp_path / "plain").write_text("not a directory")
    store = DuckDBState(tmp_path / "plain" / "state.duckdb")
    with pytest.raises(af.ExecutionError, match=r"cannot be created.*directory you can write"):
        run(scoring_agent(store, 10), companies=make_companies(30))


def test_scopes_taking_turns_on_one_table_are_refused(
    tmp_path: Path,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    """Another scope replacing the one that wrote a table recomputes everything (its
    fingerprint differs); the first scope coming back means two scopes share the table, and
    is refused before any of its agents runs, the table left as the second one wrote it."""
    path = tmp_path / "state.duckdb"
    companies = make_companies(30)
    run(scoring_agent(make_store(path, table="shared"), 10), companies=companies)
    calls.clear()
    other = make_store(path, table="shared")
    replaced = run(scoring_agent(other, 10, rename="OtherFit"), companies=companies)
    assert sum(len(call) for call in calls) == 30
    calls.clear()

    with pytest.raises(af.ExecutionError, match="is shared by two scopes") as caught:
        run(scoring_agent(make_store(path, table="shared"), 10), companies=companies)
    assert "OtherFit" in str(caught.value)
    assert "its own table=" in str(caught.value)
    assert calls == []
    assert other.to_arrow().equals(replaced["companies"])


def test_two_scopes_of_one_flow_sharing_a_table_are_refused_before_any_agent_runs(
    tmp_path: Path, make_companies: Callable[..., pa.Table]
) -> None:
    seen: list[str] = []

    def build(store: Any, name: str) -> type[af.Agent]:
        @af.intelligent_streaming(stream_size=10, over="companies", state=store)
        class Scope(af.Agent):
            def call(self, context: Any) -> None:
                seen.append(name)

        @af.ends_batching
        class End(af.Agent):
            def call(self, context: Any) -> None:
                seen.append("end")

        return type(name, (Scope,), {}), End  # type: ignore[return-value]

    shared = DuckDBState(tmp_path / "state.duckdb", table="shared", key="id")
    first, end = build(shared, "First")  # type: ignore[misc]
    second, _ = build(shared, "Second")  # type: ignore[misc]
    with pytest.raises(af.ConfigurationError, match="both keep their state in table 'shared'"):
        (first >> end >> second).run(companies=make_companies(20), progress=False)
    same_file = DuckDBState(tmp_path / "state.duckdb", table="SHARED", key="id")
    third, _ = build(same_file, "Third")  # type: ignore[misc]
    with pytest.raises(af.ConfigurationError, match="Agents 'First' and 'Third'"):
        (first >> end >> third).run(companies=make_companies(20), progress=False)
    assert seen == []
    (first >> end >> build(DuckDBState(), "Fourth")[0]).run(companies=make_companies(20))
    assert seen == ["First", "First", "end", "Fourth", "Fourth"]


def test_a_version_bump_is_the_same_scope_and_recomputes(
    tmp_path: Path,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> None:
    path = tmp_path / "state.duckdb"
    companies = make_companies(20)
    run(scoring_agent(make_store(path, table="t"), 10), companies=companies)
    calls.clear()
    run(scoring_agent(make_store(path, table="t", version=2), 10), companies=companies)
    assert sum(len(call) for call in calls) == 20
