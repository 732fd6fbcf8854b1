"""The vectorised state callables without a store: keyword options and agent methods (§5).

``DictState`` keeps results in a Python dict — fine for a test, never for the library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import arrowflow as af


class DictState:
    """Done keys and result rows in dicts; ``load_existing`` answers in reverse key order."""

    def __init__(self, key: str = "id", field: str = "companies") -> None:
        self.key = key
        self.field = field
        self.done: set[Any] = set()
        self.rows: dict[Any, list[dict[str, Any]]] = {}
        self.schema: pa.Schema | None = None
        self.persisted: list[tuple[list[Any], list[Any]]] = []

    def skip_if(self, batch: pa.Table, context: Any) -> np.ndarray[Any, Any]:
        return np.array([key in self.done for key in batch[self.key].to_pylist()], dtype=bool)

    def load_existing(self, skipped: pa.Table, context: Any) -> pa.Table:
        keys = sorted(skipped[self.key].to_pylist(), reverse=True)
        rows = [row for key in keys for row in self.rows.get(key, [])]
        return pa.Table.from_pylist(rows, schema=self.schema)

    def persist_each_stream(self, results: pa.Table, context: Any) -> None:
        inputs = context[self.field][self.key].to_pylist()
        self.persisted.append((inputs, results[self.key].to_pylist()))
        self.schema = results.schema
        for key in inputs:
            self.rows.pop(key, None)
        for row in results.to_pylist():
            self.rows.setdefault(row[self.key], []).append(row)
        self.done.update(inputs)


def shuffled_companies(n: int) -> pa.Table:
    ids = [(i * 37) % n for i in range(n)]
    return pa.table({"id": ids, "employees": [(i * 7) % 100 for i in ids]})


def score(rows: pa.Table) -> pa.Table:
    kept = rows.filter(pc.field("employees") >= 20)
    return kept.append_column("score", pc.multiply(kept["employees"], 2))


@pytest.fixture
def seen() -> list[list[Any]]:
    return []


def keyword_agent(state: DictState, seen: list[list[Any]], **options: Any) -> type[af.Agent]:
    @af.intelligent_streaming(
        stream_size=10,
        over="companies",
        skip_if=state.skip_if,
        load_existing=state.load_existing,
        persist_each_stream=state.persist_each_stream,
        **options,
    )
    class Score(af.Agent):
        def call(self, context: Any) -> dict[str, pa.Table]:
            seen.append(context["companies"]["id"].to_pylist())
            return {"companies": score(context["companies"])}

    return Score


def method_agent(state: DictState, seen: list[list[Any]], **options: Any) -> type[af.Agent]:
    @af.intelligent_streaming(stream_size=10, over="companies", **options)
    class Score(af.Agent):
        def call(self, context: Any) -> dict[str, pa.Table]:
            seen.append(context["companies"]["id"].to_pylist())
            return {"companies": score(context["companies"])}

        def skip_if(self, batch: pa.Table, context: Any) -> Any:
            return state.skip_if(batch, context)

        def load_existing(self, skipped: pa.Table, context: Any) -> pa.Table:
            return state.load_existing(skipped, context)

        def persist_each_stream(self, results: pa.Table, context: Any) -> None:
            state.persist_each_stream(results, context)

    return Score


Builder = Callable[..., type[af.Agent]]


@pytest.mark.parametrize("build", [keyword_agent, method_agent], ids=["keywords", "methods"])
def test_with_a_key_loaded_and_processed_rows_come_back_in_input_order(
    build: Builder, seen: list[list[Any]]
) -> None:
    companies = shuffled_companies(60)
    state = DictState()
    before = companies.filter(pc.less(companies["id"], 40))
    af.Flow(build(state, seen, key="id")).run(companies=before)
    seen.clear()

    result = af.Flow(build(state, seen, key="id")).run(companies=companies)["companies"]

    assert sorted(key for call in seen for key in call) == list(range(40, 60))
    assert result.equals(score(companies))
    assert result["id"].to_pylist() == score(companies)["id"].to_pylist()


@pytest.mark.parametrize("build", [keyword_agent, method_agent], ids=["keywords", "methods"])
def test_without_a_key_loaded_rows_come_first(build: Builder, seen: list[list[Any]]) -> None:
    companies = pa.table({"id": [1, 2, 3, 4], "employees": [30, 40, 50, 60]})
    state = DictState()
    af.Flow(build(state, seen)).run(companies=companies.take([1, 3]))
    seen.clear()

    result = af.Flow(build(state, seen)).run(companies=companies)["companies"]

    assert seen == [[1, 3]]
    assert result["id"].to_pylist() == [4, 2, 1, 3]


def test_persist_gets_the_processed_rows_only_and_their_inputs(seen: list[list[Any]]) -> None:
    companies = shuffled_companies(30)
    state = DictState()
    state.done.update(range(10))
    af.Flow(keyword_agent(state, seen, key="id")).run(companies=companies)

    for inputs, stored in state.persisted:
        assert not set(inputs) & set(range(10))
        assert set(stored) <= set(inputs)
    processed = [key for inputs, _ in state.persisted for key in inputs]
    assert sorted(processed) == list(range(10, 30))


def test_skipped_rows_without_load_existing_are_absent(seen: list[list[Any]]) -> None:
    companies = shuffled_companies(20)
    state = DictState()
    state.done.update(range(5))

    @af.intelligent_streaming(stream_size=10, over="companies", key="id", skip_if=state.skip_if)
    class Score(af.Agent):
        def call(self, context: Any) -> dict[str, pa.Table]:
            return {"companies": context["companies"]}

    result = af.Flow(Score).run(companies=companies)["companies"]

    assert result["id"].to_pylist() == [i for i in companies["id"].to_pylist() if i >= 5]


def test_rows_whose_key_is_not_in_the_input_come_after_the_keyed_rows() -> None:
    state = DictState()
    state.done.update([2])
    state.rows[2] = [{"id": 2, "employees": 1}]
    state.schema = pa.schema([("id", pa.int64()), ("employees", pa.int64())])

    @af.intelligent_streaming(
        stream_size=10,
        over="companies",
        key="id",
        skip_if=state.skip_if,
        load_existing=state.load_existing,
    )
    class Expand(af.Agent):
        def call(self, context: Any) -> dict[str, pa.Table]:
            rows = context["companies"]
            extra = pa.table({"id": [99], "employees": [0]})
            return {"companies": pa.concat_tables([extra, rows])}

    companies = pa.table({"id": [3, 2, 1], "employees": [3, 2, 1]})
    result = af.Flow(Expand).run(companies=companies)["companies"]

    assert result["id"].to_pylist() == [3, 2, 1, 99]


@pytest.mark.parametrize("form", ["array", "chunked"])
def test_a_null_in_the_skip_mask_means_keep(form: str) -> None:
    companies = pa.table({"id": [0, 1, 2, 3, 4, 5], "employees": [50] * 6})
    flags = [True, None, False, None, True, False]
    mask: Any = {
        "array": pa.array(flags, pa.bool_()),
        "chunked": pa.chunked_array([flags[:3], flags[3:]], pa.bool_()),
    }[form]
    processed: list[list[Any]] = []
    skipped: list[list[Any]] = []

    def load_existing(rows: pa.Table, context: Any) -> pa.Table:
        skipped.append(rows["id"].to_pylist())
        return rows.slice(0, 0)

    @af.intelligent_streaming(
        stream_size=10,
        over="companies",
        key="id",
        skip_if=lambda batch, context: mask,
        load_existing=load_existing,
    )
    class Record(af.Agent):
        def call(self, context: Any) -> None:
            processed.append(context["companies"]["id"].to_pylist())

    result = af.Flow(Record).run(companies=companies)

    assert processed == [[1, 2, 3, 5]]
    assert skipped == [[0, 4]]
    assert result["companies"]["id"].to_pylist() == [1, 2, 3, 5]
    assert result.stats[0]["skipped_items"] == 2


class RecordingState(DictState):
    """A ``DictState`` that keeps the tables ``persist_each_stream`` and ``load_existing`` saw."""

    def __init__(self) -> None:
        super().__init__()
        self.persisted_tables: list[tuple[pa.Table, pa.Table]] = []
        self.loaded_keys: list[list[Any]] = []

    def load_existing(self, skipped: pa.Table, context: Any) -> pa.Table:
        loaded = super().load_existing(skipped, context)
        self.loaded_keys.append(loaded[self.key].to_pylist())
        return loaded

    def persist_each_stream(self, results: pa.Table, context: Any) -> None:
        self.persisted_tables.append((results, context[self.field]))
        super().persist_each_stream(results, context)


@pytest.mark.parametrize("key", ["id", None], ids=["key", "no_key"])
@pytest.mark.parametrize("build", [keyword_agent, method_agent], ids=["keywords", "methods"])
def test_persist_never_receives_the_loaded_rows(
    build: Builder, key: str | None, seen: list[list[Any]]
) -> None:
    companies = shuffled_companies(30)
    state = RecordingState()
    done_before = pc.less(companies["id"], 20)
    af.Flow(build(state, seen, key=key)).run(companies=companies.filter(done_before))
    state.persisted_tables.clear()

    result = af.Flow(build(state, seen, key=key)).run(companies=companies)

    loaded = [keys for keys in state.loaded_keys if keys]
    assert len(loaded) == 3, "every stream of the rerun loads rows"
    new_rows = companies.filter(pc.invert(done_before))
    assert len(state.persisted_tables) == 3
    for results, inputs in state.persisted_tables:
        assert set(inputs["id"].to_pylist()) <= set(range(20, 30))
        assert results.equals(score(inputs))
    persisted = pa.concat_tables([results for results, _ in state.persisted_tables])
    assert persisted.equals(score(new_rows))
    assert sorted(result["companies"]["id"].to_pylist()) == sorted(
        score(companies)["id"].to_pylist()
    )
