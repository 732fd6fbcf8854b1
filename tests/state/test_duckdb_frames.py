"""State stores over polars and pandas frames: view-typed and dictionary-encoded columns and keys.

Keys are compared by value: a ``Categorical`` key whose categories come in another order (or
with other codes) in the next run still finds its stored rows, and every rerun returns exactly
what an uninterrupted run over the same frame returns, schema and dictionaries included. The
tests run against ``DuckDBState`` and ``MemoryState`` (``every_store``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from state_helpers import Build, MakeStore, called_keys, every_store, run

import arrowflow as af

pytestmark = every_store

SECTORS = ["software", "retail", "energy"]


def _records(n: int) -> dict[str, list[Any]]:
    return {
        "id": [f"c-{i:04d}" for i in range(n)],
        "name": [f"company {i}" for i in range(n)],
        "employees": [(i * 7) % 100 for i in range(n)],
        "sector": [SECTORS[i % 3] for i in range(n)],
    }


def _polars(key: Any) -> Callable[[int], pl.DataFrame]:
    def build(n: int) -> pl.DataFrame:
        return pl.DataFrame(
            _records(n), schema_overrides={"id": key, "sector": pl.Categorical}
        ).with_columns(pl.concat_list("sector", "name").alias("tags"))

    return build


def _pandas(key: str) -> Callable[[int], pd.DataFrame]:
    def build(n: int) -> pd.DataFrame:
        frame = pd.DataFrame(_records(n))
        if key == "categorical":
            # Categories in an order of their own, not the rows' order.
            frame["id"] = pd.Categorical(frame["id"], categories=sorted(frame["id"])[::-1])
        else:
            frame["id"] = frame["id"].astype(pd.ArrowDtype(pa.string_view()))
        frame["name"] = frame["name"].astype(pd.ArrowDtype(pa.string_view()))
        frame["sector"] = pd.Categorical(frame["sector"], categories=SECTORS)
        return frame

    return build


FRAMES: dict[str, Callable[[int], Any]] = {
    "polars_string_key": _polars(pl.String),
    "polars_categorical_key": _polars(pl.Categorical),
    "pandas_string_view_key": _pandas("string_view"),
    "pandas_categorical_key": _pandas("categorical"),
}


def _uninterrupted(make_store: MakeStore, scoring_agent: Build, frame: Any, **options: Any) -> Any:
    """What one run over ``frame`` on a fresh store returns."""
    return run(scoring_agent(make_store(), 40, **options), companies=frame)["companies"]


@pytest.mark.parametrize("source", list(FRAMES))
def test_a_rerun_over_the_same_frame_returns_the_same_table(
    state_path: str,
    source: str,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
) -> None:
    frame = FRAMES[source](100)
    store = make_store(state_path)

    first = run(scoring_agent(store, 40), companies=frame)["companies"]
    calls.clear()
    again = run(scoring_agent(store, 40), companies=frame)

    assert calls == []
    assert again.stats[0]["skipped_items"] == 100
    assert again["companies"].schema == first.schema
    assert again["companies"].equals(first)
    assert first["id"].to_pylist() == _records(100)["id"]


@pytest.mark.parametrize("source", list(FRAMES))
def test_a_superset_resumes_to_the_uninterrupted_result(
    state_path: str,
    source: str,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
) -> None:
    # 300 categories need wider codes than 100 do (pandas: int16 instead of int8).
    store = make_store(state_path)
    run(scoring_agent(store, 40), companies=FRAMES[source](100))
    calls.clear()
    superset = FRAMES[source](300)

    result = run(scoring_agent(store, 40), companies=superset)

    assert called_keys(calls) == _records(300)["id"][100:]
    assert result["companies"].equals(_uninterrupted(make_store, scoring_agent, superset))
    stored = store.to_arrow()
    assert stored["id"].to_pylist() == _records(300)["id"]
    assert stored.schema == result["companies"].schema  # codes widened as the input's were


@pytest.mark.parametrize("source", list(FRAMES))
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(
    state_path: str,
    source: str,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
) -> None:
    frame = FRAMES[source](150)
    store = make_store(state_path)
    with pytest.raises(af.BatchExecutionError):
        run(scoring_agent(store, 40, fail_streams=(3,)), companies=frame)
    calls.clear()

    result = run(scoring_agent(store, 40), companies=frame)

    assert called_keys(calls) == _records(150)["id"][80:]
    assert result["companies"].equals(_uninterrupted(make_store, scoring_agent, frame))


@pytest.mark.parametrize("source", list(FRAMES))
def test_a_lazy_reader_of_a_frame_resumes(
    source: str,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
) -> None:
    store = make_store()
    run(scoring_agent(store, 40), companies=FRAMES[source](100))
    calls.clear()
    superset = FRAMES[source](200)

    result = run(scoring_agent(store, 40), companies=pa.RecordBatchReader.from_stream(superset))

    assert called_keys(calls) == _records(200)["id"][100:]
    expected = _uninterrupted(make_store, scoring_agent, superset)
    assert result["companies"].to_pylist() == expected.to_pylist()
    assert result["companies"].schema == expected.schema


def test_categorical_keys_match_by_value_whatever_the_category_order(
    state_path: str,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
) -> None:
    frame = _pandas("categorical")(100)
    reordered = frame.copy()
    categories = ["c-9999", *sorted(frame["id"].astype(str))]  # another order, one unused
    reordered["id"] = pd.Categorical(frame["id"].astype(str), categories=categories)
    store = make_store(state_path)

    first = run(scoring_agent(store, 40), companies=frame)["companies"]
    calls.clear()
    again = run(scoring_agent(store, 40), companies=reordered)["companies"]

    assert calls == []
    assert again.to_pylist() == first.to_pylist()
    assert again.equals(_uninterrupted(make_store, scoring_agent, reordered))


def test_view_and_dictionary_columns_are_stored_with_their_types(
    make_store: MakeStore, scoring_agent: Build
) -> None:
    store = make_store()
    result = run(scoring_agent(store, 40), companies=_polars(pl.Categorical)(100))["companies"]

    stored = store.to_arrow()

    assert stored.schema == result.schema
    assert stored.schema.field("id").type == pa.dictionary(pa.uint32(), pa.large_string())
    assert stored.schema.field("name").type == pa.large_string()
    assert stored.schema.field("tags").type == pa.large_list(pa.large_string())
    assert stored.to_pylist() == result.to_pylist()


def test_duplicate_categorical_keys_are_refused_by_value(
    make_store: MakeStore, scoring_agent: Build, calls: list[list[Any]]
) -> None:
    # The same value under two codes: a dictionary that repeats a value.
    keys = pa.DictionaryArray.from_arrays(pa.array([0, 1, 2], pa.int8()), ["a", "b", "a"])
    companies = pa.table({"id": keys, "employees": [1, 2, 3]})

    with pytest.raises(af.ExecutionError, match="duplicate"):
        run(scoring_agent(make_store(), 40), companies=companies)
    assert calls == []


@pytest.mark.parametrize("source", FRAMES)
def test_a_superset_resumes_when_the_agents_filter_rows(
    source: str,
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
) -> None:
    store = make_store()
    run(scoring_agent(store, 40, min_employees=30), companies=FRAMES[source](100))
    calls.clear()
    superset = FRAMES[source](200)

    result = run(scoring_agent(store, 40, min_employees=30), companies=superset)

    assert called_keys(calls) == _records(200)["id"][100:]
    expected = _uninterrupted(make_store, scoring_agent, superset, min_employees=30)
    assert result["companies"].equals(expected)
