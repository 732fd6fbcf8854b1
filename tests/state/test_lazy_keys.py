"""A first run over a Parquet scan checks its keys without gathering them, and a run gives
DuckDB little memory once it only writes."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import arrowflow as af
from arrowflow._row_counts import known_column
from arrowflow.state import DuckDBState
from arrowflow.state import duckdb as duckdb_state


def _files(tmp_path: Path, *ids: list[int | None]) -> Path:
    """One Parquet file per list of ids (row groups of 4 rows), in a directory."""
    folder = tmp_path / "input"
    folder.mkdir()
    for number, values in enumerate(ids):
        table = pa.table({"id": pa.array(values, pa.int64()), "n": pa.array(range(len(values)))})
        pq.write_table(table, folder / f"part-{number}.parquet", row_group_size=4)
    return folder


def _scoring(store: DuckDBState, calls: list[int]) -> type[af.Agent]:
    @af.intelligent_streaming(stream_size=5, over="rows", state=store)
    class Score(af.Agent):
        def call(self, context: Any) -> dict[str, pa.Table]:
            rows = context["rows"]
            calls.extend(rows["id"].to_pylist())
            return {"rows": rows.append_column("score", pc.multiply(rows["id"], 10))}

    return Score


def test_a_first_run_over_a_scan_in_key_order_never_gathers_its_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _files(tmp_path, list(range(10)), list(range(10, 23)))
    store = DuckDBState(tmp_path / "state.duckdb")

    def gathered(*args: Any) -> None:
        raise AssertionError("the whole key column was read")

    with monkeypatch.context() as patch:
        patch.setattr(duckdb_state, "input_keys", gathered)
        calls: list[int] = []
        first = af.Flow(_scoring(store, calls)).run(rows=af.scan_parquet(folder))
    assert calls == list(range(23))
    assert first["rows"]["score"].to_pylist() == [10 * i for i in range(23)]

    calls.clear()  # a rerun has something stored: it joins with the keys
    again = af.Flow(_scoring(store, calls)).run(rows=af.scan_parquet(folder))
    assert calls == []
    assert again["rows"].equals(first["rows"])


@pytest.mark.parametrize(
    ("ids", "stream", "fragments"),
    [
        ([[0, 1, 2, 3, 4], [4, 5, 6]], 2, ["1 duplicate", "4 (2 times)"]),  # across two files
        ([[0, 1, 2, 3], [4, 5, 2, 7]], 2, ["1 duplicate", "2 (2 times)"]),  # within a stream
        ([[0, 1, 2], [3, None, 5]], 1, ["1 null", "rows 4"]),
    ],
    ids=["boundary", "within", "null"],
)
def test_bad_keys_of_a_scan_fail_the_stream_that_finds_them_before_its_agents_run(
    tmp_path: Path, ids: list[list[int | None]], stream: int, fragments: list[str]
) -> None:
    """The whole key column is read and checked once a stream breaks the order: its message
    names every duplicate, as a table input's does."""
    folder = _files(tmp_path, *ids)
    calls: list[int] = []
    store = DuckDBState(tmp_path / "state.duckdb")
    with pytest.raises(af.BatchExecutionError) as info:
        af.Flow(_scoring(store, calls)).run(rows=af.scan_parquet(folder))
    assert info.value.batch_number == stream
    assert isinstance(info.value.original_error, af.ExecutionError)
    for fragment in fragments:
        assert fragment in str(info.value.original_error)
    assert calls == [0, 1, 2, 3, 4][: 5 * (stream - 1)]


def test_streams_checked_out_of_order_compare_their_neighbours(tmp_path: Path) -> None:
    """With streams at once, a stream may be checked before the one ahead of it: the
    duplicate on their boundary is found by whichever comes second."""
    folder = _files(tmp_path, list(range(10)), [9, *range(10, 19)])
    calls: list[int] = []

    @af.intelligent_streaming(
        stream_size=5, over="rows", state=DuckDBState(tmp_path / "s.duckdb"), max_concurrency=4
    )
    class Score(af.Agent):
        def call(self, context: Any) -> dict[str, pa.Table]:
            calls.extend(context["rows"]["id"].to_pylist())
            return {"rows": context["rows"]}

    with pytest.raises(af.BatchExecutionError) as info:
        af.Flow(Score).run(rows=af.scan_parquet(folder))
    assert "9 (2 times)" in str(info.value.original_error)
    assert calls.count(9) < 2


def test_unique_keys_of_a_scan_out_of_order_are_accepted(tmp_path: Path) -> None:
    folder = _files(tmp_path, [5, 3, 9, 0], [1, 8, 2])
    calls: list[int] = []
    result = af.Flow(_scoring(DuckDBState(tmp_path / "state.duckdb"), calls)).run(
        rows=af.scan_parquet(folder)
    )
    assert result["rows"]["id"].to_pylist() == [5, 3, 9, 0, 1, 8, 2]


def _limit_seen(store: DuckDBState, seen: list[str], rows: int) -> type[af.Agent]:
    """Notes DuckDB's memory_limit (in the store's database) as each stream runs."""

    @af.intelligent_streaming(stream_size=rows, over="rows", state=store)
    class Note(af.Agent):
        def call(self, context: Any) -> dict[str, pa.Table]:
            con = store._con  # the run's database: the setting is the instance's
            assert con is not None
            seen.append(con.sql("SELECT current_setting('memory_limit')").fetchall()[0][0])
            return {"rows": context["rows"]}

    return Note


def test_duckdb_gets_the_write_limit_once_the_run_only_writes(tmp_path: Path) -> None:
    store = DuckDBState(tmp_path / "state.duckdb", memory_limit="1GB", write_memory_limit="64MB")
    table = pa.table({"id": range(30)})
    half = table.filter(pa.array(table["id"].to_numpy() % 10 < 5))
    seen: list[str] = []
    af.Flow(_limit_seen(store, seen, 5)).run(rows=half)
    assert seen == ["61.0 MiB"] * 3  # a first run: nothing to read, writing from the start

    # Every stream has new rows; the resume join's rows are read as the streams need them,
    # the last of them (id 24) by the skip of the third stream.
    seen.clear()
    af.Flow(_limit_seen(store, seen, 10)).run(rows=table)
    assert seen == ["953.6 MiB", "953.6 MiB", "61.0 MiB"]


def test_the_write_limit_is_never_above_the_memory_limit(tmp_path: Path) -> None:
    store = DuckDBState(":memory:", memory_limit="32MB", write_memory_limit="64MB")
    seen: list[str] = []
    af.Flow(_limit_seen(store, seen, 10)).run(rows=pa.table({"id": range(10)}))
    assert seen == ["30.5 MiB"]
    store.close()


def test_a_store_kept_open_starts_each_run_with_its_memory_limit(tmp_path: Path) -> None:
    store = DuckDBState(":memory:", memory_limit="1GB", write_memory_limit="64MB")
    table = pa.table({"id": range(20)})
    seen: list[str] = []
    half = table.filter(pa.array(table["id"].to_numpy() % 10 < 5))
    af.Flow(_limit_seen(store, seen, 10)).run(rows=half)
    af.Flow(_limit_seen(store, seen, 10)).run(rows=table)
    assert seen == ["61.0 MiB", "953.6 MiB", "61.0 MiB"]
    store.close()


def test_rows_too_wide_for_the_write_limit_say_which_option_to_raise_and_lose_nothing(
    tmp_path: Path,
) -> None:
    """16 MB of pending text overflows a write limit of 8 MB: the error names the option, and
    a rerun with the default limit returns the whole result."""
    table = pa.table({"id": range(4_000), "text": [f"{'x' * 10_000}{i}" for i in range(4_000)]})
    path = tmp_path / "state.duckdb"

    with pytest.raises(af.BatchExecutionError) as raised:
        af.Flow(_scoring(DuckDBState(path, write_memory_limit="8MB"), [])).run(rows=table)
    told = "".join(traceback.format_exception(raised.value))
    assert "DuckDB ran out of memory" in told
    assert "write_memory_limit='8MB'" in told
    assert "write_memory_limit='256MB'" in told

    calls: list[int] = []
    again = af.Flow(_scoring(DuckDBState(path), calls)).run(rows=table)
    assert again["rows"].num_rows == 4_000
    assert again["rows"]["text"].equals(table["text"])
    assert again["rows"]["score"].to_pylist() == [10 * i for i in range(4_000)]


def test_a_write_limit_with_a_quote_is_refused() -> None:
    with pytest.raises(af.ConfigurationError, match="write_memory_limit="):
        DuckDBState(":memory:", write_memory_limit="64MB'")


def test_a_scan_with_bad_keys_is_read_whole_once_however_many_streams_notice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of order with a duplicate: the key column is read once, by the first stream, and
    every stream is refused with what that read found (the last one, in order with its
    neighbour, too), under ``on_error="continue"``."""
    folder = _files(tmp_path, [9, 8, 7, 6, 5], [4, 3, 2, 1, 9])
    reads: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> pa.ChunkedArray | None:
        reads.append(1)
        return known_column(*args, **kwargs)

    monkeypatch.setattr(duckdb_state, "known_column", counted)

    @af.intelligent_streaming(
        stream_size=2,
        over="rows",
        state=DuckDBState(tmp_path / "state.duckdb"),
        on_error="continue",
    )
    class Score(af.Agent):
        def call(self, context: Any) -> dict[str, pa.Table]:
            raise AssertionError("no stream has keys that can be trusted")

    result = af.Flow(Score).run(rows=af.scan_parquet(folder))
    streams = result.stats[0]["streams"]
    assert streams["status"].to_pylist() == ["failed"] * 5
    assert all("9 (2 times)" in error for error in streams["error"].to_pylist())
    assert reads == [1]
