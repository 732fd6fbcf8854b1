"""Keys mean what Arrow means: a key type Arrow and DuckDB would compare apart is refused."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from state_helpers import reader_of, run

import arrowflow as af
from arrowflow.state import DuckDBState
from arrowflow.state._keys import key_column

WHERE = "State table 'scores' (state.duckdb), field 'rows'"


def scoring(store: DuckDBState, calls: list[int]) -> type[af.Agent]:
    @af.intelligent_streaming(stream_size=2, over="rows", state=store)
    class Score(af.Agent):
        def call(self, context: Any) -> dict[str, pa.Table]:
            rows = context["rows"]
            calls.append(rows.num_rows)
            return {"rows": rows.append_column("score", pc.multiply(rows["n"], 10))}

    return Score


def refused_run(tmp_path: Path, ids: pa.Array, *, lazy: bool) -> str:
    """Run a scope keyed on ``ids``; check no agent ran, and return the refusal's message."""
    rows = pa.table({"id": ids, "n": pa.array(range(len(ids)))})
    calls: list[int] = []
    store = DuckDBState(tmp_path / "state.duckdb", table="scores", key="id")
    with store, pytest.raises(af.ExecutionError) as info:
        run(scoring(store, calls), rows=reader_of(rows, 2) if lazy else rows)
    assert calls == []
    # A lazy input's keys may be refused by its first stream, before the agents run.
    error = getattr(info.value, "original_error", info.value)
    assert isinstance(error, af.ExecutionError)
    message = str(error)
    assert "'scores'" in message
    assert "field 'rows'" in message
    assert "key column 'id'" in message
    return message


@pytest.mark.parametrize("lazy", [False, True], ids=["table", "reader"])
@pytest.mark.parametrize(
    ("float_type", "shown"),
    [(pa.float64(), "double"), (pa.float32(), "float")],
    ids=["float64", "float32"],
)
def test_float_keys_are_refused_before_any_agent_runs(
    tmp_path: Path, float_type: pa.DataType, shown: str, lazy: bool
) -> None:
    # Two keys to Arrow, one to DuckDB.
    ids = pa.array([0.0, -0.0, 1.0, float("nan")], float_type)

    message = refused_run(tmp_path, ids, lazy=lazy)

    assert f"type {shown}" in message
    assert "floating-point" in message
    assert "int64 or string" in message
    assert "pandas" in message


def test_a_dictionary_of_floats_is_refused_by_its_values(tmp_path: Path) -> None:
    ids = pa.array([0.0, -0.0, 1.0, 2.0]).dictionary_encode()

    message = refused_run(tmp_path, ids, lazy=False)

    assert "dictionary<values=double" in message
    assert "floating-point" in message


STRUCTURED = {
    "struct": pa.array([{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}]),
    "list": pa.array([[1], [1, 2], [2]]),
    "large_list": pa.array([[1], [1, 2], [2]], pa.large_list(pa.int64())),
    "fixed_size_list": pa.array([[1, 1], [1, 2], [2, 1]], pa.list_(pa.int64(), 2)),
    "map": pa.array([[("a", 1)], [("a", 2)], [("b", 1)]], pa.map_(pa.string(), pa.int64())),
}


@pytest.mark.parametrize("kind", list(STRUCTURED))
def test_nested_keys_are_refused_before_any_agent_runs(tmp_path: Path, kind: str) -> None:
    message = refused_run(tmp_path, STRUCTURED[kind], lazy=False)

    assert f"type {STRUCTURED[kind].type}" in message
    assert "single value" in message


@pytest.mark.parametrize("kind", ["struct", "list"])
def test_nested_keys_of_a_reader_are_refused_before_any_agent_runs(
    tmp_path: Path, kind: str
) -> None:
    message = refused_run(tmp_path, STRUCTURED[kind], lazy=True)

    assert "single value" in message


@pytest.mark.parametrize(
    ("ids", "fragment"),
    [
        (pa.array([1, 2], pa.float16()), "floating-point"),
        (pa.array([None, None], pa.null()), "no values"),
        (pa.array([[1], [2]], pa.list_view(pa.int64())), "single value"),
        (pa.array([[1], [2]], pa.large_list_view(pa.int64())), "single value"),
        (
            pa.UnionArray.from_sparse(
                pa.array([0, 1], pa.int8()), [pa.array([1, 2]), pa.array(["a", "b"])]
            ),
            "single value",
        ),
        (pc.run_end_encode(pa.array([1, 1, 2])), "run_end_decode"),
        (pa.array([1, 2], pa.duration("ms")), "intervals"),
        (pa.array([pa.MonthDayNano([1, 0, 0])], pa.month_day_nano_interval()), "30 days"),
        (pa.array([Decimal(1)], pa.decimal256(40, 0)), "decimal128"),
        (pa.array([Decimal(1)], pa.decimal64(10, 0)), "decimal128"),
        (pa.array([b"0" * 16], pa.uuid()), "fixed_size_binary[16]"),
        (pa.array([1.5, 2.5], pa.float64()).dictionary_encode(), "dictionary key"),
    ],
    ids=lambda value: str(value.type) if isinstance(value, pa.Array) else None,
)
def test_key_types_arrow_and_duckdb_compare_apart_are_refused(ids: pa.Array, fragment: str) -> None:
    with pytest.raises(af.ExecutionError) as info:
        key_column(pa.table({"id": ids}), "id", WHERE)

    message = str(info.value)
    assert message.startswith(f"{WHERE}: key column 'id' has type {ids.type}")
    assert fragment in message


@pytest.mark.parametrize(
    "ids",
    [
        pa.array([True, False]),
        pa.array([1, 2], pa.int8()),
        pa.array([2**64 - 1, 2], pa.uint64()),
        pa.array(["a", "b"], pa.large_string()),
        pa.array(["a", "b"], pa.string_view()),
        pa.array([b"ab", b"cd"], pa.binary(2)),
        pa.array([1, 2], pa.date32()),
        pa.array([86_400_000, 2 * 86_400_000], pa.date64()),
        pa.array([1, 2], pa.time64("ns")),
        pa.array([1, 2], pa.timestamp("ns", "Europe/Paris")),
        pa.array([Decimal("1.5"), Decimal("2.5")], pa.decimal128(10, 2)),
        pa.array(["a", "b", "a"]).dictionary_encode(),
    ],
    ids=lambda value: str(value.type),
)
def test_plain_key_types_are_accepted(ids: pa.Array) -> None:
    table = pa.table({"id": ids})
    assert key_column(table, "id", WHERE).equals(table["id"])


def test_a_dictionary_of_strings_resumes_by_value(tmp_path: Path) -> None:
    names = pa.array(["b", "a", "c", "d"])
    calls: list[int] = []
    with DuckDBState(tmp_path / "state.duckdb", table="scores", key="id") as store:
        first = pa.table({"id": names.slice(0, 2).dictionary_encode(), "n": [1, 2]})
        run(scoring(store, calls), rows=first)
        calls.clear()
        again = pa.table({"id": names.dictionary_encode(), "n": [1, 2, 3, 4]})

        result = run(scoring(store, calls), rows=again)

    assert calls == [2]
    assert result["rows"]["score"].to_pylist() == [10, 20, 30, 40]
