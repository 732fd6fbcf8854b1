"""Parquet in and out: read a file whole, scan it lazily, write streams as they complete."""

from __future__ import annotations

import queue
import threading
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.parquet as pq

from arrowflow.exceptions import ConfigurationError, ExecutionError

if TYPE_CHECKING:
    import os
    from collections.abc import Iterator, Sequence

__all__ = ["ParquetSink", "Sink", "as_sink", "read_parquet", "scan_parquet"]


def read_parquet(path: str | os.PathLike[str], columns: Sequence[str] | None = None) -> pa.Table:
    """Read a Parquet file (or a directory of them) into a ``pa.Table``.

    Example:
        >>> import arrowflow as af, pyarrow as pa, pyarrow.parquet as pq
        >>> pq.write_table(pa.table({"id": [1, 2]}), "/tmp/arrowflow_doc.parquet")
        >>> af.read_parquet("/tmp/arrowflow_doc.parquet").num_rows
        2
    """
    try:
        return pq.read_table(path, columns=list(columns) if columns is not None else None)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ExecutionError(f"cannot read Parquet {str(path)!r}: {exc}") from exc


def scan_parquet(
    path: str | os.PathLike[str],
    columns: Sequence[str] | None = None,
    batch_size: int = 65_536,
) -> pa.RecordBatchReader:
    """Scan a Parquet file, or a directory of them, lazily as a ``RecordBatchReader``.

    Batches are read only as they are pulled (files in name order, hidden files and those
    starting with ``_`` skipped), so a scope streaming over the reader holds a few streams in
    memory whatever the data's size. The schema is the first file's; a later file with the same
    columns is cast to it, anything else is an ``ExecutionError`` naming the file when the run
    reaches it.

    Example:
        >>> import arrowflow as af, pyarrow as pa, pyarrow.parquet as pq
        >>> pq.write_table(pa.table({"id": range(10)}), "/tmp/arrowflow_doc_scan.parquet")
        >>> af.scan_parquet("/tmp/arrowflow_doc_scan.parquet").read_all().num_rows
        10
    """
    files = _parquet_files(Path(path))
    try:
        schema = pq.read_schema(files[0])
    except (OSError, pa.ArrowInvalid) as exc:
        raise ExecutionError(f"cannot read Parquet file {str(files[0])!r}: {exc}") from exc
    if columns is not None:
        missing = [name for name in columns if name not in schema.names]
        if missing:
            raise ExecutionError(
                f"Parquet {str(path)!r} has no column {', '.join(map(repr, missing))} "
                f"(columns: {', '.join(schema.names)})."
            )
        schema = pa.schema([schema.field(name) for name in columns])
    batches = _read_batches(files, schema, batch_size)
    return pa.RecordBatchReader.from_batches(schema, batches)


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ExecutionError(f"cannot scan Parquet {str(path)!r}: no such file or directory.")
    files = sorted(
        file for file in path.rglob("*") if file.is_file() and not file.name.startswith(("_", "."))
    )
    if not files:
        raise ExecutionError(f"cannot scan Parquet {str(path)!r}: the directory holds no file.")
    return files


def _read_batches(
    files: list[Path], schema: pa.Schema, batch_size: int
) -> Iterator[pa.RecordBatch]:
    # One file open at a time and no pre-buffering: only the row group being decoded is held,
    # which is what keeps a scan's memory flat (a dataset scanner reads far ahead).
    for file in files:
        try:
            parquet = pq.ParquetFile(file, pre_buffer=False, buffer_size=1 << 20)
        except (OSError, pa.ArrowInvalid) as exc:
            raise ExecutionError(f"cannot read Parquet file {str(file)!r}: {exc}") from exc
        try:
            for batch in parquet.iter_batches(batch_size=batch_size, columns=schema.names):
                yield batch if batch.schema.equals(schema) else _conform_batch(batch, schema, file)
        finally:
            parquet.close()


def _conform_batch(batch: pa.RecordBatch, schema: pa.Schema, file: Path) -> pa.RecordBatch:
    try:
        return batch.select(schema.names).cast(schema)
    except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, NotImplementedError) as exc:
        raise ExecutionError(
            f"Parquet file {str(file)!r} does not match the first file's schema ({exc}).\n"
            f"first: {schema}\nthis file: {batch.schema}"
        ) from exc


@runtime_checkable
class Sink(Protocol):
    """Where a run writes its first scope's streams as they complete (``run(sink=...)``)."""

    def write(self, table: pa.Table) -> None:
        """Append one stream's rows; called in stream order."""
        ...

    def close(self) -> None:
        """Finish writing; called once when the run ends, whatever the outcome."""
        ...

    def read_back(self, schema: pa.Schema) -> pa.RecordBatchReader:
        """The rows written, read lazily (``schema`` serves when nothing was written)."""
        ...


class ParquetSink:
    """Write each stream to one Parquet file as it completes, in order, in bounded memory.

    Writing (encoding and compressing) happens on a thread of its own, one table behind the
    run at most, so it overlaps with the next streams' work. The file's schema is the first
    stream's; a later stream with the same columns (in any order) is cast to it, anything else
    is an ``ExecutionError``. Streams without rows are not written. The file is complete once
    :meth:`close` returns; :meth:`read_back` reads it lazily (:func:`scan_parquet`).

    Example:
        >>> import arrowflow as af, pyarrow as pa
        >>> sink = af.ParquetSink("/tmp/arrowflow_doc_sink.parquet")
        >>> sink.write(pa.table({"id": [1, 2]})); sink.write(pa.table({"id": [3]}))
        >>> sink.close()
        >>> sink.read_back(pa.schema([])).read_all()["id"].to_pylist()
        [1, 2, 3]
    """

    def __init__(self, path: str | os.PathLike[str], *, compression: str = "snappy") -> None:
        self.path = Path(path)
        self.compression = compression
        self.num_rows = 0
        self._schema: pa.Schema | None = None
        self._writer: pq.ParquetWriter | None = None
        self._pending: queue.Queue[pa.Table | None] = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, table: pa.Table) -> None:
        """Queue one stream's rows; blocks while the writer is a table behind."""
        self._raise_error()
        if self._schema is None:
            self._open(table.schema)
        elif not table.schema.equals(self._schema):
            if not table.num_rows:
                return
            table = self._conform(table, self._schema)
        self._pending.put(table)
        self.num_rows += table.num_rows

    def _open(self, schema: pa.Schema) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self.path, schema, compression=self.compression)
        self._schema = schema
        self._thread = threading.Thread(
            target=self._write_pending, name="arrowflow-parquet-sink", daemon=True
        )
        self._thread.start()

    def _write_pending(self) -> None:
        writer = self._writer
        assert writer is not None
        while (table := self._pending.get()) is not None:
            if self._error is None:
                try:
                    writer.write_table(table)
                except BaseException as exc:
                    self._error = exc

    def _raise_error(self) -> None:
        if self._error is not None:
            raise ExecutionError(
                f"Parquet sink {str(self.path)!r}: writing failed: {self._error}"
            ) from self._error

    def _conform(self, table: pa.Table, schema: pa.Schema) -> pa.Table:
        problem = None
        if sorted(table.schema.names) != sorted(schema.names):
            problem = "other columns"
        else:
            try:
                return table.select(schema.names).cast(schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError, NotImplementedError) as exc:
                problem = str(exc)
        raise ExecutionError(
            f"Parquet sink {str(self.path)!r}: a stream's columns do not match the file's "
            f"({problem}).\nfile: {schema}\nstream: {table.schema}\nReturn the same columns "
            "from every stream."
        )

    def close(self) -> None:
        """Write what is queued and finish the file."""
        if self._thread is not None:
            self._pending.put(None)
            self._thread.join()
            self._thread = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._raise_error()

    def read_back(self, schema: pa.Schema) -> pa.RecordBatchReader:
        """The rows written, read lazily; ``schema`` serves for a file nothing was written to."""
        if self._schema is None:
            self._open(schema)
        self.close()
        return scan_parquet(self.path)


def as_sink(sink: Sink | str | os.PathLike[str] | None) -> Sink | None:
    """The sink a run option names: a path means a :class:`ParquetSink`."""
    if sink is None or isinstance(sink, Sink):
        return sink
    if isinstance(sink, str | PathLike):
        return ParquetSink(sink)
    raise ConfigurationError(
        f"sink= takes a Parquet path or an object with write, close and read_back, got "
        f"{type(sink).__name__}."
    )
