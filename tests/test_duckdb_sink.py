"""DuckDBSink and run(sink="file.duckdb::table") (DESIGN §7): one transaction per stream, the
table changed once per successful run, and no row written twice after a crash."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import arrowflow as af
from arrowflow.io import as_sink


def _evens(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(pc.bit_wise_and(table["id"], 1), 0))


def _expected(table: pa.Table) -> pa.Table:
    """What ``flow`` makes of ``table``: the even ids, with ``double``."""
    kept = _evens(table)
    return kept.append_column("double", pc.multiply(kept["employees"], 2))


def _flow(size: int = 5, **options: Any) -> af.Flow:
    @af.intelligent_streaming(size, over="companies", **options)
    class QuickFit(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            return {"companies": _expected(context["companies"])}

    return af.Flow(QuickFit)


def _table(path: Path, name: str) -> pa.Table:
    """Every row of table ``name``, as a plain scan gives them (insertion order)."""
    with duckdb.connect(str(path)) as con:
        return con.sql(f"SELECT * FROM {_quoted(name)}").to_arrow_table()


def _tables(path: Path) -> set[str]:
    with duckdb.connect(str(path)) as con:
        return {str(row[0]) for row in con.sql("SELECT table_name FROM duckdb_tables()").fetchall()}


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _seed(path: Path, name: str, table: pa.Table) -> None:
    with duckdb.connect(str(path)) as con:
        con.register("seed", table)
        con.execute(f"CREATE TABLE {_quoted(name)} AS SELECT * FROM seed")


# --------------------------------------------------------------------------- the sink alone


def test_streams_are_written_in_order_and_published_on_close(tmp_path, make_companies) -> None:
    table = make_companies(30)
    path = tmp_path / "nested" / "out.duckdb"
    sink = af.DuckDBSink(path, "companies")
    for offset in range(0, 30, 7):
        sink.write(table.slice(offset, 7))
    assert sink.num_rows == 30
    assert "companies" not in _tables(path)  # nothing published before close
    assert _table(path, "companies.partial").equals(table)
    sink.close()
    assert _tables(path) == {"companies"}
    assert _table(path, "companies").equals(table)
    reader = sink.read_back(pa.schema([]))
    assert isinstance(reader, pa.RecordBatchReader)
    assert reader.read_all().equals(table)


def test_read_back_before_close_reads_the_partial_table(tmp_path, make_companies) -> None:
    table = make_companies(12)
    sink = af.DuckDBSink(tmp_path / "out.duckdb", "companies")
    sink.write(table.slice(0, 5))
    sink.write(table.slice(5))
    reader = sink.read_back(table.schema)
    with pytest.raises(af.ExecutionError, match="takes no more streams"):
        sink.write(table)
    assert reader.read_all().equals(table)
    sink.close()
    assert sink.read_back(table.schema).read_all().equals(table)
    assert _table(tmp_path / "out.duckdb", "companies").equals(table)


def test_nothing_written_leaves_a_table_with_the_columns_read_back_names(
    tmp_path, make_companies
) -> None:
    schema = make_companies(0).schema
    before = af.DuckDBSink(tmp_path / "before.duckdb", "companies")
    assert before.read_back(schema).read_all().num_rows == 0  # before close
    before.close()
    after = af.DuckDBSink(tmp_path / "after.duckdb", "companies", mode="replace")
    after.close()
    assert after.read_back(schema).read_all().schema == schema  # after close
    for name in ("before", "after"):
        assert _table(tmp_path / f"{name}.duckdb", "companies").schema == schema
        assert _tables(tmp_path / f"{name}.duckdb") == {"companies"}
    aborted = af.DuckDBSink(tmp_path / "aborted.duckdb", "companies")
    aborted.abort()
    assert aborted.read_back(schema).read_all().num_rows == 0
    assert not (tmp_path / "aborted.duckdb").exists()


def test_columns_that_differ_only_in_case_are_refused(tmp_path) -> None:
    sink = af.DuckDBSink(tmp_path / "out.duckdb", "t")
    with pytest.raises(af.ExecutionError, match=r"'Score', 'score' are one column to DuckDB"):
        sink.write(pa.table({"score": [1], "Score": [2]}))
    sink.abort()


def test_a_stream_with_reordered_columns_is_conformed(tmp_path, make_companies) -> None:
    table = make_companies(10)
    sink = af.DuckDBSink(tmp_path / "out.duckdb", "companies")
    sink.write(table.slice(0, 5))
    sink.write(table.slice(5).select(["employees", "name", "id"]))
    sink.write(table.slice(0, 0).select(["id"]))  # no rows: not written, whatever its columns
    sink.close()
    assert sink.read_back(table.schema).read_all().equals(table)


def test_the_agents_types_come_back(tmp_path) -> None:
    """DuckDB has no large_string, dictionary or time zone name of its own: read back, the
    columns have the types written, and the table has DuckDB's."""
    table = pa.table(
        {
            "name": pa.array(["a", "b", "a"], pa.large_string()),
            "kind": pa.array(["x", "y", "x"]).dictionary_encode(),
            "at": pa.array([1, 2, 3], pa.timestamp("us", tz="Europe/Paris")),
            "small": pa.array([1, 2, 3], pa.int8()),
        }
    )
    sink = af.DuckDBSink(tmp_path / "out.duckdb", "typed")
    sink.write(table)
    sink.close()
    back = sink.read_back(pa.schema([])).read_all()
    assert back.schema == table.schema
    assert back.equals(table)
    with duckdb.connect(str(tmp_path / "out.duckdb")) as con:
        types = dict(
            con.sql(
                "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = 'typed'"
            ).fetchall()
        )
    assert types == {
        "name": "VARCHAR",
        "kind": "VARCHAR",
        "at": "TIMESTAMP WITH TIME ZONE",
        "small": "TINYINT",
    }


def test_lifecycle_close_and_abort_are_idempotent(tmp_path, make_companies) -> None:
    table = make_companies(6)
    sink = af.DuckDBSink(tmp_path / "out.duckdb", "companies")
    sink.write(table)
    sink.close()
    sink.close()
    sink.abort()  # after close: nothing happens
    assert _table(tmp_path / "out.duckdb", "companies").equals(table)
    with pytest.raises(af.ExecutionError, match="closed: it takes no more streams"):
        sink.write(table)

    aborted = af.DuckDBSink(tmp_path / "other.duckdb", "companies")
    aborted.write(table)
    aborted.abort()
    aborted.abort()
    aborted.close()  # after abort: nothing is published
    assert _tables(tmp_path / "other.duckdb") == {"companies.partial"}
    assert aborted.read_back(table.schema).read_all().equals(table)


def test_the_file_is_released_after_the_run(tmp_path, make_companies) -> None:
    """Closed, the sink holds no connection: the file opens read-only in this process (which
    DuckDB refuses while a default connection to it is open here)."""
    path = tmp_path / "out.duckdb"
    result = _flow().run(companies=make_companies(20), sink=f"{path}::companies")
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.sql("SELECT count(*) FROM companies").fetchall() == [(10,)]
    # Its reader opens the file when pulled, and lets it go once read.
    assert result["companies"].read_all().num_rows == 10
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.sql("SELECT count(*) FROM companies").fetchall() == [(10,)]


# --------------------------------------------------------------------------- run(sink=...)


@pytest.mark.parametrize("limit", [1, 4])
@pytest.mark.parametrize("kind", ["str", "sink"])
def test_run_with_sink_equals_run_without(tmp_path, make_companies, kind: str, limit: int) -> None:
    table = make_companies(52)
    path = tmp_path / "out.duckdb"
    sink = f"{path}::prospects" if kind == "str" else af.DuckDBSink(path, "prospects")
    flow = _flow(max_concurrency=limit)

    plain = flow.run(companies=table)
    sunk = flow.run(companies=table, sink=sink)

    assert isinstance(sunk["companies"], pa.RecordBatchReader)
    assert sunk["companies"].read_all().equals(plain["companies"])
    assert _table(path, "prospects").equals(_expected(table))
    assert _tables(path) == {"prospects"}
    assert sunk.stats[0]["total_batches"] == 11


def test_string_form_names_path_and_table(tmp_path) -> None:
    sink = as_sink(f"{tmp_path}/out.duckdb::my table::2024")
    assert isinstance(sink, af.DuckDBSink)
    assert sink.path == tmp_path / "out.duckdb"
    assert sink.table == "my table::2024"  # what follows the first "::"
    assert sink.mode == "append"
    assert isinstance(as_sink(str(tmp_path / "out.parquet")), af.ParquetSink)
    assert isinstance(as_sink(f"file://{tmp_path}/odd::name.parquet"), af.ParquetSink)  # a URI


def test_each_stream_is_committed_before_the_run_goes_on(tmp_path, make_companies) -> None:
    """After each stream, a connection of this process sees it whole in the partial table, and
    the table itself untouched; the run publishes at its end."""
    path = tmp_path / "out.duckdb"
    _seed(path, "prospects", _expected(make_companies(4, start=1000)))
    seen: list[tuple[int, int, set[str]]] = []

    def on_stream_complete(stream_num: int, total: int, results: pa.Table) -> None:
        with duckdb.connect(str(path)) as con:
            partial = con.sql('SELECT count(*) FROM "prospects.partial"').fetchall()[0][0]
            table = con.sql("SELECT count(*) FROM prospects").fetchall()[0][0]
        seen.append((stream_num, partial, table))

    flow = _flow(4, incremental=True, on_stream_complete=on_stream_complete)
    flow.run(companies=make_companies(20), sink=f"{path}::prospects")
    assert seen == [(1, 2, 2), (2, 4, 2), (3, 6, 2), (4, 8, 2), (5, 10, 2)]
    assert _table(path, "prospects").num_rows == 12


# --------------------------------------------------------------------------- append and replace


def test_append_adds_the_runs_rows_after_the_tables(tmp_path, make_companies) -> None:
    path = tmp_path / "out.duckdb"
    earlier = _expected(make_companies(10, start=500))
    _seed(path, "prospects", earlier)
    with duckdb.connect(str(path)) as con:  # a table with holes still appends at its end
        con.execute("DELETE FROM prospects WHERE id = 502")
    earlier = earlier.filter(pc.not_equal(earlier["id"], 502))
    first, second = make_companies(23), make_companies(17, start=100)

    one = _flow().run(companies=first, sink=af.DuckDBSink(path, "prospects"))
    two = _flow().run(companies=second, sink=af.DuckDBSink(path, "prospects", mode="append"))

    expected = pa.concat_tables([earlier, _expected(first), _expected(second)])
    assert _table(path, "prospects").equals(expected)
    # Each run reads back its own rows only.
    assert one["companies"].read_all().equals(_expected(first))
    assert two["companies"].read_all().equals(_expected(second))


def test_replace_replaces_the_table(tmp_path, make_companies) -> None:
    path = tmp_path / "out.duckdb"
    _seed(path, "prospects", pa.table({"other": ["x", "y"]}))
    table = make_companies(21)
    result = _flow().run(companies=table, sink=af.DuckDBSink(path, "prospects", mode="replace"))
    assert _table(path, "prospects").equals(_expected(table))
    assert result["companies"].read_all().equals(_expected(table))
    again = _flow().run(companies=table, sink=af.DuckDBSink(path, "prospects", mode="replace"))
    assert _table(path, "prospects").equals(_expected(table))
    assert again["companies"].read_all().equals(_expected(table))


def test_append_accepts_types_duckdb_casts_implicitly(tmp_path, make_companies) -> None:
    path = tmp_path / "out.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE narrow (ID BIGINT, score DOUBLE)")

    @af.intelligent_streaming(4, over="rows")
    class Score(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            rows = context["rows"]
            return {"rows": rows.append_column("score", pc.cast(rows["id"], pa.int32()))}

    rows = pa.table({"id": pa.array(range(10), pa.int32())})
    result = af.Flow(Score).run(rows=rows, sink=f"{path}::narrow")
    back = result["rows"].read_all()
    assert back.schema == pa.schema([("id", pa.int32()), ("score", pa.int32())])
    assert back["score"].to_pylist() == list(range(10))
    stored = _table(path, "narrow")
    assert stored.schema.names == ["ID", "score"]
    assert stored["score"].type == pa.float64()
    assert stored["score"].to_pylist() == [float(i) for i in range(10)]


@pytest.mark.parametrize(
    ("columns", "problem"),
    [
        ("id BIGINT, name VARCHAR, employees BIGINT", r"not in the table: double BIGINT"),
        (
            "id BIGINT, name VARCHAR, employees BIGINT, double BIGINT, extra VARCHAR",
            r"missing extra VARCHAR",
        ),
        (
            "id BIGINT, name BIGINT, employees BIGINT, double BIGINT",
            r"name is VARCHAR here but BIGINT in the table",
        ),
        (
            "id INTEGER, name VARCHAR, employees BIGINT, double BIGINT",
            r"id is BIGINT here but INTEGER in the table",
        ),
    ],
    ids=["extra column", "missing column", "incompatible type", "narrowing type"],
)
def test_append_to_other_columns_fails_at_the_first_stream(
    tmp_path, make_companies, columns: str, problem: str
) -> None:
    path = tmp_path / "out.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute(f"CREATE TABLE prospects ({columns})")
    calls: list[int] = []

    @af.intelligent_streaming(5, over="companies")
    class QuickFit(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            calls.append(context["_batch_metadata"]["batch_number"])
            return {"companies": _expected(context["companies"])}

    with pytest.raises(af.ExecutionError) as raised:
        af.Flow(QuickFit).run(companies=make_companies(30), sink=f"{path}::prospects")
    message = str(raised.value)
    assert "DuckDB sink" in message
    assert "table 'prospects'" in message
    assert "mode='replace'" in message
    assert re.search(problem, message), message
    assert calls == [1]
    assert _table(path, "prospects").num_rows == 0


def test_a_later_stream_with_other_columns_names_the_table(tmp_path, make_companies) -> None:
    @af.intelligent_streaming(5, over="companies")
    class Drift(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            companies = context["companies"]
            if context["_batch_metadata"]["batch_number"] == 2:
                companies = companies.drop_columns(["name"])
            return {"companies": companies}

    path = tmp_path / "out.duckdb"
    with pytest.raises(af.ExecutionError, match=r"table 'drift'.*do not match the first"):
        af.Flow(Drift).run(companies=make_companies(15), sink=f"{path}::drift")
    assert _tables(path) == {"drift.partial"}


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("mode", ["append", "replace"])
def test_a_failure_mid_run_leaves_whole_streams_and_the_table_as_it_was(
    tmp_path, make_companies, mode: str
) -> None:
    path = tmp_path / "out.duckdb"
    earlier = _expected(make_companies(6, start=900))
    _seed(path, "prospects", earlier)
    fail = [True]

    @af.intelligent_streaming(5, over="companies")
    class FailThird(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            if context["_batch_metadata"]["batch_number"] == 3 and fail[0]:
                raise RuntimeError("boom")
            return {"companies": _expected(context["companies"])}

    table = make_companies(30)
    sink = af.DuckDBSink(path, "prospects", mode=mode)
    with pytest.raises(af.BatchExecutionError) as raised:
        af.Flow(FailThird).run(companies=table, sink=sink)
    assert _table(path, "prospects").equals(earlier)
    assert _table(path, "prospects.partial").equals(_expected(table.slice(0, 10)))
    partial = raised.value.partial_results["companies"]
    assert partial.read_all().equals(_expected(table.slice(0, 10)))

    # The rerun starts the partial table afresh: no stream of the failed run is written twice.
    fail[0] = False
    af.Flow(FailThird).run(companies=table, sink=af.DuckDBSink(path, "prospects", mode=mode))
    expected = (
        _expected(table) if mode == "replace" else pa.concat_tables([earlier, _expected(table)])
    )
    assert _table(path, "prospects").equals(expected)
    assert "prospects.partial" not in _tables(path)


def test_an_interrupt_keeps_the_table_and_the_completed_streams(tmp_path, make_companies) -> None:
    @af.intelligent_streaming(5, over="companies")
    class Stop(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            if context["_batch_metadata"]["batch_number"] == 4:
                raise KeyboardInterrupt
            return {"companies": context["companies"]}

    path = tmp_path / "out.duckdb"
    table = make_companies(40)
    with pytest.raises(KeyboardInterrupt):
        af.Flow(Stop).run(companies=table, sink=f"{path}::companies")
    assert _tables(path) == {"companies.partial"}
    assert _table(path, "companies.partial").equals(table.slice(0, 15))


def test_publishing_that_fails_keeps_the_table_and_raises(tmp_path, make_companies) -> None:
    """A constraint of the table that the run's rows break fails the run at its end; the
    table is as it was, the rows wait in the partial table."""
    path = tmp_path / "out.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute(
            "CREATE TABLE prospects (id BIGINT PRIMARY KEY, name VARCHAR, employees BIGINT, "
            "double BIGINT)"
        )
        con.execute("INSERT INTO prospects VALUES (4, 'taken', 0, 0)")
    table = make_companies(10)
    with pytest.raises(af.ExecutionError, match=r"table 'prospects'.*moving the rows"):
        _flow().run(companies=table, sink=f"{path}::prospects")
    assert _table(path, "prospects").num_rows == 1
    assert _table(path, "prospects.partial").equals(_expected(table))


# --------------------------------------------------------------------------- names, edges


@pytest.mark.parametrize(
    "name", ["my table", 'say "hi"', "Sales.2024", "select", "Größe-✓", "UPPER"]
)
def test_odd_table_names_are_quoted(tmp_path, make_companies, name: str) -> None:
    path = tmp_path / "out.duckdb"
    table = make_companies(12)
    result = _flow().run(companies=table, sink=af.DuckDBSink(path, name))
    assert result["companies"].read_all().equals(_expected(table))
    assert _tables(path) == {name}
    assert _table(path, name).equals(_expected(table))
    _flow().run(companies=table, sink=f"{path}::{name}")  # appended, by the string form
    assert _table(path, name).num_rows == 2 * _expected(table).num_rows


@pytest.mark.parametrize("mode", ["append", "replace"])
def test_empty_input_leaves_a_table_with_the_columns(tmp_path, make_companies, mode: str) -> None:
    path = tmp_path / "out.duckdb"
    empty = make_companies(0)
    result = _flow().run(companies=empty, sink=af.DuckDBSink(path, "prospects", mode=mode))
    assert result["companies"].schema == empty.schema
    assert result["companies"].read_all().num_rows == 0
    assert _table(path, "prospects").schema == empty.schema.remove_metadata()
    assert result.stats[0]["total_batches"] == 0


def test_empty_input_appends_nothing_to_a_table(tmp_path, make_companies) -> None:
    path = tmp_path / "out.duckdb"
    earlier = _expected(make_companies(4))
    _seed(path, "prospects", earlier)
    result = _flow().run(companies=make_companies(0), sink=f"{path}::prospects")
    assert result["companies"].read_all().num_rows == 0
    assert _table(path, "prospects").equals(earlier)
    assert _tables(path) == {"prospects"}


def test_streams_that_keep_no_rows_leave_a_table_with_their_columns(
    tmp_path, make_companies
) -> None:
    @af.intelligent_streaming(5, over="companies")
    class DropAll(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            companies = _expected(context["companies"])
            return {"companies": companies.filter(pc.less(companies["id"], 0))}

    path = tmp_path / "out.duckdb"
    result = af.Flow(DropAll).run(companies=make_companies(12), sink=f"{path}::prospects")
    assert result["companies"].read_all().num_rows == 0
    assert _table(path, "prospects").schema.names == ["id", "name", "employees", "double"]


@pytest.mark.parametrize(
    "change",
    [
        "DELETE FROM prospects WHERE id = 0",
        "DELETE FROM prospects WHERE id = 1000",  # before this run's rows
        "CREATE OR REPLACE TABLE prospects AS SELECT * FROM prospects ORDER BY id DESC",
    ],
)
def test_a_table_changed_before_read_back_is_an_error(
    tmp_path, make_companies, change: str
) -> None:
    path = tmp_path / "out.duckdb"
    _seed(path, "prospects", _expected(make_companies(4, start=1000)))
    result = _flow().run(companies=make_companies(10), sink=f"{path}::prospects")
    with duckdb.connect(str(path)) as con:
        con.execute(change)
        con.execute("INSERT INTO prospects SELECT * FROM prospects")  # the count is no guide
    with pytest.raises(af.ExecutionError, match=r"rows are no longer where it wrote them"):
        result["companies"].read_all()


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        (("out.duckdb", "t"), None),
        ((":memory:", "t"), r"':memory:' would vanish"),
        ((123, "t"), r"path must be"),
        (("out.duckdb", ""), r"table must be a table's name.*out\.duckdb::prospects"),
        (("out.duckdb", 5), r"table must be"),
        (("out.duckdb", "t.partial"), r"ends with '\.partial'"),
    ],
)
def test_bad_arguments_are_configuration_errors(arguments: tuple[Any, Any], match: str) -> None:
    if match is None:
        assert repr(af.DuckDBSink(*arguments)) == "DuckDBSink('out.duckdb', 't', mode='append')"
        return
    with pytest.raises(af.ConfigurationError, match=match):
        af.DuckDBSink(*arguments)


def test_bad_mode_names_the_sink_and_table() -> None:
    with pytest.raises(
        af.ConfigurationError,
        match=r"DuckDB sink 'out\.duckdb', table 't': mode must be 'append' or 'replace', "
        r"got 'overwrite'",
    ):
        af.DuckDBSink("out.duckdb", "t", mode="overwrite")


def test_the_string_form_without_a_table_fails_before_any_agent(make_companies) -> None:
    calls: list[int] = []

    @af.intelligent_streaming(5, over="companies")
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            calls.append(1)

    with pytest.raises(af.ConfigurationError, match=r"out\.duckdb::prospects"):
        af.Flow(Work).run(companies=make_companies(10), sink="out.duckdb::")
    assert calls == []


@pytest.mark.parametrize(
    ("content", "kind"),
    [(b"id,name\n1,a\n", "a text file"), (b"", "an empty file"), (None, "a directory")],
)
def test_a_path_that_is_not_a_database_is_refused_and_left_alone(
    tmp_path, make_companies, content: bytes | None, kind: str
) -> None:
    path = tmp_path / "out.duckdb"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    match = "is a directory" if content is None else "not a DuckDB database"
    with pytest.raises(af.ExecutionError, match=rf"DuckDB sink .*out\.duckdb', table 't'.*{match}"):
        _flow().run(companies=make_companies(10), sink=f"{path}::t")
    if content is not None:
        assert path.read_bytes() == content


def test_a_database_held_by_another_process_is_a_clear_error(tmp_path, make_companies) -> None:
    path, ready = tmp_path / "held.duckdb", tmp_path / "ready"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys; con = duckdb.connect(sys.argv[1]); "
            "open(sys.argv[2], 'w').close(); sys.stdin.read()",
            str(path),
            str(ready),
        ],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert holder.poll() is None, holder.communicate()[1]
            assert time.monotonic() < deadline, "the holder never opened the database"
            time.sleep(0.02)
        with pytest.raises(af.ExecutionError) as raised:
            _flow().run(companies=make_companies(10), sink=f"{path}::t")
    finally:
        holder.communicate(b"", timeout=60)
    message = str(raised.value)
    assert "table 't'" in message
    assert "another process holds the database" in message
    assert f"PID {holder.pid}" in message


def test_a_read_only_connection_of_this_process_is_a_clear_error(tmp_path, make_companies) -> None:
    path = tmp_path / "out.duckdb"
    _seed(path, "other", pa.table({"x": [1]}))
    with (
        duckdb.connect(str(path), read_only=True),
        pytest.raises(af.ExecutionError, match=r"open in this process with other settings"),
    ):
        _flow().run(companies=make_companies(10), sink=f"{path}::t")
    # Released: the next run has the file.
    _flow().run(companies=make_companies(10), sink=f"{path}::t")
    assert _table(path, "t").num_rows == 5


def test_a_view_of_that_name_is_refused(tmp_path, make_companies) -> None:
    path = tmp_path / "out.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE VIEW prospects AS SELECT 1 AS x")
    with pytest.raises(af.ExecutionError, match=r"'prospects' is a view"):
        _flow().run(companies=make_companies(10), sink=f"{path}::Prospects")


def test_two_sinks_of_one_table_at_once_are_refused(tmp_path, make_companies) -> None:
    path = tmp_path / "out.duckdb"
    first = af.DuckDBSink(path, "prospects")
    first.write(make_companies(3))
    second = af.DuckDBSink(path, "PROSPECTS")
    with pytest.raises(af.ExecutionError, match=r"another sink of this process"):
        second.write(make_companies(3))
    second.abort()
    first.close()
    assert _table(path, "prospects").equals(make_companies(3))


# --------------------------------------------------------------------------- with DuckDBState


def test_the_state_and_the_sink_share_a_file(tmp_path, make_companies) -> None:
    path = tmp_path / "run.duckdb"
    calls: list[int] = []
    store = af.DuckDBState(path, table="quick_fit", key="id")

    @af.intelligent_streaming(5, over="companies", state=store)
    class QuickFit(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            calls.append(context["companies"].num_rows)
            return {"companies": _expected(context["companies"])}

    table = make_companies(23)
    first = af.Flow(QuickFit).run(companies=table, sink=f"{path}::prospects")
    assert first["companies"].read_all().equals(_expected(table))
    second = af.Flow(QuickFit).run(
        companies=table, sink=af.DuckDBSink(path, "prospects", mode="replace")
    )
    assert sum(calls) == 23  # the second run loaded every row
    assert second["companies"].read_all().equals(_expected(table))
    assert _table(path, "prospects").equals(_expected(table))

    with pytest.raises(af.ExecutionError, match=r"result table of a DuckDBState"):
        af.Flow(QuickFit).run(companies=table, sink=f"{path}::quick_fit")


STREAM_SIZE = 40
ROWS = 600
BLOCK_AT = 5  # streams 1..4 are in the sink (and, with commit_interval=0, the state)

PIPELINE = f"""
import json
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import arrowflow as af

state_path, sink_path, mode, log_path, ready_path, block_at, interval, out_path = sys.argv[1:9]
store = af.DuckDBState(state_path, table="enriched", key="id", commit_interval=float(interval))


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
        kept = rows.filter(pc.not_equal(pc.bit_wise_and(rows["id"], 3), 0))
        return {{"companies": kept.append_column("score", pc.multiply(kept["id"], 3))}}


ids = pa.array([(i * 379) % {ROWS} for i in range({ROWS})], pa.int64())
companies = pa.table({{"id": ids, "name": pc.cast(ids, pa.string())}})
sink = f"{{sink_path}}::prospects" if mode == "append" else af.DuckDBSink(
    sink_path, "prospects", mode=mode
)
result = af.Flow(Enrich).run(companies=companies, sink=sink)
pq.write_table(result["companies"].read_all(), out_path)
"""


def _crash_input() -> pa.Table:
    ids = pa.array([(i * 379) % ROWS for i in range(ROWS)], pa.int64())
    return pa.table({"id": ids, "name": pc.cast(ids, pa.string())})


def _crash_output(rows: pa.Table) -> pa.Table:
    kept = rows.filter(pc.not_equal(pc.bit_wise_and(rows["id"], 3), 0))
    return kept.append_column("score", pc.multiply(kept["id"], 3))


def _logged(log: Path) -> list[int]:
    return [key for line in log.read_text().splitlines() for key in json.loads(line)]


def _run_to_the_end(script: Path, paths: Callable[[str], list[str]], tag: str) -> None:
    done = subprocess.run(
        [sys.executable, str(script), *paths(tag)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
@pytest.mark.parametrize(
    ("shared", "interval", "mode"),
    [
        (True, 0.0, "append"),
        (False, 0.0, "append"),
        (True, 600.0, "append"),
        (False, 600.0, "replace"),
    ],
    ids=[
        "one file, state holds streams 1-4",
        "two files, state holds streams 1-4",
        "one file, state holds nothing",
        "two files, replace, state holds nothing",
    ],
)
def test_a_killed_run_reruns_without_writing_a_row_twice(
    tmp_path: Path, shared: bool, interval: float, mode: str
) -> None:
    """SIGKILL with streams 1-4 in the partial table (and in the state, with
    ``commit_interval=0``; with 600 s, in the sink only): the table is as it was, the rerun
    loads what the state holds, and the table ends with every row once, in order, as after an
    uninterrupted run."""
    script = tmp_path / "pipeline.py"
    script.write_text(PIPELINE)
    earlier = pa.table(
        {
            "id": pa.array([10_001, 10_002, 10_003], pa.int64()),
            "name": ["a", "b", "c"],
            "score": pa.array([1, 2, 3], pa.int64()),
        }
    )

    def paths(tag: str, block_at: int = 0) -> list[str]:
        state = tmp_path / f"{tag}.duckdb"
        sink = state if shared else tmp_path / f"{tag}-sink.duckdb"
        return [
            str(state),
            str(sink),
            mode,
            str(tmp_path / f"{tag}.log"),
            str(tmp_path / f"{tag}.ready"),
            str(block_at),
            str(interval),
            str(tmp_path / f"{tag}.parquet"),
        ]

    for tag in ("run", "fresh"):
        _seed(Path(paths(tag)[1]), "prospects", earlier)

    ready = tmp_path / "run.ready"
    killed = subprocess.Popen(
        [sys.executable, str(script), *paths("run", BLOCK_AT)],
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

    sink_path = Path(paths("run")[1])
    ids = _crash_input()["id"].to_pylist()
    written = _crash_output(_crash_input().slice(0, (BLOCK_AT - 1) * STREAM_SIZE))
    assert _table(sink_path, "prospects").equals(earlier)  # untouched by the killed run
    assert _table(sink_path, "prospects.partial").equals(written)  # streams 1-4, whole
    log = tmp_path / "run.log"
    assert _logged(log) == ids[: BLOCK_AT * STREAM_SIZE]
    log.unlink()

    _run_to_the_end(script, paths, "run")
    persisted = (BLOCK_AT - 1) * STREAM_SIZE if interval == 0 else 0
    assert _logged(log) == ids[persisted:]  # the state's rows were loaded, not recomputed

    _run_to_the_end(script, paths, "fresh")
    resumed = _table(sink_path, "prospects")
    uninterrupted = _table(Path(paths("fresh")[1]), "prospects")
    everything = _crash_output(_crash_input())
    expected = everything if mode == "replace" else pa.concat_tables([earlier, everything])
    assert resumed.equals(expected)
    assert resumed.equals(uninterrupted)
    assert "prospects.partial" not in _tables(sink_path)
    read_back = pq.read_table(tmp_path / "run.parquet")
    assert read_back.equals(pq.read_table(tmp_path / "fresh.parquet"))
    assert read_back.equals(everything)
