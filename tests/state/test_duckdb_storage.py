"""DuckDBState's database: what it stores, how it is read, and who else can read it."""

from __future__ import annotations

import datetime as dt
import decimal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from state_helpers import (
    Build,
    CountingState,
    MakeStore,
    expected_scores,
    reader_of,
    run,
)

import arrowflow as af

# -- what is stored, and reading it ---------------------------------------------------------


def test_to_parquet_round_trips(
    tmp_path: Path,
    make_store: MakeStore,
    scoring_agent: Build,
    make_companies: Callable[..., pa.Table],
) -> None:
    import polars as pl

    store = make_store(tmp_path / "state.duckdb")
    companies = make_companies(500)
    run(scoring_agent(store, 100, min_employees=20), companies=companies)
    target = tmp_path / "quick_fit.parquet"

    assert store.to_parquet(target) == expected_scores(companies, 20).num_rows

    assert pq.read_table(target).equals(expected_scores(companies, 20))
    assert pl.read_parquet(target).equals(pl.from_arrow(store.to_arrow()))
    with duckdb.connect() as con:
        back = con.sql(f"select * from '{target}' order by id").to_arrow_table()
    assert back.to_pylist() == expected_scores(companies, 20).to_pylist()
    assert not store.is_open


def test_nothing_stored_yet_is_a_clear_error(make_store: MakeStore) -> None:
    with pytest.raises(af.ExecutionError, match="holds no results yet"):
        make_store().to_arrow()


def test_the_file_is_released_between_runs(
    tmp_path: Path,
    make_store: MakeStore,
    scoring_agent: Build,
    make_companies: Callable[..., pa.Table],
) -> None:
    path = tmp_path / "state.duckdb"
    store = make_store(path)
    run(scoring_agent(store, 100), companies=make_companies(300))
    assert not store.is_open

    with duckdb.connect(str(path), read_only=True) as con:
        assert con.sql("select count(*) from quick_fit").fetchall() == [(300,)]
        assert con.sql("select count(*) from arrowflow.streams").fetchall() == [(3,)]
    code = "import duckdb, sys\nc = duckdb.connect(sys.argv[1], read_only=True)\n"
    code += "print(c.sql('select count(*) from quick_fit').fetchall()[0][0])\n"
    reader = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
    )
    assert reader.stdout.strip() == "300", reader.stderr


def test_identifiers_are_quoted(
    tmp_path: Path, make_store: MakeStore, scoring_agent: Build, calls: list[list[Any]]
) -> None:
    path = tmp_path / "state.duckdb"
    table = 'my "odd" table'
    store = make_store(path, table=table, key="select")
    rows = pa.table({"select": range(50), "employees": [i % 9 for i in range(50)]})
    first = run(scoring_agent(store, 20, key_column="select"), companies=rows)
    calls.clear()

    again = run(scoring_agent(store, 20, key_column="select"), companies=rows)

    assert calls == []
    assert again["companies"].equals(first["companies"])
    with duckdb.connect(str(path), read_only=True) as con:
        stored = con.sql('select count(*) from "my ""odd"" table"').fetchall()
    assert stored == [(50,)]


def test_new_output_columns_are_added_to_the_stored_table(
    make_store: MakeStore, make_companies: Callable[..., pa.Table], calls: list[list[Any]]
) -> None:
    def build(store: CountingState, with_tier: bool) -> type[af.Agent]:
        @af.intelligent_streaming(stream_size=40, over="companies", state=store)
        class Tiered(af.Agent):
            def call(self, context: Any) -> dict[str, pa.Table]:
                rows = context["companies"]
                calls.append(rows["id"].to_pylist())
                if with_tier:
                    tier = pc.if_else(pc.greater(rows["employees"], 50), "big", "small")
                    rows = rows.append_column("tier", tier)
                return {"companies": rows}

        return Tiered

    store = make_store()
    companies = make_companies(100)
    run(build(store, with_tier=False), companies=companies.slice(0, 60))
    store.version = "tiers"
    result = run(build(store, with_tier=True), companies=companies)
    assert result["companies"].column_names == [*companies.column_names, "tier"]
    calls.clear()

    again = run(build(store, with_tier=True), companies=companies)

    assert calls == []
    assert again["companies"].equals(result["companies"])
    assert store.to_arrow().column_names == [*companies.column_names, "tier"]


def test_loaded_rows_keep_the_types_the_agents_produced(
    make_store: MakeStore, calls: list[list[Any]]
) -> None:
    moment = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC)
    rows = pa.table(
        {
            "id": pa.array(["a", "b", "c", "d"], pa.large_string()),
            "when": pa.array([moment] * 4, pa.timestamp("us", tz="UTC")),
            "ratio": pa.array([0.5, 1.5, None, 2.0], pa.float32()),
            "tags": pa.array([["x"], [], None, ["y", "z"]], pa.list_(pa.string())),
            "day": pa.array([dt.date(2024, 1, d) for d in range(1, 5)], pa.date32()),
            "price": pa.array([decimal.Decimal("1.25")] * 4, pa.decimal128(10, 2)),
            "small": pa.array([1, 2, 3, 4], pa.int8()),
        }
    )
    store = make_store()

    @af.intelligent_streaming(stream_size=3, over="rows", state=store)
    class Keep(af.Agent):
        def call(self, context: Any) -> None:
            calls.append(context["rows"]["id"].to_pylist())

    first = af.Flow(Keep).run(rows=rows)["rows"]
    calls.clear()
    again = af.Flow(Keep).run(rows=rows)["rows"]

    assert calls == []
    assert again.equals(first)
    assert again.equals(rows)


@pytest.mark.parametrize("lazy", [False, True], ids=["table", "reader"])
def test_rows_under_keys_outside_the_input_are_replaced_not_duplicated(
    tmp_path: Path, lazy: bool, make_store: MakeStore, make_companies: Callable[..., pa.Table]
) -> None:
    def build(store: CountingState) -> type[af.Agent]:
        @af.intelligent_streaming(stream_size=100, over="companies", state=store)
        class Invent(af.Agent):
            def call(self, context: Any) -> dict[str, pa.Table]:
                rows = context["companies"]
                # Stream 1 also answers for company 150 (stream 2's) and 500 (not in the input).
                if context["_batch_metadata"]["batch_number"] == 1:
                    rows = pa.concat_tables([rows, make_companies(1, start=150)])
                    rows = pa.concat_tables([rows, make_companies(1, start=500)])
                return {"companies": rows}

        return Invent

    path = tmp_path / "state.duckdb"
    shape: Callable[[pa.Table], Any] = reader_of if lazy else (lambda table: table)
    first = run(build(make_store(path)), companies=shape(make_companies(200)))["companies"]
    assert first.num_rows == 202
    stored = make_store(path).to_arrow()
    assert stored["id"].to_pylist() == [*range(200), 500]

    result = run(build(make_store(path)), companies=shape(make_companies(600)))["companies"]

    # Stream 1 is loaded as it was returned, with the row it added under 500 (its row for 150
    # was replaced by stream 2's own); stream 6 has 500 in its input and computes it.
    assert result["id"].to_pylist() == [*range(100), 500, *range(100, 600)]
    stored = make_store(path).to_arrow()
    assert stored["id"].to_pylist() == list(range(600))
