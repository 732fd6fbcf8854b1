"""DuckDBState: what the agents return comes back exactly, and a version bump starts afresh.

DESIGN §5: results round-trip exactly, schema included (names, case, types, nullability,
metadata); a ``version`` bump recomputes everything and the result has exactly the new agents'
columns. Each case runs a flow twice on a file store: the rerun loads every row and must equal
the first run's result, metadata included, and so must ``to_arrow()``.
"""

from __future__ import annotations

import decimal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import arrowflow as af
from arrowflow.state import DuckDBState

N = 10
STREAM = 4


def _ids(n: int = N) -> pa.Array:
    return pa.array(range(n), pa.int64())


def _with(columns: dict[str, pa.Array], *fields: pa.Field, **metadata: str) -> pa.Table:
    """``id`` plus ``columns``; ``fields`` replace the default field of their name."""
    table = pa.table({"id": _ids(), **columns})
    given = {field.name: field for field in fields}
    schema = pa.schema(
        [given.get(field.name, field) for field in table.schema], metadata=metadata or None
    )
    return table.cast(schema)


def _rowid() -> pa.Table:
    # Two rows per key, in an order of the agent's: DuckDB's row id keeps it, a user column
    # named rowid must not take its place.
    ids = pa.array([i // 2 for i in range(2 * N)], pa.int64())
    return pa.table({"id": ids, "rowid": pa.array([(i + 1) % 2 for i in range(2 * N)])})


def _case_names() -> pa.Table:
    return _with(
        {
            "Score": pa.array(range(N)),
            "score": pa.array([f"s{i}" for i in range(N)]),
            "SCORE": pa.array([float(i) for i in range(N)]),
            "score_1": pa.array([i % 2 == 0 for i in range(N)]),
        }
    )


def _reserved_names() -> pa.Table:
    return _with(
        {
            "__arrowflow_pos": pa.array(range(100, 100 + N)),
            "__ARROWFLOW_rowid": pa.array(range(N)),
            "": pa.array([f"empty {i}" for i in range(N)]),
        }
    )


def _durations() -> pa.Table:
    return _with(
        {
            "seconds": pa.array([i * 7 for i in range(N)], pa.duration("s")),
            "nanos": pa.array([None, *range(1, N)], pa.duration("ns")),
        }
    )


def _half_floats() -> pa.Table:
    return _with({"half": pa.array([None, *(i / 4 for i in range(1, N))], pa.float16())})


def _decimal256() -> pa.Table:
    wide = [decimal.Decimal(f"{'9' * 50}.{i:02d}") for i in range(N)]
    return _with(
        {
            "narrow": pa.array(
                [decimal.Decimal(f"{i}.25") for i in range(N)], pa.decimal256(10, 2)
            ),
            "wide": pa.array(wide, pa.decimal256(60, 2)),
        }
    )


def _sparse_union() -> pa.Table:
    codes = pa.array([3 if i % 3 else 7 for i in range(N)], pa.int8())
    members = [pa.array(range(N)), pa.array([f"v{i}" if i % 4 else None for i in range(N)])]
    return _with({"value": pa.UnionArray.from_sparse(codes, members, ["n", "s"], [3, 7])})


def _dense_union() -> pa.Table:
    codes = pa.array([i % 2 for i in range(N)], pa.int8())
    offsets = pa.array([i // 2 for i in range(N)], pa.int32())
    members = [pa.array([1.5, None, 3.5, 4.5, 5.5]), pa.array(["a", "b", None, "d", "e"])]
    return _with({"value": pa.UnionArray.from_dense(codes, offsets, members, ["x", "X"])})


def _non_nullable() -> pa.Table:
    return _with(
        {"name": pa.array([f"n{i}" for i in range(N)]), "tags": pa.array([["t"]] * N)},
        pa.field("id", pa.int64(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("tags", pa.list_(pa.field("tag", pa.string(), nullable=False)), nullable=False),
    )


def _metadata() -> pa.Table:
    return _with(
        {"score": pa.array(range(N)), "label": pa.array([f"l{i}" for i in range(N)])},
        pa.field("score", pa.int64(), metadata={"unit": "points"}),
        pa.field("label", pa.string(), metadata={"source": "llm", "model": "small"}),
        pipeline="prospects",
        version="3",
    )


def _nested() -> pa.Table:
    moments = [pa.MonthDayNano([i, i + 1, 1_000 * i + 7]) for i in range(N)]
    point = pa.struct(
        [pa.field("took", pa.duration("ms"), metadata={"k": "v"}), pa.field("x", pa.float16())]
    )
    points = [{"took": i, "x": i / 2} for i in range(N)]
    return _with(
        {
            "halves": pa.array([[i / 2, None] for i in range(N)], pa.list_(pa.float16())),
            "point": pa.array(points, point),
            "interval": pa.array(moments, pa.month_day_nano_interval()),
        }
    )


def _more_types() -> pa.Table:
    moment = pa.MonthDayNano([1, 2, 3])
    return _with(
        {
            "uuid": pa.ExtensionArray.from_storage(
                pa.uuid(), pa.array([bytes([i]) * 16 for i in range(N)], pa.binary(16))
            ),
            "json": pa.ExtensionArray.from_storage(pa.json_(), pa.array(['{"a": 1}'] * N)),
            "waits": pa.array(
                [[("a", i), ("b", None)] for i in range(N)], pa.map_(pa.string(), pa.duration("us"))
            ),
            "laps": pa.array([[i, i + 1] for i in range(N)], pa.large_list(pa.duration("ms"))),
            "pair": pa.array([[moment, None]] * N, pa.list_(pa.month_day_nano_interval(), 2)),
            "at": pa.array(range(N), pa.timestamp("ns", tz="Europe/Paris")),
            "clock": pa.array(range(N), pa.time64("ns")),
            "day": pa.array([86_400_000 * i for i in range(N)], pa.date64()),
            "code": pa.array([b"abc"] * N, pa.binary(3)),
            "price": pa.array([decimal.Decimal(f"{i}.5") for i in range(N)], pa.decimal32(5, 1)),
        }
    )


CASES: dict[str, Callable[[], pa.Table]] = {
    "rowid": _rowid,
    "case_names": _case_names,
    "reserved_names": _reserved_names,
    "duration": _durations,
    "float16": _half_floats,
    "decimal256": _decimal256,
    "sparse_union": _sparse_union,
    "dense_union": _dense_union,
    "non_nullable": _non_nullable,
    "metadata": _metadata,
    "nested": _nested,
    "more_types": _more_types,
}

#: The cases Parquet can hold (it has no union and no month-day-nano interval type).
PARQUET_CASES = [
    name for name in CASES if "union" not in name and name not in ("nested", "more_types")
]


@pytest.fixture
def open_store(tmp_path: Path) -> Iterator[Callable[..., DuckDBState]]:
    """``open_store(**options)``: a store on one file of the test, closed afterwards."""
    stores: list[DuckDBState] = []

    def build(**options: Any) -> DuckDBState:
        options = {"table": "quick_fit", "key": "id", **options}
        store = DuckDBState(tmp_path / "state.duckdb", **options)
        stores.append(store)
        return store

    yield build
    for store in stores:
        store.close()


def _enrich(store: DuckDBState, answers: pa.Table, calls: list[int]) -> type[af.Agent]:
    """A trigger whose agent returns the rows of ``answers`` of the stream's ids."""

    @af.intelligent_streaming(stream_size=STREAM, over="rows", state=store)
    class Enrich(af.Agent):
        def call(self, context: Any) -> dict[str, pa.Table]:
            ids = context["rows"]["id"]
            calls.append(len(ids))
            mask = pc.is_in(answers["id"], value_set=ids.combine_chunks())
            return {"rows": answers.filter(mask)}

    return Enrich


def _rows(n: int, lazy: bool, start: int = 0) -> pa.Table | pa.RecordBatchReader:
    """The input: ids ``start`` to ``n - 1``."""
    table = pa.table({"id": _ids(n).slice(start)})
    if lazy:
        return pa.RecordBatchReader.from_batches(table.schema, table.to_batches(3))
    return table


def _run(agent: type[af.Agent], rows: pa.Table | pa.RecordBatchReader) -> pa.Table:
    result: pa.Table = af.Flow(agent).run(rows=rows)["rows"]
    return result


# -- results round-trip ------------------------------------------------------------------------


@pytest.mark.parametrize("lazy", [False, True], ids=["table", "reader"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_rerun_loads_exactly_what_the_agents_returned(
    case: str, lazy: bool, open_store: Callable[..., DuckDBState]
) -> None:
    answers = CASES[case]()
    calls: list[int] = []
    first = _run(_enrich(open_store(), answers, calls), _rows(N, lazy))
    assert first.equals(answers, check_metadata=True)
    calls.clear()

    again = _run(_enrich(open_store(), answers, calls), _rows(N, lazy))

    assert calls == []
    assert again.schema.equals(first.schema, check_metadata=True), again.schema
    assert again.equals(first, check_metadata=True)
    assert open_store().to_arrow().equals(first, check_metadata=True)


@pytest.mark.parametrize("lazy", [False, True], ids=["table", "reader"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_partial_rerun_mixes_loaded_and_new_rows_exactly(
    case: str, lazy: bool, open_store: Callable[..., DuckDBState]
) -> None:
    answers = CASES[case]()
    calls: list[int] = []
    _run(_enrich(open_store(), answers, calls), _rows(6, lazy))
    calls.clear()

    result = _run(_enrich(open_store(), answers, calls), _rows(N, lazy))

    assert sum(calls) == N - 6  # stream 2 holds 2 loaded and 2 new rows
    assert result.equals(answers, check_metadata=True)
    assert open_store().to_arrow().equals(answers, check_metadata=True)


def test_a_column_the_first_rows_lack_comes_back_null_in_them(
    open_store: Callable[..., DuckDBState],
) -> None:
    answers = _dense_union().append_column("half", _half_floats()["half"])
    calls: list[int] = []
    early = pa.table({"id": pa.array([0, 1, 2, 3, 4, 5, 8], pa.int64())})
    _run(_enrich(open_store(), answers.select(["id"]), calls), early)
    later = _run(_enrich(open_store(), answers, calls), _rows(N, lazy=False))
    assert later.column_names == answers.column_names
    assert later["half"].null_count == 7  # the loaded rows
    calls.clear()

    again = _run(_enrich(open_store(), answers, calls), _rows(N, lazy=True))

    assert calls == []
    assert again.equals(later, check_metadata=True)


@pytest.mark.parametrize("case", PARQUET_CASES)
def test_to_parquet_writes_the_names_and_types_the_agents_produced(
    case: str, tmp_path: Path, open_store: Callable[..., DuckDBState]
) -> None:
    answers = CASES[case]()
    _run(_enrich(open_store(), answers, []), _rows(N, lazy=False))
    target = tmp_path / "quick_fit.parquet"

    assert open_store().to_parquet(target) == answers.num_rows

    # What Parquet makes of the agents' own table (it names list items "element").
    pq.write_table(answers, tmp_path / "answers.parquet")
    expected = pq.read_table(tmp_path / "answers.parquet")
    written = pq.read_table(target)
    assert written.schema.equals(expected.schema, check_metadata=True), written.schema
    assert written.equals(expected, check_metadata=True)


def test_sql_sees_ordinary_columns_under_their_own_names(
    tmp_path: Path, open_store: Callable[..., DuckDBState]
) -> None:
    answers = _case_names().append_column("rowid", pa.array(range(N)))
    answers = answers.append_column("seconds", pa.array(range(N), pa.duration("s")))
    _run(_enrich(open_store(), answers, []), _rows(N, lazy=False))

    with duckdb.connect(str(tmp_path / "state.duckdb"), read_only=True) as con:
        described = con.sql("DESCRIBE SELECT * FROM quick_fit").fetchall()
        scores = con.sql('SELECT "Score", seconds FROM quick_fit ORDER BY id').fetchall()

    names = [row[0] for row in described]
    # Each column that DuckDB holds as it is keeps its name; the others get one of their own.
    assert names[:2] == ["id", "Score"]
    assert {"score_1", "seconds"} <= set(names)
    assert not {"rowid", "score"} & set(names)
    assert len({name.lower() for name in names}) == len(answers.column_names)
    assert scores == [(i, i) for i in range(N)]


def test_a_key_named_rowid_round_trips(open_store: Callable[..., DuckDBState]) -> None:
    answers = pa.table(
        {"rowid": pa.array([f"k{i}" for i in range(N)]), "n": pa.array(range(N))},
        metadata={"a": "b"},
    )
    calls: list[int] = []

    def build() -> type[af.Agent]:
        store = open_store(key="rowid")

        @af.intelligent_streaming(stream_size=STREAM, over="rows", state=store)
        class ByRowid(af.Agent):
            def call(self, context: Any) -> dict[str, pa.Table]:
                keys = context["rows"]["rowid"]
                calls.append(len(keys))
                return {"rows": answers.filter(pc.is_in(answers["rowid"], value_set=keys))}

        return ByRowid

    first = _run(build(), answers.select(["rowid"]))
    calls.clear()
    again = _run(build(), answers.select(["rowid"]))

    assert calls == []
    assert again.equals(first, check_metadata=True)
    assert again.equals(answers, check_metadata=True)


def test_a_database_without_per_fingerprint_schemas_is_still_read(
    tmp_path: Path, open_store: Callable[..., DuckDBState]
) -> None:
    # As written before arrowflow kept a schema per fingerprint and physical names.
    answers = _with({"score": pa.array(range(N)), "tier": pa.array(["a"] * N)})
    calls: list[int] = []
    first = _run(_enrich(open_store(), answers, calls), _rows(N, lazy=False))
    with duckdb.connect(str(tmp_path / "state.duckdb")) as con:
        con.execute("DROP TABLE arrowflow.result_schemas")
        plain = bytes(answers.schema.remove_metadata().serialize().to_pybytes())
        con.execute("UPDATE arrowflow.result_tables SET arrow_schema = ?", [plain])
    calls.clear()

    again = _run(_enrich(open_store(), answers, calls), _rows(N + 2, lazy=False))

    assert calls == [2]  # ids 10 and 11, which the agent answers with no row
    assert again.equals(first)
    assert open_store().to_arrow().equals(first)


# -- a version bump recomputes everything --------------------------------------------------------


def _scored(kind: str) -> pa.Table:
    """What the agents of one version return: ``id``, ``score`` of ``kind`` and maybe ``tier``."""
    scores = {
        "int": pa.array(range(N), pa.int64()),
        "string": pa.array([f"{i} points" for i in range(N)]),
        "duration": pa.array(range(N), pa.duration("s")),
    }
    columns = {"score": scores[kind.removesuffix("+tier")]}
    if kind.endswith("+tier"):
        columns["tier"] = pa.array(["big" if i % 2 else "small" for i in range(N)])
    return _with(columns)


def test_a_version_bump_drops_the_columns_the_new_agents_no_longer_return(
    open_store: Callable[..., DuckDBState],
) -> None:
    calls: list[int] = []
    _run(_enrich(open_store(), _scored("int+tier"), calls), _rows(N, lazy=False))
    calls.clear()

    bumped = _run(_enrich(open_store(version=2), _scored("int"), calls), _rows(N, lazy=False))

    assert sum(calls) == N
    assert bumped.column_names == ["id", "score"]
    assert bumped.equals(_scored("int"), check_metadata=True)
    calls.clear()
    again = _run(_enrich(open_store(version=2), _scored("int"), calls), _rows(N, lazy=False))
    assert calls == []
    assert again.equals(bumped, check_metadata=True)
    lazy = _run(_enrich(open_store(version=2), _scored("int"), calls), _rows(N, lazy=True))
    assert calls == []
    assert lazy.equals(bumped, check_metadata=True)
    assert open_store().to_arrow().select(["id", "score"]).equals(bumped)


@pytest.mark.parametrize("new", ["string", "duration"])
def test_a_version_bump_may_change_a_column_type(
    new: str, open_store: Callable[..., DuckDBState]
) -> None:
    calls: list[int] = []
    _run(_enrich(open_store(), _scored("int+tier"), calls), _rows(N, lazy=False))
    calls.clear()

    bumped = _run(_enrich(open_store(version=2), _scored(new), calls), _rows(N, lazy=False))

    assert sum(calls) == N
    assert bumped.equals(_scored(new), check_metadata=True)
    calls.clear()
    again = _run(_enrich(open_store(version=2), _scored(new), calls), _rows(N, lazy=True))
    assert calls == []
    assert again.equals(bumped, check_metadata=True)
    assert open_store().to_arrow().select(["id", "score"]).equals(bumped)


def test_rows_of_an_older_version_that_lost_a_column_are_recomputed_not_loaded(
    open_store: Callable[..., DuckDBState],
) -> None:
    calls: list[int] = []
    _run(_enrich(open_store(), _scored("int+tier"), calls), _rows(N, lazy=False))
    # Version 2 stores strings in "score" for the first 6 rows only: the 4 others lose their
    # version-1 values, so they must not count as done under version 1 any more.
    _run(_enrich(open_store(version=2), _scored("string"), calls), _rows(6, lazy=False))
    calls.clear()

    back = _run(_enrich(open_store(), _scored("int+tier"), calls), _rows(N, lazy=False))

    assert sum(calls) == N
    assert back.equals(_scored("int+tier"), check_metadata=True)
    calls.clear()
    again = _run(_enrich(open_store(), _scored("int+tier"), calls), _rows(N, lazy=True))
    assert calls == []
    assert again.equals(back, check_metadata=True)


def test_a_type_change_within_one_version_is_a_clear_error(
    open_store: Callable[..., DuckDBState],
) -> None:
    _run(_enrich(open_store(), _scored("int"), []), _rows(6, lazy=False))

    # New ids only: nothing loaded, the new type reaches the store.
    with pytest.raises(
        af.ExecutionError, match=r"column 'score' is int64.*bump the store's version="
    ):
        _run(_enrich(open_store(), _scored("string"), []), _rows(N, lazy=False, start=6))

    stored = open_store().to_arrow()
    assert stored.equals(_scored("int").slice(0, 6))


# -- what cannot be stored is refused, never changed ----------------------------------------------


def test_two_columns_of_one_name_are_refused_by_name(
    open_store: Callable[..., DuckDBState],
) -> None:
    columns = [_ids(), pa.array(range(N)), pa.array(["a"] * N)]
    twice = pa.Table.from_arrays(columns, ["id", "x", "x"])

    with pytest.raises(af.ExecutionError, match="several columns named 'x'"):
        _run(_enrich(open_store(), twice, []), _rows(N, lazy=False))


def test_a_column_of_nulls_added_by_a_later_stream_round_trips(tmp_path: Path) -> None:
    """An all-null column (Arrow's ``null`` type) that appears after the table exists is added
    to it as DuckDB's NULL type, and comes back as ``null``."""
    store = DuckDBState(tmp_path / "state.duckdb", table="t")

    @af.intelligent_streaming(stream_size=2, over="rows", state=store)
    class Late(af.Agent):
        def call(self, context: Any) -> dict[str, pa.Table]:
            rows = context["rows"]
            if context["_batch_metadata"]["batch_number"] == 2:
                rows = rows.append_column("w", pa.nulls(rows.num_rows))
            return {"rows": rows}

    rows = pa.table({"id": pa.array(range(4), pa.int64())})
    first = af.Flow(Late).run(rows=rows)["rows"]
    again = af.Flow(Late).run(rows=rows)
    assert again.stats[0]["loaded_items"] == 4
    assert again["rows"].equals(first)
    assert first.schema.field("w").type == pa.null()
