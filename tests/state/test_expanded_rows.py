"""Rows an agent adds under keys that are not in its stream's input come back on a rerun exactly
as the first run returned them, in the same place."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

import arrowflow as af
from arrowflow.state import DuckDBState, _resume

if TYPE_CHECKING:
    from collections.abc import Callable

EXTRA = 100_000  # keys of the added rows: never in the input


def _expanding(
    store: DuckDBState, calls: list[int], *, fail_at: int = 0, extra: int = EXTRA
) -> type[af.Agent]:
    """Keeps the rows whose id is not a multiple of 4, scores them, and adds one row per
    stream under a key of its own, after the stream's rows."""

    @af.intelligent_streaming(stream_size=10, over="companies", state=store, on_error="continue")
    class Expand(af.Agent):
        def call(self, context: Any) -> dict[str, pa.Table]:
            rows = context["companies"]
            stream = context["_batch_metadata"]["batch_number"]
            calls.append(stream)
            if stream == fail_at:
                raise RuntimeError("boom")
            kept = rows.filter(pc.not_equal(pc.bit_wise_and(rows["id"], 3), 0))
            scored = kept.select(["id"]).append_column("score", pc.multiply(kept["id"], 2))
            added = pa.table(
                {"id": pa.array([extra + stream], pa.int64()), "score": pa.array([-stream])}
            )
            return {"companies": pa.concat_tables([scored, added])}

    return Expand


def _input(lazy: bool, companies: pa.Table) -> Any:
    if not lazy:
        return companies
    return pa.RecordBatchReader.from_batches(companies.schema, companies.to_batches(7))


@pytest.mark.parametrize("lazy", [False, True], ids=["table", "reader"])
def test_added_rows_come_back_in_their_place(
    tmp_path: Path, make_companies: Callable[..., pa.Table], lazy: bool
) -> None:
    companies = make_companies(40).select(["id"])
    calls: list[int] = []
    store = DuckDBState(tmp_path / "state.duckdb")
    first = af.Flow(_expanding(store, calls)).run(companies=_input(lazy, companies))
    assert first["companies"].num_rows == 30 + 4

    calls.clear()
    again = af.Flow(_expanding(store, calls)).run(companies=_input(lazy, companies))
    assert calls == []
    assert again["companies"].equals(first["companies"])


@pytest.mark.parametrize("read_rows", [3, 10, 11])
def test_added_rows_split_across_batches_of_the_resume_query_come_back(
    tmp_path: Path,
    make_companies: Callable[..., pa.Table],
    monkeypatch: pytest.MonkeyPatch,
    read_rows: int,
) -> None:
    """A stream's added rows sit at its last key's position: read in batches of 10, the first
    stream's stored rows end a batch and its added row starts the next one."""
    monkeypatch.setattr(_resume, "_READ_ROWS", read_rows)
    companies = make_companies(40).select(["id"])
    store = DuckDBState(tmp_path / "state.duckdb")
    first = af.Flow(_expanding(store, [])).run(companies=companies)

    calls: list[int] = []
    again = af.Flow(_expanding(store, calls)).run(companies=companies)
    assert calls == []
    assert again["companies"].equals(first["companies"])


@pytest.mark.parametrize("lazy", [False, True], ids=["table", "reader"])
def test_a_partial_rerun_places_loaded_and_new_added_rows_as_the_first_run_did(
    tmp_path: Path, make_companies: Callable[..., pa.Table], lazy: bool
) -> None:
    companies = make_companies(40).select(["id"])
    uninterrupted = af.Flow(_expanding(DuckDBState(), [])).run(companies=companies)

    store = DuckDBState(tmp_path / "state.duckdb")
    calls: list[int] = []
    af.Flow(_expanding(store, calls, fail_at=3)).run(companies=_input(lazy, companies))
    calls.clear()
    resumed = af.Flow(_expanding(store, calls)).run(companies=_input(lazy, companies))

    assert calls == [3]
    assert resumed["companies"].equals(uninterrupted["companies"])


def test_a_key_added_by_two_streams_is_refused(
    tmp_path: Path, make_companies: Callable[..., pa.Table]
) -> None:
    """Two streams adding a row under one key could not both be given back: refused."""
    store = DuckDBState(tmp_path / "state.duckdb")

    @af.intelligent_streaming(stream_size=10, over="companies", state=store)
    class Total(af.Agent):
        def call(self, context: Any) -> dict[str, pa.Table]:
            rows = context["companies"].select(["id"])
            added = pa.table({"id": pa.array([EXTRA], pa.int64())})
            return {"companies": pa.concat_tables([rows, added])}

    with pytest.raises(af.ExecutionError, match=rf"key {EXTRA}.*more than one stream"):
        af.Flow(Total).run(companies=make_companies(30))
