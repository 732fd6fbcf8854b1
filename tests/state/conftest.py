"""Fixtures of the state store tests: stores closed after each test, a recording agent.

A test that asks for ``make_store`` runs once per store kind its ``stores`` mark names (see
``state_helpers.every_store`` and ``duckdb_only``; unmarked: DuckDB only). ``state_path`` goes
with the DuckDB store only: a test that takes it runs on ``":memory:"`` and on a file with
``DuckDBState``, once with ``MemoryState``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from state_helpers import STORES, CountingMemoryState, CountingState, MakeStore

import arrowflow as af


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each test that makes stores against each store kind it is marked for."""
    names = metafunc.fixturenames
    marker = metafunc.definition.get_closest_marker("stores")
    kinds = marker.args if marker is not None and "store_kind" in names else ("duckdb",)
    unknown = set(kinds) - set(STORES)
    if unknown:
        raise pytest.UsageError(f"unknown store kinds {sorted(unknown)}: use {list(STORES)}")
    paths = ["memory", "file"] if "state_path" in names else []
    if kinds == ("duckdb",):
        # The store_kind fixture's default: the ids stay those of DuckDB-only tests.
        if paths:
            metafunc.parametrize("state_path", paths, indirect=True)
        return
    cases = [
        pytest.param(kind, path, id=f"{kind}-{path}" if kind == "duckdb" else kind)
        for kind in kinds
        for path in (paths if kind == "duckdb" else ["memory"])
    ]
    if paths:
        metafunc.parametrize(("store_kind", "state_path"), cases, indirect=True)
    else:
        metafunc.parametrize("store_kind", kinds, indirect=True)


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    """The kind of store ``make_store`` builds: ``"duckdb"`` (unless marked) or ``"memory"``."""
    kind: str = getattr(request, "param", "duckdb")
    return kind


@pytest.fixture
def state_path(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A DuckDB store path: ``":memory:"``, then a file (ignored by a ``MemoryState``)."""
    return ":memory:" if request.param == "memory" else str(tmp_path / "state.duckdb")


@pytest.fixture
def make_store(store_kind: str) -> Iterator[MakeStore]:
    """``make_store(path=":memory:", **options)``: a counting store, closed afterwards.

    A ``DuckDBState`` on ``path``; or a ``MemoryState``, which has no path: the stores a test
    makes on one file path are then one ``MemoryState`` (as DuckDB stores on one file share
    their rows), given the ``version=`` of the latest call.
    """
    stores: list[CountingState | CountingMemoryState] = []
    by_path: dict[str, CountingMemoryState] = {}

    def build(path: Any = ":memory:", **options: Any) -> CountingState | CountingMemoryState:
        if store_kind == "duckdb":
            store: CountingState | CountingMemoryState = CountingState(path, **options)
        else:
            store = _memory_store(by_path, str(path), **options)
        stores.append(store)
        return store

    yield build
    for store in stores:
        store.close()


def _memory_store(
    by_path: dict[str, CountingMemoryState], path: str, **options: Any
) -> CountingMemoryState:
    shared = by_path.get(path) if path != ":memory:" else None
    if shared is None:
        store = CountingMemoryState(**options)
        if path != ":memory:":
            by_path[path] = store
        return store
    table, key = options.get("table", "quick_fit"), options.get("key", "id")
    if (shared.table, shared.key) != (table, key):
        raise pytest.UsageError(
            "a MemoryState holds one table: stores of other tables on one file are duckdb_only"
        )
    shared.version = options.get("version")
    return shared


@pytest.fixture
def calls() -> list[list[Any]]:
    """The keys each call of a recording agent received, one list per call."""
    return []


@pytest.fixture
def scoring_agent(calls: list[list[Any]]) -> Callable[..., type[af.Agent]]:
    """``scoring_agent(store, size, **options)``: a trigger that records, filters and scores.

    Each call appends the stream's keys to ``calls``, fails on the stream numbers in
    ``fail_streams``, keeps the rows with ``employees >= min_employees`` and adds
    ``score = employees * 2``. ``rename`` gives the agent another class name.
    """

    def build(
        store: Any,
        size: int = 100,
        *,
        over: str = "companies",
        key_column: str = "id",
        min_employees: int = 0,
        fail_streams: tuple[int, ...] = (),
        rename: str | None = None,
        **options: Any,
    ) -> type[af.Agent]:
        @af.intelligent_streaming(stream_size=size, over=over, state=store, **options)
        class QuickFit(af.Agent):
            def call(self, context: Any) -> dict[str, pa.Table]:
                rows = context[over]
                calls.append(rows[key_column].to_pylist())
                stream = context["_batch_metadata"]["batch_number"]
                if stream in fail_streams:
                    raise RuntimeError(f"boom in stream {stream}")
                kept = rows.filter(pc.field("employees") >= min_employees)
                return {over: kept.append_column("score", pc.multiply(kept["employees"], 2))}

        if rename is not None:
            return type(rename, (QuickFit,), {})
        return QuickFit

    return build
