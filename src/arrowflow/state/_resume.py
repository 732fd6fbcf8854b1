"""One join per run: what is done in the whole input, learnt with one query.

When the keys of the whole input are known up front — a table input, or a Parquet scan, which
reads its key column alone (:func:`arrowflow.state.base.input_keys`) — the run asks the
database once, instead of once per stream: for every input position whose key has anything
stored, the fingerprint it is stored under and, when that is the run's own, its stored rows
(with the rows its stream added under keys of their own, anchored at it, see
:mod:`arrowflow.state._results`), ordered by input position, as a stream of record batches.

A stream is the input's rows ``offset`` to ``offset + rows`` (its :class:`StreamInfo`), so
its answer is the next rows of that stream: its done mask (the positions stored under the
run's fingerprint), whether it is *fresh* (nothing stored under another fingerprint: its
upsert needs no deletes) and its stored rows. Rows are read as streams ask for them and
dropped once the streams before them completed (the executor reports streams in order), so
memory holds the rows of the streams in flight, not of the whole input. The sort behind the
query is DuckDB's, within its ``memory_limit``, spilling to its temp directory. A first run
(nothing stored at all) asks nothing and keeps nothing. A stream whose keys are not the
input's at its offset (a caller that changed them) is answered by the per-stream queries.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from arrowflow.state._results import NOT_DONE

if TYPE_CHECKING:
    import duckdb

    from arrowflow.state._results import ResultTable
    from arrowflow.state.base import StreamInfo

__all__ = ["Resume"]

_INPUT_VIEW = "arrowflow_input_view"
_POS = "__arrowflow_pos"
_ROWID = "__arrowflow_rowid"
_FP = "__arrowflow_fp"
_BOOKKEEPING = [_POS, _FP, _ROWID]
#: Rows per batch read from the ordered stored rows.
_READ_ROWS = 65_536


@dataclass(frozen=True, slots=True)
class _Answer:
    """A stream's done mask, whether it is fresh, and its stored rows (``None``: none)."""

    mask: pa.Array
    fresh: bool
    stored: pa.Table | None


class Resume:
    """Answers skip and load for the streams of an input whose keys are known.

    Attributes:
        length: the input's number of rows.
        keys: the input's key column (``None`` when nothing is stored: no stream needs it).
    """

    def __init__(
        self, length: int, keys: pa.ChunkedArray | None, fp: int, rows: _OrderedRows | None
    ) -> None:
        self.length = length
        self.keys = keys
        self._fp = fp
        self._rows = rows
        # Per stream in flight (by offset), its answer: streams ask twice (skip, then load).
        self._answers: dict[int, _Answer] = {}
        self._lock = threading.Lock()

    @classmethod
    def fetch(
        cls,
        con: duckdb.DuckDBPyConnection,
        table: ResultTable,
        fp: int,
        keys: pa.ChunkedArray,
    ) -> Resume:
        """Ask the database about ``keys`` under ``fp``, answered from a cursor of ``con``
        kept for this run (:meth:`close` releases it)."""
        n = len(keys)
        empty = con.sql(f"SELECT NOT EXISTS (SELECT 1 FROM {table.done_sql})").fetchall()
        if empty[0][0]:  # a first run: nothing to join with
            return cls(n, None, fp, None)
        position_type = pa.int32() if n < 2**31 else pa.int64()
        positions = pa.array(np.arange(n, dtype=position_type.to_pandas_dtype()))
        cursor = con.cursor()
        try:
            cursor.register(_INPUT_VIEW, pa.table({"key": keys, "pos": positions}))
            rows = _OrderedRows(cursor, table, fp)
        except BaseException:
            cursor.close()
            raise
        return cls(n, keys, fp, rows)

    def covers(self, stream: StreamInfo, keys: pa.ChunkedArray) -> bool:
        """Whether ``keys`` are the input's keys at ``stream``'s rows (then this answers)."""
        offset = stream.offset
        if offset is None or offset + len(keys) > self.length:
            return False
        return self.keys is None or self.keys.slice(offset, len(keys)).equals(keys)

    def skip(self, stream: StreamInfo, rows: int) -> tuple[pa.Array, bool]:
        """The done mask of the stream's ``rows`` input rows, and whether it is fresh."""
        answer = self._answer(stream, rows)
        return answer.mask, answer.fresh

    def stored_rows(self, stream: StreamInfo, rows: int) -> pa.Table | None:
        """The stored rows of the done keys of the stream's input rows, in input order, or
        ``None`` when nothing is stored for them (read as the database gave them)."""
        return self._answer(stream, rows).stored

    def completed(self, stream: StreamInfo) -> None:
        """The streams up to ``stream`` are over: their stored rows are needed no more."""
        if self._rows is not None and stream.offset is not None:
            end = stream.offset + stream.rows
            self._rows.drop_before(end)
            with self._lock:
                for offset in [offset for offset in self._answers if offset < end]:
                    del self._answers[offset]

    def _answer(self, stream: StreamInfo, rows: int) -> _Answer:
        """What the query says of the stream's rows, worked out once per stream."""
        assert stream.offset is not None
        if self._rows is None:
            return _Answer(pa.array(np.zeros(rows, dtype=np.bool_)), True, None)
        with self._lock:
            answer = self._answers.get(stream.offset)
        if answer is not None and len(answer.mask) == rows:
            return answer
        part = self._rows.between(stream.offset, stream.offset + rows)
        mine = part.column(_FP).to_numpy(zero_copy_only=False) == self._fp
        mask = np.zeros(rows, dtype=np.bool_)
        mask[part.column(_POS).to_numpy()[mine] - stream.offset] = True
        loaded = mine & part.column(_ROWID).is_valid().to_numpy(zero_copy_only=False)
        if not loaded.all():  # another fingerprint's keys, or done keys without rows
            part = part.filter(pa.array(loaded))
        answer = _Answer(pa.array(mask), bool(mine.all()), part.drop_columns(_BOOKKEEPING))
        with self._lock:
            self._answers[stream.offset] = answer
        return answer

    def close(self) -> None:
        if self._rows is not None:
            self._rows.close()


class _OrderedRows:
    """The stored rows of the done input keys, read in input order as streams ask for them."""

    def __init__(self, cursor: duckdb.DuckDBPyConnection, table: ResultTable, fp: int) -> None:
        self._cursor = cursor
        self._lock = threading.Lock()
        done = f"{_INPUT_VIEW} k JOIN {table.done_sql} d ON d.key = k.key"
        head = f'SELECT k.pos AS "{_POS}", d.fp AS "{_FP}"'
        if table.exists:
            columns = table.stored_columns_sql(fp, "r")
            # Every stored key, with its rows when they are the run's own.
            query = (
                f'{head}, r.rowid AS "{_ROWID}", {columns} FROM {done} LEFT JOIN {table.sql} r '
                f"ON d.fp = {fp:d} AND r.{table.key_sql} = k.key"
            )
            added = cursor.sql(
                f"SELECT EXISTS (SELECT 1 FROM {table.done_sql} "
                f"WHERE fp = {NOT_DONE:d} AND anchor IS NOT NULL)"
            ).fetchall()
            if added[0][0]:  # and the rows the streams added, at their anchor's position
                query += (
                    f' UNION ALL {head}, r.rowid AS "{_ROWID}", {columns} FROM {done} '
                    f"AND d.fp = {fp:d} JOIN {table.done_sql} e ON e.anchor = k.key "
                    f"AND e.fp = {NOT_DONE:d} JOIN {table.sql} r ON r.{table.key_sql} = e.key"
                )
        else:
            query = f'{head}, NULL::BIGINT AS "{_ROWID}" FROM {done}'
        relation = cursor.sql(f'{query} ORDER BY "{_POS}", "{_ROWID}" NULLS FIRST')
        # Older DuckDB releases only have fetch_record_batch, deprecated in DuckDB 2.
        to_reader = getattr(relation, "to_arrow_reader", None) or relation.fetch_record_batch
        self._reader: pa.RecordBatchReader | None = to_reader(_READ_ROWS)
        self._schema = self._reader.schema
        # Batches read and not dropped yet, each with its positions (ascending).
        self._buffer: list[tuple[pa.RecordBatch, np.ndarray]] = []
        self._read_to = -1  # the highest position read so far
        self._floor = 0  # rows before this position are needed no more

    def between(self, start: int, end: int) -> pa.Table:
        """The rows at positions ``start`` to ``end``."""
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
        return pa.Table.from_batches(parts, schema=self._schema)

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
