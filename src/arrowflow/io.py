"""Parquet in and out: read a file whole, scan it lazily, write streams as they complete."""

from __future__ import annotations

import enum
import logging
import os
import queue
import threading
from functools import partial
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.parquet as pq

from arrowflow._row_counts import reader_with_num_rows
from arrowflow.exceptions import ConfigurationError, ExecutionError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

__all__ = ["ParquetSink", "Sink", "as_sink", "read_parquet", "scan_parquet"]

logger = logging.getLogger("arrowflow")


def read_parquet(path: str | os.PathLike[str], columns: Sequence[str] | None = None) -> pa.Table:
    """Read a Parquet file (or a directory of them) into a ``pa.Table``.

    Example:
        >>> import arrowflow as af, pyarrow as pa, pyarrow.parquet as pq
        >>> pq.write_table(pa.table({"id": [1, 2]}), "doc.parquet")
        >>> af.read_parquet("doc.parquet").num_rows
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
    memory whatever the data's size. Every file's footer is read up front, and nothing else: the
    reader knows its row count, so a run over it shows its total number of streams (in
    ``_batch_metadata``, hooks and the progress bar) from the first stream; a file that cannot
    be opened as Parquet is an ``ExecutionError`` right away. The schema is the first file's; a
    later file with the same columns is cast to it, anything else is an ``ExecutionError``
    naming the file when the run reaches it.

    Example:
        >>> import arrowflow as af, pyarrow as pa, pyarrow.parquet as pq
        >>> pq.write_table(pa.table({"id": range(10)}), "doc_scan.parquet")
        >>> af.scan_parquet("doc_scan.parquet").read_all().num_rows
        10
    """
    files = _parquet_files(Path(path))
    schema, num_rows = _read_footer(files[0])
    # Footers only: a file's row count is in its footer, whatever the columns selected.
    num_rows += sum(_read_footer(file)[1] for file in files[1:])
    if columns is not None:
        missing = [name for name in columns if name not in schema.names]
        if missing:
            raise ExecutionError(
                f"Parquet {str(path)!r} has no column {', '.join(map(repr, missing))} "
                f"(columns: {', '.join(schema.names)})."
            )
        schema = pa.schema([schema.field(name) for name in columns])
    batches = _read_batches(files, schema, batch_size)
    return reader_with_num_rows(schema, batches, num_rows, partial(_read_column, files, schema))


def _read_column(files: list[Path], schema: pa.Schema, name: str) -> pa.ChunkedArray:
    """Column ``name`` of every file, alone, typed as the scan yields it (a state store reads
    the keys of the whole input this way)."""
    field = schema.field(name)
    chunks = []
    for file in files:
        try:
            column = pq.read_table(file, columns=[name], pre_buffer=False)[name]
        except (OSError, pa.ArrowInvalid) as exc:
            raise ExecutionError(f"cannot read Parquet file {str(file)!r}: {exc}") from exc
        chunks.extend(column.cast(field.type).chunks)
    return pa.chunked_array(chunks, type=field.type)


def _read_footer(file: Path) -> tuple[pa.Schema, int]:
    """A file's schema and row count, from its footer alone."""
    try:
        parquet = pq.ParquetFile(file)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ExecutionError(f"cannot read Parquet file {str(file)!r}: {exc}") from exc
    try:
        return parquet.schema_arrow, parquet.metadata.num_rows
    finally:
        parquet.close()


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
    """Where a run writes its first scope's streams as they complete (``run(sink=...)``).

    The run calls :meth:`write` for each stream, in stream order, then :meth:`close` if it
    succeeded and :meth:`abort` whatever happened (it failed, was interrupted or was stopped
    early), so ``abort`` must do nothing after ``close`` and may be called twice;
    :meth:`read_back` gives the rows to return.
    """

    def write(self, table: pa.Table) -> None:
        """Append one stream's rows; called in stream order."""
        ...

    def close(self) -> None:
        """The run succeeded: finish and publish the output."""
        ...

    def abort(self) -> None:
        """The run failed or stopped: finish promptly, never as if it had succeeded."""
        ...

    def read_back(self, schema: pa.Schema) -> pa.RecordBatchReader:
        """The rows written, read lazily (``schema`` serves when nothing was written)."""
        ...


class _SinkState(enum.Enum):
    OPEN = "open"  # taking streams; the file, once started, is at the partial path
    FINISHED = "finished"  # read back before the run's outcome was known: complete, not published
    CLOSED = "closed"  # the run succeeded: published at the final path
    ABORTED = "aborted"  # the run did not succeed: kept at the partial path


class ParquetSink:
    """Write each stream to one Parquet file as it completes, in order, in bounded memory.

    Writing (encoding and compressing) happens on a thread of its own, one table behind the
    run at most, so it overlaps with the next streams' work. The file's schema is the first
    stream's; a later stream with the same columns (in any order) is cast to it, anything else
    is an ``ExecutionError``. Streams without rows are not written.

    The output never looks complete unless the run was. While the run writes, the file is
    ``<path>.partial`` (:attr:`partial_path`, e.g. ``out.parquet.partial``) in the same
    directory, so a process killed outright leaves only that name, unreadable or partial, never
    ``path``; a file already at ``path`` stays as it was until then. The run ends with one of:

    - :meth:`close` (the run succeeded): what is queued is written, the file finished and moved
      to ``path`` in one atomic rename, replacing any earlier file there (if writing failed,
      it raises and keeps the file as ``abort`` does). Closing a sink nothing was written to
      removes a stale ``<path>.partial`` left by an earlier killed run.
    - :meth:`abort` (the run failed, was interrupted or was stopped early): the sink's thread
      writes the streams already handed to it (two at most) and the file's footer, and the file
      stays at ``<path>.partial``: a readable Parquet file of the streams written before the
      run stopped. It waits for nothing else, and leaves ``path`` untouched.

    Each is idempotent and, once either has run, the other does nothing. :meth:`read_back`
    reads the rows written lazily, from wherever the file is when the reader is first pulled.

    Example:
        >>> import arrowflow as af, pyarrow as pa
        >>> sink = af.ParquetSink("doc_sink.parquet")
        >>> sink.write(pa.table({"id": [1, 2]})); sink.write(pa.table({"id": [3]}))
        >>> sink.close()
        >>> sink.read_back(pa.schema([])).read_all()["id"].to_pylist()
        [1, 2, 3]
    """

    def __init__(self, path: str | os.PathLike[str], *, compression: str = "snappy") -> None:
        self.path = Path(path)
        self.partial_path = self.path.with_name(f"{self.path.name}.partial")
        self.compression = compression
        self.num_rows = 0
        self._state = _SinkState.OPEN
        self._schema: pa.Schema | None = None
        self._pending: queue.Queue[pa.Table | None] = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, table: pa.Table) -> None:
        """Queue one stream's rows; blocks while the writer is a table behind."""
        if self._state is not _SinkState.OPEN:
            raise ExecutionError(
                f"Parquet sink {str(self.path)!r} is {self._state.value}: it takes no more "
                "streams. Use a new sink for each run."
            )
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
        # Truncates a stale partial file left by an earlier killed run.
        writer = pq.ParquetWriter(self.partial_path, schema, compression=self.compression)
        self._schema = schema
        self._thread = threading.Thread(
            target=self._write_pending, args=(writer,), name="arrowflow-parquet-sink", daemon=True
        )
        self._thread.start()

    def _write_pending(self, writer: pq.ParquetWriter) -> None:
        # Only this thread touches the writer, footer included: whoever stops waiting for it
        # (a second Ctrl-C) cannot close the file under a write in progress.
        while (table := self._pending.get()) is not None:
            if self._error is None:
                self._attempt(writer.write_table, table)
        self._attempt(writer.close)

    def _attempt(self, step: Callable[..., None], *args: Any) -> None:
        try:
            step(*args)
        except BaseException as exc:
            self._error = self._error or exc

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

    def _finish(self) -> None:
        """Let the thread write what it was given and the footer; the file stays partial."""
        thread = self._thread
        if thread is None:
            return
        if thread.is_alive():
            self._pending.put(None)
        thread.join()
        self._thread = None

    def close(self) -> None:
        """The run succeeded: write what is queued, finish the file and publish it at ``path``.

        A sink that failed to write is aborted instead, and the failure raised.
        """
        if self._state in (_SinkState.CLOSED, _SinkState.ABORTED):
            return
        self._finish()
        if self._error is not None:
            self._state = _SinkState.ABORTED
            self._raise_error()
        if self._schema is None:
            self.partial_path.unlink(missing_ok=True)
        else:
            self._publish()
        self._state = _SinkState.CLOSED

    def _publish(self) -> None:
        try:
            # Flushed before the rename: after a power cut, ``path`` must not name a file whose
            # data never reached the disk.
            with self.partial_path.open("rb+") as file:
                os.fsync(file.fileno())
            os.replace(self.partial_path, self.path)
        except OSError as exc:
            self._state = _SinkState.ABORTED
            raise ExecutionError(
                f"Parquet sink: cannot move {str(self.partial_path)!r} to {str(self.path)!r} "
                f"({exc}); the output is complete under the first name."
            ) from exc

    def abort(self) -> None:
        """The run did not succeed: finish what was written and keep it at ``<path>.partial``.

        Prompt (it waits only for the sink's thread to write the streams already handed to it),
        idempotent, and a no-op after :meth:`close`. A failure to write is logged, not raised:
        the run is already ending on an error of its own.
        """
        if self._state in (_SinkState.CLOSED, _SinkState.ABORTED):
            return
        # Set first: an abort interrupted while it waits is still an abort, and the thread
        # finishes the file on its own.
        self._state = _SinkState.ABORTED
        self._finish()
        if self._error is not None:
            logger.warning(
                "Parquet sink %r: writing failed (%s); %r holds what was written.",
                str(self.path),
                self._error,
                str(self.partial_path),
            )

    def read_back(self, schema: pa.Schema) -> pa.RecordBatchReader:
        """The rows written, read lazily; ``schema`` serves when nothing was written.

        Called before :meth:`close` or :meth:`abort`, it finishes the file without deciding
        where it ends up: the reader reads it from wherever it is when first pulled.
        """
        # A run that wrote no rows still leaves a file with its schema.
        opened_now = self._schema is None and self._state is not _SinkState.ABORTED
        if opened_now:
            self._open(schema)
        self._finish()
        self._raise_error()
        if self._state is _SinkState.OPEN:
            self._state = _SinkState.FINISHED
        elif opened_now and self._state is _SinkState.CLOSED:
            self._publish()
        if self._schema is None:
            return reader_with_num_rows(schema, [], 0)
        return reader_with_num_rows(self._schema, self._read_file(self._schema), self.num_rows)

    def _read_file(self, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
        location = self.path if self._state is _SinkState.CLOSED else self.partial_path
        yield from _read_batches([location], schema, batch_size=65_536)


def as_sink(sink: object) -> Sink | None:
    """The sink a run option names: a path means a :class:`ParquetSink`."""
    if sink is None or isinstance(sink, Sink):
        return sink
    if isinstance(sink, str | PathLike):
        return ParquetSink(sink)
    missing = [
        name
        for name in ("write", "close", "abort", "read_back")
        if not callable(getattr(sink, name, None))
    ]
    raise ConfigurationError(
        f"sink= takes a Parquet path or an object with write, close, abort and read_back; "
        f"{type(sink).__name__} lacks {', '.join(missing)}."
    )
