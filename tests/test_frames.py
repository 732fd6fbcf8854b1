"""polars and pandas frames as inputs and outputs of a streaming scope (DESIGN §1, §4).

polars exports strings and binaries as Arrow view types, which Arrow's filter, take and sort
kernels and the Parquet writer refuse; pandas brings dictionary-encoded ``Categorical``
columns and several string dtypes. Each frame here is a real one, streamed through agents that
filter and take, merged and sunk to Parquet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import arrowflow as af
from arrowflow._row_counts import known_num_rows, reader_with_num_rows
from arrowflow._tabular import to_table_or_reader

SECTORS = ["software", "retail", "energy"]
VIEW_TYPES = ("string_view", "binary_view", "list_view")


def _records(n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"c-{i:04d}",
            "name": f"company {i}",
            "employees": (i * 7) % 100,
            "sector": SECTORS[i % 3],
        }
        for i in range(n)
    ]


def _polars(n: int) -> pl.DataFrame:
    records = _records(n)
    frame = pl.DataFrame(records, schema_overrides={"sector": pl.Categorical})
    return frame.with_columns(
        pl.col("id").cast(pl.Binary).alias("blob"),
        pl.concat_list(pl.col("sector").cast(pl.String), pl.col("name")).alias("tags"),
        pl.struct(city=pl.col("name"), size=pl.col("employees")).alias("address"),
    )


def _polars_records(n: int) -> list[dict[str, Any]]:
    return [
        {
            **row,
            "blob": row["id"].encode(),
            "tags": [row["sector"], row["name"]],
            "address": {"city": row["name"], "size": row["employees"]},
        }
        for row in _records(n)
    ]


def _pandas(strings: Any) -> Callable[[int], pd.DataFrame]:
    def build(n: int) -> pd.DataFrame:
        frame = pd.DataFrame(_records(n))
        frame["sector"] = pd.Categorical(frame["sector"], categories=SECTORS[::-1])
        frame["name"] = frame["name"].astype(strings)
        return frame

    return build


# source name -> (frame of n rows, the same rows as Python records)
SOURCES: dict[str, tuple[Callable[[int], Any], Callable[[int], list[dict[str, Any]]]]] = {
    "polars": (_polars, _polars_records),
    "polars_lazy_collect": (lambda n: _polars(n).lazy().collect(), _polars_records),
    "pandas_object": (_pandas(object), _records),
    "pandas_str": (_pandas(str), _records),
    "pandas_string_pyarrow": (_pandas("string[pyarrow]"), _records),
    "pandas_string_view": (_pandas(pd.ArrowDtype(pa.string_view())), _records),
}


def _has_view(data_type: pa.DataType) -> bool:
    return any(name in str(data_type) for name in VIEW_TYPES)


def _no_views(table: pa.Table) -> None:
    views = [f"{field.name}: {field.type}" for field in table.schema if _has_view(field.type)]
    assert views == []


def _scope(seen: list[int]) -> af.Flow:
    """Keep companies with 30 employees or more, then reverse each stream with ``take``."""

    @af.intelligent_streaming(5, over="companies")
    class Filter(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            rows = context["companies"]
            _no_views(rows)
            seen.append(rows.num_rows)
            return {"companies": rows.filter(pc.field("employees") >= 30)}

    class Reverse(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            rows = context["companies"]
            order = pa.array(range(rows.num_rows - 1, -1, -1), pa.int64())
            return {"companies": rows.take(order)}

    return Filter >> Reverse


def _expected(records: list[dict[str, Any]], size: int = 5) -> list[dict[str, Any]]:
    expected: list[dict[str, Any]] = []
    for start in range(0, len(records), size):
        kept = [row for row in records[start : start + size] if row["employees"] >= 30]
        expected.extend(reversed(kept))
    return expected


@pytest.mark.parametrize("source", list(SOURCES))
def test_frames_stream_through_filter_and_take(source: str) -> None:
    frame, records = SOURCES[source]
    seen: list[int] = []

    result = _scope(seen).run(companies=frame(23))

    assert seen == [5, 5, 5, 5, 3]
    out = result["companies"]
    assert isinstance(out, pa.Table)
    _no_views(out)
    assert out.to_pylist() == _expected(records(23))
    assert pa.types.is_dictionary(out.schema.field("sector").type)


@pytest.mark.parametrize("source", list(SOURCES))
def test_frames_sink_to_parquet(tmp_path: Path, source: str) -> None:
    frame, records = SOURCES[source]
    path = tmp_path / "out.parquet"

    result = _scope([]).run(companies=frame(23), sink=path)

    expected = _expected(records(23))
    assert result["companies"].read_all().to_pylist() == expected
    assert pq.read_table(path).to_pylist() == expected


def test_polars_schema_is_normalised_recursively() -> None:
    result = _scope([]).run(companies=_polars(23))

    schema = result["companies"].schema
    assert schema.field("id").type == pa.large_string()
    assert schema.field("blob").type == pa.large_binary()
    assert schema.field("tags").type == pa.large_list(pa.large_string())
    assert schema.field("address").type == pa.struct(
        [("city", pa.large_string()), ("size", pa.int64())]
    )
    assert schema.field("sector").type == pa.dictionary(pa.uint32(), pa.large_string())


def _identity(size: int, seen: list[pa.Table]) -> af.Flow:
    @af.intelligent_streaming(size, over="rows")
    class Look(af.Agent):
        def call(self, context: Any) -> None:
            seen.append(context["rows"])

    return af.Flow(Look)


def test_nested_views_become_large_types() -> None:
    rows = pa.table(
        {
            "lists": pa.array([[1], [2, 3], []], pa.list_view(pa.int64())),
            "large_lists": pa.array([["a"], [], ["b"]], pa.large_list_view(pa.string_view())),
            "map": pa.array(
                [[("k", b"v")], [], [("x", b"y")]], pa.map_(pa.string_view(), pa.binary_view())
            ),
            "fixed": pa.array([["a", "b"]] * 3, pa.list_(pa.string_view(), 2)),
            "codes": pa.array(["a", "b", "a"], pa.string_view()).dictionary_encode(),
        }
    )
    seen: list[pa.Table] = []

    result = _identity(2, seen).run(rows=rows)

    expected = pa.schema(
        {
            "lists": pa.large_list(pa.int64()),
            "large_lists": pa.large_list(pa.large_string()),
            "map": pa.map_(pa.large_string(), pa.large_binary()),
            "fixed": pa.list_(pa.large_string(), 2),
            "codes": pa.dictionary(pa.int32(), pa.large_string()),
        }
    )
    assert [piece.schema for piece in seen] == [expected, expected]
    assert result["rows"].schema == expected
    assert result["rows"].to_pylist() == rows.to_pylist()


def test_table_without_views_is_used_as_is() -> None:
    rows = pa.table({"n": pa.array(range(6), pa.int64()), "s": [str(i) for i in range(6)]})
    seen: list[pa.Table] = []

    result = _identity(6, seen).run(rows=rows)

    assert seen[0].equals(rows)
    assert seen[0]["s"].chunks[0].buffers()[2].address == rows["s"].chunks[0].buffers()[2].address
    assert result["rows"].equals(rows)


def test_only_view_columns_are_copied() -> None:
    numbers = pa.array(range(6), pa.int64())
    rows = pa.table({"n": numbers, "s": pa.array([str(i) for i in range(6)], pa.string_view())})
    seen: list[pa.Table] = []

    _identity(6, seen).run(rows=rows)

    assert seen[0]["n"].chunks[0].buffers()[1].address == numbers.buffers()[1].address
    assert seen[0]["s"].type == pa.large_string()


def test_reader_of_a_polars_frame_streams() -> None:
    frame = _polars(24).select("id", "name", "employees")
    reader = pa.RecordBatchReader.from_stream(frame)
    assert reader.schema.field("id").type == pa.string_view()
    seen: list[int] = []
    result = _scope(seen).run(companies=reader)

    assert seen == [5, 5, 5, 5, 4]
    assert result["companies"].to_pylist() == [
        {key: row[key] for key in ("id", "name", "employees")} for row in _expected(_records(24))
    ]


def test_reader_with_views_is_pulled_stream_by_stream() -> None:
    batches = pa.table(_polars(40).select("id", "employees")).to_batches(max_chunksize=4)
    pulled: list[int] = []

    def pull() -> Iterator[pa.RecordBatch]:
        for batch in batches:
            pulled.append(batch.num_rows)
            yield batch

    seen: list[int] = []

    @af.intelligent_streaming(4, over="rows")
    class Look(af.Agent):
        def call(self, context: Any) -> None:
            rows = context["rows"]
            assert rows["id"].type == pa.large_string()
            seen.append(len(pulled))

    af.Flow(Look).run(rows=pa.RecordBatchReader.from_batches(batches[0].schema, pull()))

    assert seen[0] < len(batches)
    assert len(pulled) == len(batches)


# -- frames returned by agents: merged, then sunk --------------------------------------------


def _label_polars(rows: pa.Table) -> Any:
    # A Categorical built per stream: each stream's dictionary is its own.
    frame = pl.from_arrow(rows)
    assert isinstance(frame, pl.DataFrame)
    return frame.with_columns(pl.col("name").cast(pl.Categorical).alias("label"))


def _label_pandas(rows: pa.Table) -> Any:
    frame = rows.to_pandas()
    frame["label"] = pd.Categorical(frame["name"], categories=sorted(frame["name"])[::-1])
    return frame


@pytest.mark.parametrize("label", [_label_polars, _label_pandas], ids=["polars", "pandas"])
def test_agents_returning_frames_with_categoricals_merge_and_sink(
    tmp_path: Path, label: Callable[[pa.Table], Any]
) -> None:
    @af.intelligent_streaming(5, over="companies")
    class Label(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            return {"companies": label(context["companies"])}

    class Keep(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            rows = context["companies"]
            return {"companies": rows.filter(pc.field("employees") >= 30)}

    flow = Label >> Keep
    path = tmp_path / "out.parquet"
    columns = ["id", "name", "employees", "label"]
    expected = [
        {"id": row["id"], "name": row["name"], "employees": row["employees"], "label": row["name"]}
        for row in _records(23)
        if row["employees"] >= 30
    ]

    merged = flow.run(companies=_polars(23).select("id", "name", "employees"))
    sunk = flow.run(companies=_polars(23).select("id", "name", "employees"), sink=path)

    out = merged["companies"]
    _no_views(out)
    assert pa.types.is_dictionary(out.schema.field("label").type)
    assert out.select(columns).to_pylist() == expected
    rows = out.select(columns).to_pylist()
    assert pq.read_table(path, columns=columns).to_pylist() == rows
    assert sunk["companies"].read_all().select(columns).to_pylist() == rows


def test_a_table_with_views_returned_by_an_agent_is_normalised() -> None:
    @af.intelligent_streaming(5, over="companies")
    class ViaPolars(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            frame = pl.from_arrow(context["companies"])
            assert isinstance(frame, pl.DataFrame)
            return {"companies": pa.table(frame)}  # string_view columns again

    class Keep(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            rows = context["companies"]
            return {"companies": rows.filter(pc.field("employees") >= 30)}

    result = (ViaPolars >> Keep).run(companies=_polars(23).select("id", "employees"))

    _no_views(result["companies"])
    assert result["companies"]["id"].to_pylist() == [
        row["id"] for row in _records(23) if row["employees"] >= 30
    ]


def test_a_reader_normalised_at_the_boundary_keeps_its_row_count() -> None:
    batch = pa.record_batch({"s": pa.array(["a", "b", "c"], pa.string_view())})
    reader = reader_with_num_rows(batch.schema, [batch, batch], 6)

    normalised = to_table_or_reader(reader)

    assert normalised is not reader
    assert normalised.schema.field("s").type == pa.large_string()
    assert known_num_rows(normalised) == 6
