"""Interop agents: ``af.polars_agent`` and ``af.sql_agent`` (DESIGN §7, Interop).

Each result is checked against the same function or query run by hand, with polars or DuckDB,
over the whole table; streams run at once are proved concurrent with a barrier, never a sleep.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Any

import duckdb
import polars as pl
import pyarrow as pa
import pytest

import arrowflow as af
from arrowflow import interop

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

WAIT = 10.0  # seconds a stream waits for the others at the barrier before failing the test
QUERY = "select *, employees * 2 as doubled, upper(name) as loud from batch where employees > 20"


@pytest.fixture
def companies(make_companies: Callable[..., pa.Table]) -> pa.Table:
    """100 companies: ``id``, ``name`` (string) and ``employees``."""
    return make_companies(100)


@pytest.fixture
def sectors() -> pa.Table:
    """A lookup table: the sector of each ``employees % 3``."""
    return pa.table({"bucket": [0, 1, 2], "sector": ["retail", "software", "energy"]})


def by_duckdb(sql: str, parameters: dict[str, Any] | None = None, **tables: Any) -> pa.Table:
    """``sql`` run by hand on a connection of its own, ``tables`` registered by name."""
    connection = duckdb.connect()
    for name, table in tables.items():
        connection.register(name, table)
    return connection.sql(sql, params=parameters).to_arrow_table()


def streamed(agent: type[af.Agent], size: int = 10, **options: Any) -> type[af.Agent]:
    """``agent`` made the trigger of a scope over ``companies``."""
    return af.intelligent_streaming(size, over="companies", **options)(agent)


class Gate(af.Agent):
    """Passes the streams through; the subclasses make scopes of it."""

    def call(self, context: Any) -> None:
        return None


def gate(size: int = 10, **options: Any) -> type[af.Agent]:
    """A fresh trigger over ``companies`` that changes nothing: the agents after it stream."""

    class Trigger(Gate):
        pass

    return streamed(Trigger, size, **options)


def same_frame(table: pa.Table, frame: Any) -> bool:
    return bool(pl.from_arrow(table).equals(frame))


# --------------------------------------------------------------------------- polars


def add_columns(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(
        doubled=pl.col("employees") * 2, loud=pl.col("name").str.to_uppercase()
    ).filter(pl.col("employees") > 20)


def add_columns_lazily(frame: pl.LazyFrame) -> pl.LazyFrame:
    return frame.with_columns(doubled=pl.col("employees") * 2).filter(pl.col("employees") > 20)


def test_polars_agent_outside_a_scope_runs_once_on_the_whole_field(companies: pa.Table) -> None:
    calls: list[int] = []

    def fit(frame: pl.DataFrame) -> pl.DataFrame:
        calls.append(frame.height)
        return add_columns(frame)

    result = af.Flow(af.polars_agent(fit)).run(companies=companies)

    assert calls == [100]
    assert same_frame(result["companies"], add_columns(pl.from_arrow(companies)))


@pytest.mark.parametrize("concurrency", [1, 4])
def test_polars_agent_in_a_scope_runs_per_stream_and_keeps_order(
    companies: pa.Table, concurrency: int
) -> None:
    heights: list[int] = []
    lock = threading.Lock()

    def fit(frame: pl.DataFrame) -> pl.DataFrame:
        with lock:
            heights.append(frame.height)
        return add_columns(frame)

    flow = gate(7, max_concurrency=concurrency) >> af.polars_agent(fit)
    result = flow.run(companies=companies)

    assert sorted(heights) == sorted([7] * 14 + [2])
    assert same_frame(result["companies"], add_columns(pl.from_arrow(companies)))
    assert result["companies"]["id"].to_pylist() == sorted(result["companies"]["id"].to_pylist())


def test_polars_agent_can_be_the_trigger_itself(companies: pa.Table) -> None:
    agent = streamed(af.polars_agent(add_columns), 30, max_concurrency=4)
    result = af.Flow(agent).run(companies=companies)
    assert result.stats[0]["total_batches"] == 4
    assert same_frame(result["companies"], add_columns(pl.from_arrow(companies)))


def _lazy_real(frame):  # type: ignore[no-untyped-def]
    return frame


_lazy_real.__annotations__ = {"frame": pl.LazyFrame}


def _lazy_string(frame: pl.LazyFrame) -> pl.LazyFrame:  # a string: `from __future__` above
    return frame


def _lazy_unresolvable(frame: polars.LazyFrame) -> polars.LazyFrame:  # type: ignore[name-defined]  # noqa: F821
    return frame


def _eager_string(frame: pl.DataFrame) -> pl.DataFrame:
    return frame


def _unannotated(frame):  # type: ignore[no-untyped-def]
    return frame


@pytest.mark.parametrize(
    ("function", "received"),
    [
        (_lazy_real, "LazyFrame"),
        (_lazy_string, "LazyFrame"),
        (_lazy_unresolvable, "LazyFrame"),
        (_eager_string, "DataFrame"),
        (_unannotated, "DataFrame"),
    ],
    ids=["real-LazyFrame", "string-LazyFrame", "unresolvable-string", "DataFrame", "none"],
)
def test_the_first_parameters_annotation_chooses_the_frame(
    companies: pa.Table, function: Callable[[Any], Any], received: str
) -> None:
    seen: list[str] = []

    def record(frame: Any) -> Any:
        seen.append(type(frame).__name__)
        return function(frame)

    # Defined in this module too, so string annotations resolve (or not) as in `function`.
    record.__annotations__ = dict(function.__annotations__)
    result = af.Flow(gate(40) >> af.polars_agent(record, name="record")).run(companies=companies)

    assert seen == [received] * 3
    assert same_frame(result["companies"], pl.from_arrow(companies))


def test_a_returned_lazy_frame_is_collected(companies: pa.Table) -> None:
    result = af.Flow(gate(25) >> af.polars_agent(add_columns_lazily)).run(companies=companies)
    expected = add_columns_lazily(pl.from_arrow(companies).lazy()).collect()
    assert same_frame(result["companies"], expected)


def test_polars_strings_come_back_without_view_types(companies: pa.Table) -> None:
    def shout(frame: pl.DataFrame) -> pl.DataFrame:
        return frame.with_columns(loud=pl.col("name").str.to_uppercase(), tags=pl.lit(["a"]))

    for flow in (af.Flow(af.polars_agent(shout)), gate(30) >> af.polars_agent(shout)):
        out = flow.run(companies=companies)["companies"]
        assert out.schema.field("loud").type in (pa.string(), pa.large_string())
        assert out.schema.field("name").type in (pa.string(), pa.large_string())
        assert "_view" not in str(out.schema)
        assert out["loud"][0].as_py() == "COMPANY-0"


def test_polars_agent_reads_a_polars_frame_field(companies: pa.Table) -> None:
    result = af.Flow(af.polars_agent(add_columns)).run(companies=pl.from_arrow(companies))
    assert isinstance(result["companies"], pa.Table)
    assert same_frame(result["companies"], add_columns(pl.from_arrow(companies)))


def test_polars_agent_returning_no_frame_names_agent_stream_and_field(
    companies: pa.Table,
) -> None:
    def broken(frame: pl.DataFrame) -> Any:
        return frame.height

    # The function broke the agent's contract: never retried, the run fails at once.
    with pytest.raises(af.ConfigurationError) as raised:
        (gate(40) >> af.polars_agent(broken)).run(companies=companies)
    message = str(raised.value)
    assert "Agent 'broken', stream 1/3" in message
    assert "field 'companies'" in message
    assert "returned int" in message
    assert "return a polars DataFrame or LazyFrame" in message


def test_polars_agent_needs_a_function_taking_the_frame() -> None:
    def nothing() -> None:
        return None

    with pytest.raises(af.ConfigurationError, match="first positional parameter"):
        af.polars_agent(nothing)
    with pytest.raises(af.ConfigurationError, match="function over a frame"):
        af.polars_agent("not a function")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- SQL


def test_sql_agent_outside_a_scope_runs_once_on_the_whole_field(companies: pa.Table) -> None:
    result = af.Flow(af.sql_agent(QUERY)).run(companies=companies)
    assert result["companies"].equals(by_duckdb(QUERY, batch=companies))


@pytest.mark.parametrize("as_trigger", [False, True], ids=["after-trigger", "trigger"])
def test_sql_agent_in_a_scope_equals_the_query_on_the_whole_table(
    companies: pa.Table, as_trigger: bool
) -> None:
    agent = af.sql_agent(QUERY)
    flow = af.Flow(streamed(agent, 9)) if as_trigger else gate(9) >> agent
    result = flow.run(companies=companies)
    assert result.stats[0]["total_batches"] == 12
    assert result["companies"].equals(by_duckdb(QUERY, batch=companies))


def test_concurrent_streams_keep_order_and_each_thread_has_its_own_connection(
    companies: pa.Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first four streams meet at a barrier, so four threads run the same agent at once."""
    limit = 4
    barrier = threading.Barrier(limit, timeout=WAIT)
    used: list[tuple[int, duckdb.DuckDBPyConnection]] = []  # kept alive: ids stay distinct
    lock = threading.Lock()
    opened = interop._connection

    def recording() -> duckdb.DuckDBPyConnection:
        connection = opened()
        with lock:
            used.append((threading.get_ident(), connection))
        return connection

    class Meet(Gate):
        def call(self, context: Any) -> None:
            if context["_batch_metadata"]["batch_number"] <= limit:
                barrier.wait()

    agent = af.sql_agent(QUERY)
    monkeypatch.setattr(interop, "_connection", recording)
    result = (streamed(Meet, 5, max_concurrency=limit) >> agent).run(companies=companies)

    assert result["companies"].equals(by_duckdb(QUERY, batch=companies))
    assert len(used) == 20
    connections = {
        thread: {id(connection) for t, connection in used if t == thread} for thread, _ in used
    }
    assert len(connections) >= limit
    assert all(len(ids) == 1 for ids in connections.values())
    assert len({id(connection) for _, connection in used}) == len(connections)


def test_each_thread_opens_one_connection_of_its_own() -> None:
    found: dict[str, list[duckdb.DuckDBPyConnection]] = {}

    def open_twice(name: str) -> None:
        found[name] = [interop._connection(), interop._connection()]

    threads = [threading.Thread(target=open_twice, args=(f"t{k}",)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    first, second = found["t0"], found["t1"]
    assert first[0] is first[1]
    assert second[0] is second[1]
    assert first[0] is not second[0]


@pytest.mark.parametrize("lookup", ["arrow", "polars"])
def test_tables_join_the_stream_with_a_lookup_field(
    companies: pa.Table, sectors: pa.Table, lookup: str
) -> None:
    sql = (
        "select b.id, b.employees, s.sector from batch b "
        "join sectors s on s.bucket = b.employees % 3 order by b.id"
    )
    value = sectors if lookup == "arrow" else pl.from_arrow(sectors)
    agent = af.sql_agent(sql, tables=("sectors",))

    result = (gate(30, max_concurrency=4) >> agent).run(companies=companies, sectors=value)

    expected = by_duckdb(sql, batch=companies, sectors=sectors)
    assert result["companies"].cast(expected.schema).equals(expected)
    assert result["sectors"] is value  # read, never written


CONCURRENT_QUERIES = """
import sys
import polars as pl
import pyarrow as pa
import arrowflow as af

@af.intelligent_streaming(10, over="rows", max_concurrency=4)
class Gate(af.Agent):
    def call(self, context):
        return None

lookup = pa.table({"bucket": [0, 1, 2], "sector": ["a", "b", "c"]})
join = af.sql_agent(
    "select b.id, s.sector from batch b join lookup s on s.bucket = b.id % 3 order by b.id",
    tables=("lookup",),
)
rows = pa.table({"id": range(4000)})
given = lookup if sys.argv[1] == "arrow" else pl.from_arrow(lookup)
result = (Gate >> join).run(rows=rows, lookup=given)["rows"]
print(result.num_rows, result["sector"][3999])
"""


@pytest.mark.parametrize("lookup", ["arrow", "polars"])
def test_a_script_running_queries_at_once_ends_cleanly(tmp_path: Path, lookup: str) -> None:
    """400 streams, four at a time, join one lookup field; then the script exits.

    Two ways this went wrong: a stream thread closing its DuckDB connection as the interpreter
    exited aborted the process (SIGABRT, every time), and polars before 1.41 deadlocks the
    interpreter exporting one frame from two threads at once (the dependency floor hung).
    """
    script = tmp_path / "queries.py"
    script.write_text(CONCURRENT_QUERIES)
    done = subprocess.run(
        [sys.executable, str(script), lookup], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4000", "a"]


def test_tables_fields_are_not_candidates_for_over(companies: pa.Table, sectors: pa.Table) -> None:
    agent = af.sql_agent("select count(*) as n from batch join sectors on true", tables="sectors")
    result = af.Flow(agent).run(companies=companies, sectors=sectors)
    assert result["companies"].to_pylist() == [{"n": 300}]


def test_named_parameters_are_bound_from_context_fields(companies: pa.Table) -> None:
    sql = "select id, employees * $factor as scaled from batch where employees >= $min_employees"
    agent = af.sql_agent(sql)
    result = (gate(10) >> agent).run(
        companies=companies, factor=3, min_employees=pa.scalar(90), unused="left alone"
    )
    expected = by_duckdb(sql, {"factor": 3, "min_employees": 90}, batch=companies)
    assert result["companies"].equals(expected)
    assert result["companies"].num_rows == 10


def test_a_missing_parameter_names_the_field_to_set(companies: pa.Table) -> None:
    agent = af.sql_agent("select * from batch where employees > $threshold")
    with pytest.raises(af.ExecutionError) as raised:
        af.Flow(agent).run(companies=companies)
    message = str(raised.value)
    assert "$threshold" in message
    assert "Set field 'threshold'" in message
    assert "companies" in message  # the fields there are


def test_odd_field_names_work_as_over_and_as_tables(companies: pa.Table, sectors: pa.Table) -> None:
    over, lookup = 'My "odd" Companies', "Sector List"
    sql = (
        'select b.id, s.sector from batch b join "Sector List" s '
        "on s.bucket = b.employees % 3 order by b.id"
    )
    agent = af.sql_agent(sql, over=over, tables=[lookup])
    scope = af.intelligent_streaming(25, over=over)(af.sql_agent("select * from batch"))

    result = (scope >> agent).run(**{over: companies, lookup: sectors})

    expected = by_duckdb(sql, batch=companies, **{"Sector List": sectors})
    assert result[over].cast(expected.schema).equals(expected)


def test_capitalised_table_names_resolve_quoted_or_not(
    companies: pa.Table, sectors: pa.Table
) -> None:
    for reference in ("Sectors", '"Sectors"', "sectors"):
        sql = f"select count(*) as n from batch, {reference} s where s.bucket = 0"
        agent = af.sql_agent(sql, over="companies", tables=["Sectors"])
        result = af.Flow(agent).run(companies=companies, Sectors=sectors)
        assert result["companies"].to_pylist() == [{"n": 100}]


def test_duckdb_strings_come_back_without_view_types(companies: pa.Table) -> None:
    views = pa.table({"name": pa.array(["a", "b"], pa.string_view())})
    out = af.Flow(af.sql_agent("select name, name || '!' as loud from batch")).run(rows=views)
    assert "_view" not in str(out["rows"].schema)
    assert out["rows"]["loud"].to_pylist() == ["a!", "b!"]


def test_a_failing_query_names_agent_stream_and_field() -> None:
    rows = pa.table({"code": ["1", "2", "3", "x", "5", "6"]})
    agent = af.sql_agent("select cast(code as integer) as code from batch", name="parse codes")
    scope = af.intelligent_streaming(2, over="rows")(agent)

    with pytest.raises(af.BatchExecutionError) as raised:
        af.Flow(scope).run(rows=rows)

    error = raised.value.original_error
    assert isinstance(error, af.ExecutionError)
    assert isinstance(error.__cause__, duckdb.Error)
    message = str(error)
    assert message.startswith("Agent 'parse codes', stream 2/3: the query over field 'rows'")
    assert "Conversion Error" in message
    assert "columns (code)" in message  # what to check the query against
    assert raised.value.batch_number == 2


def test_a_failing_query_outside_a_scope_names_agent_and_field(companies: pa.Table) -> None:
    agent = af.sql_agent("select missing_column from batch")
    with pytest.raises(af.ExecutionError) as raised:
        af.Flow(agent).run(companies=companies)
    message = str(raised.value)
    assert message.startswith("Agent 'sql(select missing_column from batch)': the query over")
    assert "field 'companies'" in message
    assert "columns (id, name, employees)" in message
    assert isinstance(raised.value.__cause__, duckdb.Error)


def test_the_connection_is_left_clean_after_a_failing_query(companies: pa.Table) -> None:
    with pytest.raises(af.ExecutionError):
        af.Flow(af.sql_agent("select nope from batch")).run(companies=companies)
    registered = interop._connection().sql(
        "select view_name from duckdb_views() where not internal"
    )
    assert registered.fetchall() == []


def test_a_query_sees_batch_and_its_tables_only(companies: pa.Table, sectors: pa.Table) -> None:
    """Neither a Python variable of the caller nor a table an earlier query registered."""
    secret = pa.table({"a": [1]})
    reads_secret = af.sql_agent("select * from secret", name="reads secret")
    with pytest.raises(af.ExecutionError, match="Table with name secret does not exist"):
        af.Flow(reads_secret).run(companies=companies)
    assert secret.num_rows == 1

    joins = af.sql_agent("select b.* from batch b, sectors s where s.bucket = 0", tables="sectors")
    reads_sectors = af.sql_agent("select * from sectors", "companies", name="reads sectors")
    with pytest.raises(af.ExecutionError, match="Table with name sectors does not exist"):
        (joins >> reads_sectors).run(companies=companies, sectors=sectors)


@pytest.mark.parametrize(
    "sql",
    [
        "select * from batch where employees > 50",
        "from batch where employees > 50",
        "select * from Batch where employees > 50",
        'select * from "BATCH" where employees > 50',
        "select * from temp.batch where employees > 50",
        "with big as (select * from batch where employees > 50) select * from big",
        "select * from (select * from batch) b where b.id in (select id from BATCH) and "
        "employees > 50",
    ],
    ids=["plain", "from-first", "capitalised", "quoted", "qualified", "cte", "both-cases"],
)
def test_batch_is_found_however_the_query_writes_it(companies: pa.Table, sql: str) -> None:
    """``batch`` as DuckDB's catalog would find it: in any case, in a CTE, in the temp schema;
    a caller's variable named ``batch`` is never read instead."""
    batch = pa.table({"employees": [1000]})  # noqa: F841  # what a frame-walking scan would find
    expected = by_duckdb("select * from batch where employees > 50 order by id", batch=companies)
    for flow in (af.Flow(af.sql_agent(sql)), gate(30, max_concurrency=2) >> af.sql_agent(sql)):
        assert flow.run(companies=companies)["companies"].sort_by("id").equals(expected)


@pytest.mark.parametrize(
    ("sql", "tables", "match"),
    [
        ("selec * from batch", (), "cannot parse"),
        ("select 1; select 2", (), "one statement, found 2"),
        ("select * from batch where id > ?", (), "positional parameters"),
        ("select * from batch", ("Batch",), "clashes with 'batch'"),
        ("select * from batch", ("codes", "Codes"), "clashes with 'codes'"),
        ("select * from batch", ("",), "non-empty strings"),
        ("  ", (), "takes a DuckDB query"),
    ],
)
def test_queries_that_cannot_run_are_refused_up_front(
    sql: str, tables: tuple[str, ...], match: str
) -> None:
    with pytest.raises(af.ConfigurationError, match=match):
        af.sql_agent(sql, tables=tables)


# --------------------------------------------------------------------------- both


def fit(kind: str, over: str | None = None) -> type[af.Agent]:
    """The same step, ``add_columns``, as a polars or a SQL agent named ``fit``."""
    if kind == "polars":
        return af.polars_agent(add_columns, over, name="fit")
    return af.sql_agent(QUERY, over, name="fit")


KINDS = ["polars", "sql"]


@pytest.mark.parametrize("kind", KINDS)
def test_over_is_detected_only_when_one_table_is_there(
    companies: pa.Table, sectors: pa.Table, kind: str
) -> None:
    with pytest.raises(af.ConfigurationError) as raised:
        af.Flow(fit(kind)).run(companies=companies, sectors=sectors)
    assert str(raised.value) == (
        "Agent 'fit': several tabular fields could be its input (companies, sectors); "
        "choose one with over='companies'."
    )
    with pytest.raises(af.ConfigurationError, match="Agent 'fit': no tabular field"):
        af.Flow(fit(kind)).run(query="tech")


@pytest.mark.parametrize("kind", KINDS)
def test_in_a_scope_the_streamed_field_is_the_input(
    companies: pa.Table, sectors: pa.Table, kind: str
) -> None:
    result = (gate(50) >> fit(kind)).run(companies=companies, sectors=sectors)
    assert result["sectors"] is sectors
    assert same_frame(result["companies"], add_columns(pl.from_arrow(companies)))


@pytest.mark.parametrize("kind", KINDS)
def test_a_wrong_over_names_agent_stream_and_field(companies: pa.Table, kind: str) -> None:
    agent = fit(kind, "rows")
    with pytest.raises(af.ExecutionError) as raised:
        af.Flow(agent).run(companies=companies)
    assert str(raised.value).startswith("Agent 'fit': field 'rows' (over=) is not in the context")
    assert "fields: companies" in str(raised.value)

    with pytest.raises(af.BatchExecutionError) as in_scope:
        (gate(40) >> agent).run(companies=companies, rows=42)
    message = str(in_scope.value.original_error)
    assert message.startswith("Agent 'fit', stream 1/3: field 'rows' (over=) must hold a table")
    assert "found int" in message


def test_a_tables_field_that_is_not_a_table_is_named(companies: pa.Table) -> None:
    agent = af.sql_agent("select * from batch", tables=["sectors"], name="fit")
    with pytest.raises(af.ExecutionError, match=r"field 'sectors' \(tables=\) must hold a table"):
        af.Flow(agent).run(companies=companies, sectors="retail")


@pytest.mark.parametrize("kind", KINDS)
def test_empty_tables_keep_their_columns(kind: str) -> None:
    empty = pa.table(
        {
            "id": pa.array([], pa.int64()),
            "name": pa.array([], pa.string()),
            "employees": pa.array([], pa.int64()),
        }
    )
    out = af.Flow(fit(kind)).run(companies=empty)["companies"]
    assert out.num_rows == 0
    assert out.schema.names == ["id", "name", "employees", "doubled", "loud"]


def test_names_show_in_reprs_and_errors() -> None:
    def shaped(frame: pl.DataFrame) -> pl.DataFrame:
        return frame

    sql = af.sql_agent("select *,\n    employees * 2 as doubled\nfrom batch where employees > 10")
    polars = af.polars_agent(shaped)
    named = af.sql_agent("select * from batch", name="passthrough")

    assert sql.name == "sql(select *, employees * 2 as doubled from batch…)"
    assert polars.name == "shaped"
    assert repr(af.Flow(polars, sql, named)) == f"Flow(shaped >> {sql.name} >> passthrough)"
    assert repr(named()) == "<SQLAgent agent 'passthrough'>"
    assert repr(af.Flow(gate(5) >> polars)).startswith("Flow([Trigger >> shaped | stream_size=5")
    with pytest.raises(af.ConfigurationError, match=r"^Agent 'passthrough': no tabular field"):
        af.Flow(named).run(rows=42)
