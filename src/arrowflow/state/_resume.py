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
memory holds the rows of the streams in flight, not of the whole input. Each batch read is
worked out once (:class:`_Digest`: positions done, positions stored under another
fingerprint, stored rows without the bookkeeping columns), so a stream's answer is a few binary
searches and zero-copy slices, however many streams a batch spans. The sort behind the query
is DuckDB's, within its ``memory_limit``, spilling to its temp directory; once every stored row
is read, the store may give DuckDB less (``write_memory_limit``). A first run (nothing stored
at all) asks nothing and keeps nothing. A stream whose keys are not the input's at its offset
(a caller that changed them) is answered by the per-stream queries.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from arrowflow.state._results import NOT_DONE

if TYPE_CHECKING:
    from collections.abc import Callable

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
#: A batch spanning fewer input positions than this many times its rows keeps a dense done
#: mask (a byte per position): a stream's mask is then a slice, not a scatter of positions.
_DENSE_SPAN = 8


class Resume:
    """Answers skip and load for the streams of an input whose keys are known.

    Attributes:
        length: the input's number of rows.
        keys: the input's key column (``None`` when nothing is stored: no stream needs it).
    """

    def __init__(
        self, length: int, keys: pa.ChunkedArray | None, rows: _OrderedRows | None
    ) -> None:
        self.length = length
        self.keys = keys
        self._rows = rows
        # Each stream's answer, by offset, from its skip to its completion: its load reuses it.
        self._answers: dict[int, _Answer] = {}

    @classmethod
    def fetch(
        cls,
        con: duckdb.DuckDBPyConnection,
        table: ResultTable,
        fp: int,
        keys: pa.ChunkedArray,
        on_read_all: Callable[[duckdb.DuckDBPyConnection], None] | None = None,
    ) -> Resume:
        """Ask the database about ``keys`` under ``fp``, answered from a cursor of ``con``
        kept for this run (:meth:`close` releases it); ``on_read_all`` is called with that
        cursor once the stored rows are all read."""
        n = len(keys)
        if table.holds_nothing(con):  # a first run: nothing to join with
            return cls(n, None, None)
        # Written as numpy dtypes: pyarrow's to_pandas_dtype() imports pandas.
        positions = pa.array(np.arange(n, dtype=np.int32 if n < 2**31 else np.int64))
        cursor = con.cursor()
        try:
            cursor.register(_INPUT_VIEW, pa.table({"key": keys, "pos": positions}))
            rows = _OrderedRows(cursor, table, fp, on_read_all)
        except BaseException:
            cursor.close()
            raise
        return cls(n, keys, rows)

    @property
    def reading(self) -> bool:
        """Whether stored rows are still to be read from the database."""
        return self._rows is not None and not self._rows.read_all

    def covers(self, stream: StreamInfo, keys: pa.ChunkedArray) -> bool:
        """Whether ``keys`` are the input's keys at ``stream``'s rows (then this answers)."""
        offset = stream.offset
        if offset is None or offset + len(keys) > self.length:
            return False
        return self.keys is None or self.keys.slice(offset, len(keys)).equals(keys)

    def skip(self, stream: StreamInfo, rows: int) -> tuple[np.ndarray[Any, Any], bool]:
        """The done mask of the stream's ``rows`` input rows, and whether it is fresh."""
        answer = self._answer(stream, rows)
        return answer.mask, answer.fresh

    def stored_rows(
        self, stream: StreamInfo, rows: int
    ) -> tuple[np.ndarray[Any, Any], pa.Table | None]:
        """The done mask of the stream's ``rows`` input rows and the stored rows of its done
        keys, in input order (``None`` when nothing is stored: read as the database gave them)."""
        answer = self._answer(stream, rows)
        return answer.mask, answer.stored

    def completed(self, stream: StreamInfo) -> None:
        """The streams up to ``stream`` are over: their stored rows are needed no more."""
        if stream.offset is None:
            return
        end = stream.offset + stream.rows
        # Streams that failed before it never complete: their answers go now too.
        for offset in [offset for offset in self._answers if offset < end]:
            self._answers.pop(offset, None)
        if self._rows is not None:
            self._rows.drop_before(end)

    def _answer(self, stream: StreamInfo, rows: int) -> _Answer:
        offset = stream.offset
        assert offset is not None
        answer = self._answers.get(offset)
        if answer is None or len(answer.mask) != rows:
            if self._rows is None:
                answer = _Answer(np.zeros(rows, dtype=np.bool_), True, None)
            else:
                answer = self._rows.answer(offset, offset + rows)
            self._answers[offset] = answer
        return answer

    def close(self) -> None:
        if self._rows is not None:
            self._rows.close()


@dataclass(frozen=True, slots=True)
class _Answer:
    """One stream's answer: its done mask (read-only), whether nothing of it is stored under
    another fingerprint, and the stored rows of its done keys (``None``: nothing stored)."""

    mask: np.ndarray[Any, Any]
    fresh: bool
    stored: pa.Table | None


@dataclass(frozen=True, slots=True)
class _Digest:
    """One batch of the ordered query, worked out once for all the streams it answers.

    Attributes:
        first: the lowest input position of the batch.
        last: the highest.
        done: the positions stored under the run's fingerprint, ascending (a position repeats
            when its stream added rows).
        dense: when the batch's positions are dense enough (see :meth:`of`), the done mask of
            positions ``first`` to ``last`` (read-only), so that a stream's is a slice of it.
        other: the positions stored under another fingerprint, ascending.
        stored: the stored rows of the run's fingerprint, bookkeeping columns dropped.
        stored_at: the input position of each of ``stored``'s rows.
    """

    first: int
    last: int
    done: np.ndarray[Any, Any]
    dense: np.ndarray[Any, Any] | None
    other: np.ndarray[Any, Any]
    stored: pa.Table
    stored_at: np.ndarray[Any, Any]

    @classmethod
    def of(cls, batch: pa.RecordBatch, fp: int) -> _Digest:
        positions = batch.column(_POS).to_numpy()
        first, last = int(positions[0]), int(positions[-1])
        mine = batch.column(_FP).to_numpy(zero_copy_only=False) == fp
        # A done key without rows (its agents filtered it out) is done but loads nothing.
        loaded = mine & batch.column(_ROWID).is_valid().to_numpy(zero_copy_only=False)
        stored = pa.Table.from_batches([batch]).drop_columns(_BOOKKEEPING)
        if not loaded.all():
            stored = stored.filter(loaded)
        done = positions[mine]
        dense = None
        # A byte per position spanned: a bounded multiple of the batch's own size.
        if last - first < _DENSE_SPAN * len(positions):
            dense = np.zeros(last - first + 1, dtype=np.bool_)
            dense[done - first] = True
            dense.flags.writeable = False
        return cls(first, last, done, dense, positions[~mine], stored, positions[loaded])

    def mark(self, mask: np.ndarray[Any, Any], start: int, end: int) -> None:
        """Set ``mask`` (the rows at positions ``start`` to ``end``) where they are done."""
        if self.dense is None:
            bounds = np.array([start, end], dtype=self.done.dtype)
            low, high = np.searchsorted(self.done, bounds)
            mask[self.done[low:high] - start] = True
            return
        low, high = max(start, self.first), min(end, self.last + 1)
        if high > low:
            mask[low - start : high - start] |= self.dense[low - self.first : high - self.first]


class _OrderedRows:
    """The stored rows of the done input keys, read in input order as streams ask for them.

    Each batch read is digested once (:class:`_Digest`), so that a stream's answer is a few
    binary searches and slices, whatever the number of streams a batch spans.
    """

    def __init__(
        self,
        cursor: duckdb.DuckDBPyConnection,
        table: ResultTable,
        fp: int,
        on_read_all: Callable[[duckdb.DuckDBPyConnection], None] | None,
    ) -> None:
        self._cursor = cursor
        self._fp = fp
        self._on_read_all = on_read_all
        self.read_all = False
        self._lock = threading.Lock()
        done = f"{_INPUT_VIEW} k JOIN {table.done_sql} d ON d.key = k.key"
        head = f'SELECT k.pos AS "{_POS}", d.fp AS "{_FP}"'
        # One row per position, unless streams added rows: those follow their anchor's row
        # in the order they were stored. (Sorting on the row ids too costs a third more.)
        order = f'"{_POS}"'
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
                order += f', "{_ROWID}" NULLS FIRST'
        else:
            query = f'{head}, NULL::BIGINT AS "{_ROWID}" FROM {done}'
        relation = cursor.sql(f"{query} ORDER BY {order}")
        # Older DuckDB releases only have fetch_record_batch, deprecated in DuckDB 2.
        to_reader = getattr(relation, "to_arrow_reader", None) or relation.fetch_record_batch
        self._reader: pa.RecordBatchReader | None = to_reader(_READ_ROWS)
        self._schema = pa.schema(
            [field for field in self._reader.schema if field.name not in _BOOKKEEPING]
        )
        # Batches read and not dropped yet, in input order.
        self._digests: list[_Digest] = []
        self._read_to = -1  # the highest position read so far
        self._floor = 0  # rows before this position are needed no more

    def answer(self, start: int, end: int) -> _Answer:
        """The answer for the rows at positions ``start`` to ``end``."""
        with self._lock:
            # Rows of one position may span two batches (a stream's added rows are anchored
            # at its last key): read past ``end - 1`` to have all of them.
            while self._reader is not None and self._read_to < end:
                try:
                    batch = self._reader.read_next_batch()
                except StopIteration:
                    self._finish()
                    self.read_all = True
                    if self._on_read_all is not None:
                        self._on_read_all(self._cursor)
                    break
                if batch.num_rows:
                    digest = _Digest.of(batch, self._fp)
                    self._digests.append(digest)
                    self._read_to = digest.last
            digests = [digest for digest in self._digests if digest.last >= start]
        digests = [digest for digest in digests if digest.first < end]
        first = digests[0] if digests else None
        dense = first.dense if first is not None else None
        if first is not None and dense is not None and first.first <= start < end <= first.last + 1:
            mask = dense[start - first.first : end - first.first]  # the usual case: a view
        else:
            mask = np.zeros(end - start, dtype=np.bool_)
            for digest in digests:
                digest.mark(mask, start, end)
        fresh = True
        parts = []
        for digest in digests:
            bounds = np.array([start, end], dtype=digest.stored_at.dtype)
            if fresh and len(digest.other):
                low, high = np.searchsorted(digest.other, bounds)
                fresh = bool(low == high)
            low, high = np.searchsorted(digest.stored_at, bounds)
            parts.append(digest.stored.slice(int(low), int(high - low)))
        mask.flags.writeable = False  # handed out to a stream's skip and its load
        if len(parts) == 1:
            return _Answer(mask, fresh, parts[0])
        stored = pa.concat_tables(parts) if parts else self._schema.empty_table()
        return _Answer(mask, fresh, stored)

    def drop_before(self, position: int) -> None:
        with self._lock:
            self._floor = max(self._floor, position)
            while self._digests and self._digests[0].last < self._floor:
                self._digests.pop(0)

    def _finish(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def close(self) -> None:
        with self._lock:
            self._finish()
            self._digests.clear()
            self._cursor.close()
