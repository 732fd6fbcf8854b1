"""One join per run: what is done in the whole input, learnt before the first stream.

When the keys of the whole input are known up front — a table input, or a Parquet scan, which
reads its key column alone (:func:`arrowflow.state.base.input_keys`) — the run asks the
database twice, once each, instead of once per stream:

1. which input positions hold a key that has anything stored, and under which fingerprint: the
   done mask over the whole input (one bit per row), and whether some keys are stored under
   another fingerprint (``stale``: their rows must be replaced when they are stored again);
2. the stored rows of the done keys, ordered by input position, as a stream of record batches.

A stream is the input's rows ``offset`` to ``offset + rows`` (its :class:`StreamInfo`), so its
mask is a slice of the first answer, and its stored rows the next rows of the second: they are
read as streams ask for them and dropped once the streams before them completed (the executor
reports streams in order), so memory holds the stored rows of the streams in flight, not of
the whole input. The sort behind the second query is DuckDB's, within its ``memory_limit``,
spilling to its temp directory. A stream whose keys are not the input's at its offset (a
caller that changed them) is answered by the per-stream queries instead.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from arrowflow.state._results import NOT_DONE

if TYPE_CHECKING:
    import duckdb

    from arrowflow.state._results import ResultTable
    from arrowflow.state.base import StreamInfo

__all__ = ["Resume"]

_INPUT_VIEW = "arrowflow_input_view"
_POS = "__arrowflow_pos"
_ROWID = "__arrowflow_rowid"
#: Rows per batch read from the ordered stored rows.
_READ_ROWS = 65_536


class Resume:
    """The done mask over an input whose keys are known, and its done rows' stored results.

    When no input key is done, neither the keys nor a mask are kept: every stream's mask is
    all ``False``, whatever its rows (the run's memory does not grow with the input's size).

    Attributes:
        keys: the input's key column (``None`` when no key is done).
        mask: ``True`` at the positions of the input whose key is done (``None`` likewise).
        stale: some input keys have rows stored under another fingerprint.
    """

    def __init__(
        self,
        length: int,
        keys: pa.ChunkedArray | None,
        mask: pa.Array | None,
        stale: bool,
        rows: _OrderedRows | None,
    ) -> None:
        self.length = length
        self.keys = keys
        self.mask = mask
        self.stale = stale
        self._rows = rows

    @classmethod
    def fetch(
        cls,
        con: duckdb.DuckDBPyConnection,
        table: ResultTable,
        fp: int,
        keys: pa.ChunkedArray,
    ) -> Resume:
        """Ask the database which of ``keys`` are done under ``fp``; stream their rows from
        a cursor of ``con`` kept for this run (:meth:`close` releases it)."""
        n = len(keys)
        empty = con.sql(f"SELECT NOT EXISTS (SELECT 1 FROM {table.done_sql})").fetchall()
        if empty[0][0]:  # a first run: nothing to join with
            return cls(n, None, None, False, None)
        position_type = pa.int32() if n < 2**31 else pa.int64()
        positions = pa.array(np.arange(n, dtype=position_type.to_pandas_dtype()))
        cursor: duckdb.DuckDBPyConnection | None = con.cursor()
        assert cursor is not None
        cursor.register(_INPUT_VIEW, pa.table({"key": keys, "pos": positions}))
        try:
            stored = cursor.sql(
                f"SELECT k.pos, d.fp FROM {_INPUT_VIEW} k JOIN {table.done_sql} d ON d.key = k.key"
            ).to_arrow_table()
            mine = pc.equal(stored["fp"], fp)
            stale = stored.num_rows > 0 and not pc.all(mine).as_py()
            found = stored["pos"].filter(mine) if stale else stored["pos"]
            if not len(found):
                return cls(n, None, None, stale, None)
            hits = pa.repeat(pa.scalar(True), len(found))
            mask = pc.fill_null(pc.scatter(hits, found, max_index=n - 1), False)
            mask = mask.combine_chunks() if isinstance(mask, pa.ChunkedArray) else mask
            rows = None
            if table.exists:
                rows = _OrderedRows(cursor, table, fp)
                cursor = None  # the rows keep it until the run ends
        finally:
            if cursor is not None:
                cursor.close()
        return cls(n, keys, mask, stale, rows)

    def covers(self, stream: StreamInfo, keys: pa.ChunkedArray) -> bool:
        """Whether ``keys`` are the input's keys at ``stream``'s rows (then this answers)."""
        offset = stream.offset
        if offset is None or offset + len(keys) > self.length:
            return False
        return self.keys is None or self.keys.slice(offset, len(keys)).equals(keys)

    def mask_of(self, stream: StreamInfo, rows: int) -> pa.Array:
        assert stream.offset is not None
        if self.mask is None:
            return pa.array(np.zeros(rows, dtype=np.bool_))
        return self.mask.slice(stream.offset, rows)

    def stored_rows(self, stream: StreamInfo, rows: int) -> pa.Table | None:
        """The stored rows of the done keys of the stream's input rows, in input order, or
        ``None`` when nothing is stored for them (read as the database gave them)."""
        if self._rows is None:
            return None
        assert stream.offset is not None
        return self._rows.between(stream.offset, stream.offset + rows)

    def completed(self, stream: StreamInfo) -> None:
        """The streams up to ``stream`` are over: their stored rows are needed no more."""
        if self._rows is not None and stream.offset is not None:
            self._rows.drop_before(stream.offset + stream.rows)

    def close(self) -> None:
        if self._rows is not None:
            self._rows.close()


class _OrderedRows:
    """The stored rows of the done input keys, read in input order as streams ask for them."""

    def __init__(self, cursor: duckdb.DuckDBPyConnection, table: ResultTable, fp: int) -> None:
        self._cursor = cursor
        self._lock = threading.Lock()
        columns = table.stored_columns_sql(fp, "r")
        done = f"{_INPUT_VIEW} k JOIN {table.done_sql} d ON d.key = k.key AND d.fp = {fp:d}"
        select = f'SELECT k.pos AS "{_POS}", r.rowid AS "{_ROWID}", {columns} FROM {done}'
        # Each done key's rows, and the rows its stream added under keys of their own (anchored
        # at it, see arrowflow.state._results), at its position.
        query = f"{select} JOIN {table.sql} r ON r.{table.key_sql} = k.key"
        added = cursor.sql(
            f"SELECT EXISTS (SELECT 1 FROM {table.done_sql} "
            f"WHERE fp = {NOT_DONE:d} AND anchor IS NOT NULL)"
        ).fetchall()
        if added[0][0]:
            query += (
                f" UNION ALL {select} JOIN {table.done_sql} e ON e.anchor = k.key "
                f"AND e.fp = {NOT_DONE:d} JOIN {table.sql} r ON r.{table.key_sql} = e.key"
            )
        relation = cursor.sql(f'{query} ORDER BY "{_POS}", "{_ROWID}"')
        # Older DuckDB releases only have fetch_record_batch, deprecated in DuckDB 2.
        to_reader = getattr(relation, "to_arrow_reader", None) or relation.fetch_record_batch
        self._reader: pa.RecordBatchReader | None = to_reader(_READ_ROWS)
        self._schema = self._reader.schema
        # Batches read and not dropped yet, each with its positions (ascending).
        self._buffer: list[tuple[pa.RecordBatch, np.ndarray]] = []
        self._read_to = -1  # the highest position read so far
        self._floor = 0  # rows before this position are needed no more

    def between(self, start: int, end: int) -> pa.Table:
        """The rows at positions ``start`` to ``end``, without the bookkeeping columns."""
        with self._lock:
            while self._reader is not None and self._read_to < end - 1:
                try:
                    batch = self._reader.read_next_batch()
                except StopIteration:
                    self._finish()
                    break
                if batch.num_rows:
                    positions = batch.column(0).to_numpy()
                    self._buffer.append((batch, positions))
                    self._read_to = int(positions[-1])
            parts = []
            for batch, positions in self._buffer:
                if positions[-1] < start or positions[0] >= end:
                    continue
                low, high = np.searchsorted(positions, [start, end])
                parts.append(batch.slice(int(low), int(high - low)))
        part = pa.Table.from_batches(parts, schema=self._schema)
        return part.drop_columns([_POS, _ROWID])

    def drop_before(self, position: int) -> None:
        with self._lock:
            self._floor = max(self._floor, position)
            while self._buffer and self._buffer[0][1][-1] < self._floor:
                self._buffer.pop(0)

    def _finish(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def close(self) -> None:
        with self._lock:
            self._finish()
            self._buffer.clear()
            self._cursor.close()
