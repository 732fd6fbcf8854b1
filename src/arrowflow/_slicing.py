"""Cutting a table or a lazy reader into streams of ``size`` rows, without copying."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from arrowflow._row_counts import known_num_rows
from arrowflow.exceptions import ExecutionError

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["StreamCutter"]


class StreamCutter:
    """Iterate consecutive zero-copy slices of ``size`` rows; the last may be shorter.

    For a table, ``total`` is known up front. For a ``RecordBatchReader``, batches are pulled
    only as streams are cut, holding at most one stream plus one batch beyond it: that look-ahead
    tells whether the stream being handed out is the last, so ``total`` is ``None`` until the
    end is in sight and known for the last stream.

    A reader that knows its row count without being read (:func:`~arrowflow.scan_parquet`'s, from
    the Parquet footers) gives ``total`` from the start. Should it hold another number of rows
    (a file changed after the scan), ``total`` is corrected rather than left wrong: it becomes
    ``None`` as soon as more rows than announced arrive, and the true count once the end is in
    sight, for the last stream at the latest. Streams handed out before that carried the
    announced ``total``; none ever carries a ``total`` smaller than its own number.

    Example:
        >>> import pyarrow as pa
        >>> cutter = StreamCutter(pa.table({"n": range(25)}), 10)
        >>> [s.num_rows for s in cutter], cutter.total
        ([10, 10, 5], 3)
    """

    def __init__(
        self, source: pa.Table | pa.RecordBatchReader, size: int, where: str = "input"
    ) -> None:
        self.size = size
        self.where = where
        self.schema: pa.Schema = source.schema
        self._source = source
        self.total: int | None = None
        self.rows = 0
        # Rows a lazy reader announced; reading may prove it wrong (see the class docstring).
        self._announced: int | None = None
        if isinstance(source, pa.Table):
            self.total = -(-source.num_rows // size)
        else:
            self._announced = known_num_rows(source)
            if self._announced is not None:
                self.total = -(-self._announced // size)

    def __iter__(self) -> Iterator[pa.Table]:
        if isinstance(self._source, pa.Table):
            return self._slice_table(self._source)
        return self._slice_reader(self._source)

    def _slice_table(self, table: pa.Table) -> Iterator[pa.Table]:
        for offset in range(0, table.num_rows, self.size):
            piece = table.slice(offset, self.size)
            self.rows += piece.num_rows
            yield piece

    def _slice_reader(self, reader: pa.RecordBatchReader) -> Iterator[pa.Table]:
        buffered: list[pa.RecordBatch] = []
        rows = 0
        exhausted = False
        emitted = 0
        pulled = 0
        while True:
            # One row beyond the stream tells whether another stream follows.
            while rows <= self.size and not exhausted:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    exhausted = True
                    break
                except (pa.ArrowException, OSError) as exc:
                    raise ExecutionError(
                        f"{self.where}: reading stream {emitted + 1} from the input failed: {exc}"
                    ) from exc
                buffered.append(batch)
                rows += batch.num_rows
                pulled += batch.num_rows
                if self._announced is not None and pulled > self._announced:
                    self.total = None
            if rows == 0:
                self.total = emitted
                return
            pending = pa.Table.from_batches(buffered, self.schema)
            piece = pending.slice(0, self.size)
            rest = pending.slice(self.size)
            buffered, rows = rest.to_batches(), rest.num_rows
            emitted += 1
            if exhausted:
                self.total = emitted + -(-rows // self.size)
            self.rows += piece.num_rows
            yield piece
