"""What a run over a whole table learns before its first stream: the done rows and their results.

One query joins the input's keys with the done keys and the stored results; afterwards each
stream's mask and stored rows are slices of its answer, found from the stream's position in
the input. Streams are zero-copy slices of the input, so their position is read off the
buffers they share with it, and then checked against the keys themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from arrowflow.state._layout import quote, registered

if TYPE_CHECKING:
    import duckdb

    from arrowflow.state._results import ResultTable

__all__ = ["Resume"]

_INPUT_VIEW = "arrowflow_input_view"
_POS = "__arrowflow_pos"
_ROWID = "__arrowflow_rowid"
_FP = "__arrowflow_fp"


@dataclass(frozen=True, slots=True)
class _Chunk:
    """One chunk of the input's key column: its offset in its buffer, length, first row."""

    offset: int
    length: int
    start: int


class Resume:
    """The done mask over a table input, and the stored rows of the done keys in input order.

    Attributes:
        keys: the input's key column.
        mask: ``True`` at the positions of the input whose key is done.
    """

    def __init__(
        self, keys: pa.ChunkedArray, mask: pa.Array, rows: pa.Table | None, *, stale: bool
    ) -> None:
        self.keys = keys
        self.mask = mask
        self.stale = stale
        self._rows = rows
        self._positions = None if rows is None else rows[_POS]
        self._chunks = _chunk_map(keys)

    @classmethod
    def fetch(
        cls, con: duckdb.DuckDBPyConnection, table: ResultTable, fp: int, keys: pa.ChunkedArray
    ) -> Resume:
        """Ask the database once which of ``keys`` are done under ``fp``, and their rows.

        Keys with something stored under another fingerprint make the resume ``stale``: their
        rows must be deleted when they are stored again. Otherwise every key not done is known
        to have nothing stored.
        """
        n = len(keys)
        positions = pc.subtract(pc.cumulative_sum(pa.repeat(pa.scalar(1, pa.int64()), n)), 1)
        done = f"JOIN {table.done_sql} d ON d.key = k.key"
        with registered(con, **{_INPUT_VIEW: pa.table({"key": keys, "pos": positions})}):
            if table.exists:
                rows = con.sql(
                    f'SELECT k.pos AS "{_POS}", d.fp AS "{_FP}", r.rowid AS "{_ROWID}", r.* '
                    f"FROM {_INPUT_VIEW} k {done} LEFT JOIN {table.sql} r "
                    f'ON r.{quote(table.key)} = k.key ORDER BY "{_POS}", "{_ROWID}"'
                ).to_arrow_table()
            else:
                rows = con.sql(
                    f'SELECT k.pos AS "{_POS}", d.fp AS "{_FP}" FROM {_INPUT_VIEW} k {done}'
                ).to_arrow_table()
        mine = pc.equal(rows[_FP], fp)
        stale = rows.num_rows > 0 and not pc.all(mine).as_py()
        if stale:
            rows = rows.filter(mine)
        found = rows[_POS]
        hits = pa.repeat(pa.scalar(True), len(found))
        mask = pc.fill_null(pc.scatter(hits, found, max_index=n - 1), False) if n else hits
        return cls(keys, mask, rows if table.exists else None, stale=stale)

    def locate(self, keys: pa.ChunkedArray) -> int | None:
        """The position in the input of the slice whose key column is ``keys``, if it is one."""
        length = len(keys)
        if length == 0:
            return None
        first = next(chunk for chunk in keys.chunks if len(chunk))
        address = _address(first)
        for chunk in self._chunks.get(address, []) if address is not None else []:
            inside = first.offset - chunk.offset
            if 0 <= inside < chunk.length:
                start = chunk.start + inside
                if start + length <= len(self.keys) and self.keys[start : start + length].equals(
                    keys
                ):
                    return int(start)
        return None

    def is_done_slice(self, start: int, keys: pa.ChunkedArray, skipped: pa.ChunkedArray) -> bool:
        """Whether ``skipped`` are exactly the done keys of the slice ``keys`` at ``start``."""
        expected = keys.filter(self.mask[start : start + len(keys)])
        return len(expected) == len(skipped) and expected.equals(skipped)

    def stored_rows(
        self, start: int, length: int, table: ResultTable, like: pa.Table | None = None
    ) -> pa.Table | None:
        """The stored rows of the done keys among input rows ``start`` to ``start + length``.

        ``like``: the input rows they stand for (see :meth:`ResultTable.restore_types`).
        """
        if self._rows is None or self._positions is None:
            return None
        bounds = pa.array([start, start + length], pa.int64())
        low, high = pc.search_sorted(self._positions, bounds).to_pylist()
        part = self._rows.slice(low, high - low)
        if part[_ROWID].null_count:  # done keys the agents filtered out: no stored row
            part = part.filter(pc.is_valid(part[_ROWID]))
        part = part.drop_columns([_POS, _FP, _ROWID])
        return table.restore_types(part, like)


def _address(chunk: pa.Array) -> int | None:
    buffers = chunk.buffers()
    data = buffers[1] if len(buffers) > 1 else None
    return None if data is None else int(data.address)


def _chunk_map(keys: pa.ChunkedArray) -> dict[int, list[_Chunk]]:
    """The input's key chunks by the address of their buffer (slices of one array share it)."""
    chunks: dict[int, list[_Chunk]] = {}
    start = 0
    for chunk in keys.chunks:
        address = _address(chunk)
        if address is not None:
            chunks.setdefault(address, []).append(_Chunk(chunk.offset, len(chunk), start))
        start += len(chunk)
    return chunks
