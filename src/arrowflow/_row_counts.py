"""What lazy readers know without being read: their row count, and one column on request.

A ``pa.RecordBatchReader`` takes no attributes, so the readers arrowflow builds itself (a
Parquet scan knows its rows from the files' footers, and can read a single column of its files
cheaply) are recorded here, weakly: the entry goes when the reader does. The count is of the
rows not read yet, so a reader someone has already pulled a batch from still reports the right
number. :class:`~arrowflow._slicing.StreamCutter` reads it to know ``total`` from the first
stream; a state store reads the key column to answer skip and load for the whole input at once.

Code that wraps a reader in another (to convert its batches on the way) calls
:func:`carry_num_rows` so that the wrapper keeps the count.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

__all__ = [
    "carry_num_rows",
    "known_column",
    "known_num_rows",
    "reader_with_num_rows",
    "reads_column",
]

#: Reads one column of a reader's source, every row of it, without reading the others.
ColumnReader = Callable[[str], pa.ChunkedArray]


class _Remaining:
    """Rows a reader still holds; its batches count themselves out as they are pulled."""

    __slots__ = ("column", "num_rows", "total")

    def __init__(self, num_rows: int, column: ColumnReader | None) -> None:
        self.num_rows = num_rows
        self.total = num_rows
        self.column = column

    def count_out(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            self.num_rows -= batch.num_rows
            yield batch


_known: weakref.WeakKeyDictionary[pa.RecordBatchReader, _Remaining] = weakref.WeakKeyDictionary()


def reader_with_num_rows(
    schema: pa.Schema,
    batches: Iterable[pa.RecordBatch],
    num_rows: int,
    column: ColumnReader | None = None,
) -> pa.RecordBatchReader:
    """A lazy reader over ``batches`` that knows it holds ``num_rows`` rows, and can read one
    of its columns with ``column(name)`` (every row, as the batches will hold them).

    Example:
        >>> import pyarrow as pa
        >>> batch = pa.record_batch({"n": [1, 2, 3]})
        >>> reader = reader_with_num_rows(batch.schema, [batch, batch], 6)
        >>> known_num_rows(reader)
        6
        >>> _ = reader.read_next_batch(); known_num_rows(reader)
        3
    """
    remaining = _Remaining(num_rows, column)
    reader = pa.RecordBatchReader.from_batches(schema, remaining.count_out(batches))
    _known[reader] = remaining
    return reader


def known_num_rows(reader: pa.RecordBatchReader) -> int | None:
    """The rows ``reader`` holds that are not read yet, or ``None`` when unknown.

    The count comes from metadata (Parquet footers), not from reading: a source changed after
    the reader was made can hold another number, which only reading to the end reveals.

    Example:
        >>> import pyarrow as pa
        >>> known_num_rows(pa.RecordBatchReader.from_batches(pa.schema([]), [])) is None
        True
    """
    remaining = _known.get(reader)
    return None if remaining is None else max(remaining.num_rows, 0)


def known_column(
    reader: pa.RecordBatchReader, name: str, *, whole: bool = False
) -> pa.ChunkedArray | None:
    """Column ``name`` of the rows ``reader`` has not yielded yet (of all its rows when
    ``whole``), read without the others, or ``None`` when the reader cannot tell it (or its
    source changed since it was made).

    Example:
        >>> import pyarrow as pa
        >>> table = pa.table({"id": [1, 2, 3], "x": [4, 5, 6]})
        >>> reader = reader_with_num_rows(
        ...     table.schema, table.to_batches(max_chunksize=2), 3, lambda name: table[name]
        ... )
        >>> _ = reader.read_next_batch(); known_column(reader, "id").to_pylist()
        [3]
        >>> known_column(reader, "id", whole=True).to_pylist()
        [1, 2, 3]
    """
    if not reads_column(reader, name):
        return None
    remaining = _known[reader]
    assert remaining.column is not None
    column = remaining.column(name)
    if len(column) != remaining.total:  # the source changed since the reader was made
        return None
    return column if whole else column.slice(remaining.total - max(remaining.num_rows, 0))


def reads_column(reader: pa.RecordBatchReader, name: str) -> bool:
    """Whether :func:`known_column` can read column ``name`` of ``reader`` (a Parquet scan's
    reader can)."""
    remaining = _known.get(reader)
    return remaining is not None and remaining.column is not None and name in reader.schema.names


def carry_num_rows(source: pa.RecordBatchReader, wrapper: pa.RecordBatchReader) -> None:
    """Let ``wrapper``, which reads ``source`` batch for batch, know the rows ``source`` holds
    (and read its columns, when the wrapper does not change their values).

    The two share one count, so rows pulled through the wrapper are counted out of both. Does
    nothing when ``source``'s count is unknown.

    Example:
        >>> import pyarrow as pa
        >>> batch = pa.record_batch({"n": [1, 2]})
        >>> source = reader_with_num_rows(batch.schema, [batch], 2)
        >>> wrapper = pa.RecordBatchReader.from_batches(batch.schema, source)
        >>> carry_num_rows(source, wrapper); known_num_rows(wrapper)
        2
    """
    remaining = _known.get(source)
    if remaining is not None:
        _known[wrapper] = remaining
