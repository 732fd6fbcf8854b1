"""Per-stream overhead of ``af.sql_agent`` and ``af.polars_agent`` against the same work by hand.

The same step, add ``y = x * 2`` and drop the rows where ``k % 3 == 0``, over every stream of
the benchmark table (10,000 rows per stream), two ways each, in alternating rounds:

- **DuckDB by hand**: one connection; per slice ``con.register("batch", part)`` and
  ``con.sql(SQL).to_arrow_table()``; ``pa.concat_tables``. **arrowflow**: ``af.sql_agent(SQL)``
  as the trigger of a scope.
- **polars by hand**: per slice ``step(pl.from_arrow(part)).to_arrow()``; ``pa.concat_tables``.
  **arrowflow**: ``af.polars_agent(step)`` as the trigger of a scope.

Both ways must return the same table, equal to the step run once over the whole table. What
arrowflow adds per stream (its own per-stream cost, finding the field, normalising view types)
is the difference, less what the agents save where they cross between libraries more cheaply
than the usual calls above: DuckDB finds ``batch`` by a replacement scan rather than a
registered view, and polars frames cross through the Arrow C stream interface.

Run with::

    python -m pytest benchmarks/test_interop.py --benchmark-only
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

import duckdb
import polars as pl
import pyarrow as pa
import pytest

import arrowflow as af
from test_overhead import alternate

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import Figures

STREAM_SIZE = 10_000
GOAL_RATIO = 1.15
SQL = "select id, x, k, x * 2 as y from batch where k % 3 <> 0"
TITLE = "arrowflow interop agents against DuckDB and polars by hand"


def polars_step(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(y=pl.col("x") * 2).filter(pl.col("k") % 3 != 0)


def duckdb_by_hand(table: pa.Table, stream_size: int) -> pa.Table:
    connection = duckdb.connect()
    parts = []
    for offset in range(0, table.num_rows, stream_size):
        connection.register("batch", table.slice(offset, stream_size))
        parts.append(connection.sql(SQL).to_arrow_table())
    connection.close()
    return pa.concat_tables(parts)


def polars_by_hand(table: pa.Table, stream_size: int) -> pa.Table:
    parts = [
        polars_step(pl.from_arrow(table.slice(offset, stream_size), rechunk=False)).to_arrow()
        for offset in range(0, table.num_rows, stream_size)
    ]
    return pa.concat_tables(parts)


CASES: dict[str, tuple[Callable[[pa.Table, int], pa.Table], Callable[[], type[af.Agent]]]] = {
    "sql_agent": (duckdb_by_hand, lambda: af.sql_agent(SQL)),
    "polars_agent": (polars_by_hand, lambda: af.polars_agent(polars_step)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_interop_overhead(
    benchmark: Any, table: pa.Table, figures: Figures, rounds: int, case: str
) -> None:
    """arrowflow's rounds are timed by pytest-benchmark; before each, untimed by it, the loop
    by hand runs and is timed here, so the two alternate and share the machine's state."""
    by_hand, make_agent = CASES[case]
    size = STREAM_SIZE
    benchmark.group = f"{case}, stream size {size:,} ({table.num_rows:,} rows)"
    flow = af.Flow(af.intelligent_streaming(size, over="rows")(make_agent()))

    expected = by_hand(table, max(table.num_rows, 1))
    hand_seconds = alternate(benchmark, lambda: by_hand(table, size), flow, table, rounds, expected)
    streams = -(-table.num_rows // size)
    hand, best = min(hand_seconds), benchmark.stats.stats.min
    ratio = best / hand
    median_ratio = benchmark.stats.stats.median / statistics.median(hand_seconds)
    per_stream_us = (best - hand) / streams * 1e6
    met = "met" if ratio <= GOAL_RATIO else "missed"
    figures.add(
        TITLE,
        f"{table.num_rows:,} rows, {size:,} per stream ({streams:,} streams), best of {rounds}",
        f"{case}: by hand {hand:.3f} s, arrowflow {best:.3f} s: {ratio:.2f}x "
        f"(medians {median_ratio:.2f}x), {per_stream_us:.1f} us per stream, "
        f"goal <= {GOAL_RATIO:.2f}x: {met}",
    )
