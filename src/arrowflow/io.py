"""Parquet in and out: read a file or a dataset whole, scan it lazily, write streams as they
complete, on a local disk or an object store."""

from __future__ import annotations

import enum
import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from arrowflow._datasets import DatasetWriter, check_partition_by, repeat
from arrowflow._filesystems import (
    fsync,
    is_object_store,
    make_parent,
    remove,
    resolve,
)
from arrowflow._row_counts import reader_with_num_rows
from arrowflow.exceptions import ConfigurationError, ExecutionError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

__all__ = ["ParquetSink", "Sink", "as_sink", "read_parquet", "scan_parquet"]

logger = logging.getLogger("arrowflow")

#: What pyarrow raises for a file it cannot open, read or cast.
_READ_ERRORS = (OSError, pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError)


def _check_filter(filter: pc.Expression | None) -> None:
    if filter is not None and not isinstance(filter, pc.Expression):
        raise ConfigurationError(
            f"filter= takes a pyarrow.compute Expression, not {type(filter).__name__}: "
            "e.g. pc.field('year') == 2024."
        )


# --------------------------------------------------------------------------- reading


def read_parquet(
    path: str | os.PathLike[str],
    columns: Sequence[str] | None = None,
    *,
    filter: pc.Expression | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> pa.Table:
    """Read a Parquet file, or a directory of them, into a ``pa.Table``.

    ``path`` is local, a ``file://``, ``s3://``, ``gs://`` or ``abfs://`` URI, or a path
    inside ``filesystem``. A hive-partitioned directory (``year=2024/...``) gives its
    partition columns as columns. ``filter`` keeps the rows it is true for, and skips the
    files and row groups whose partition values and statistics rule it out.

    Example:
        >>> import arrowflow as af, pyarrow as pa, pyarrow.parquet as pq
        >>> pq.write_table(pa.table({"id": [1, 2]}), "doc.parquet")
        >>> af.read_parquet("doc.parquet").num_rows
        2
    """
    _check_filter(filter)
    filesystem, location = resolve(path, filesystem)
    try:
        return pq.read_table(
            location,
            columns=list(columns) if columns is not None else None,
            filters=filter,
            filesystem=filesystem,
        )
    except _READ_ERRORS as exc:
        raise ExecutionError(f"cannot read Parquet {os.fspath(path)!r}: {exc}") from exc


def scan_parquet(
    path: str | os.PathLike[str],
    columns: Sequence[str] | None = None,
    batch_size: int = 65_536,
    *,
    filter: pc.Expression | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> pa.RecordBatchReader:
    """Scan a Parquet file, or a directory of them, lazily as a ``RecordBatchReader``.

    ``path`` is local, a ``file://``, ``s3://``, ``gs://`` or ``abfs://`` URI (options such
    as ``?region=`` or ``?endpoint_override=`` in its query), or a path inside
    ``filesystem``. A hive-partitioned directory (``year=2024/...``) gives its partition
    columns as columns (types inferred from the names: ``int32``, else ``string``).

    Batches are read only as they are pulled (files in name order, hidden files and those
    starting with ``_`` skipped), so a scope streaming over the reader holds a few streams in
    memory whatever the data's size. Every file's footer is read up front, and nothing else: the
    reader knows its row count, so a run over it shows its total number of streams (in
    ``_batch_metadata``, hooks and the progress bar) from the first stream; a file that cannot
    be opened as Parquet is an ``ExecutionError`` right away. The schema is the first file's; a
    later file with the columns selected is cast to it, anything else is an ``ExecutionError``
    naming the file when the run reaches it.

    ``filter`` (a ``pyarrow.compute`` expression, which may name partition columns) keeps the
    rows it is true for. It is pushed down: files whose partition values rule it out are
    never opened, and row groups whose statistics rule it out are never read. The row count is
    then known when the partitions and statistics decide the filter for every row group kept
    (a filter on partition columns, say), and unknown otherwise (the total shows once the
    input is read).

    Example:
        >>> import arrowflow as af, pyarrow as pa, pyarrow.compute as pc, pyarrow.parquet as pq
        >>> pq.write_table(pa.table({"id": range(10)}), "doc_scan.parquet")
        >>> af.scan_parquet("doc_scan.parquet").read_all().num_rows
        10
        >>> af.scan_parquet("doc_scan.parquet", filter=pc.field("id") >= 7).read_all().num_rows
        3
    """
    import pyarrow.dataset as ds

    _check_filter(filter)
    shown = os.fspath(path)
    filesystem, location = resolve(path, filesystem)
    files, partitioned = _parquet_files(filesystem, location, shown)
    try:
        dataset = ds.dataset(
            files,
            filesystem=filesystem,
            format="parquet",
            partitioning="hive" if partitioned else None,
            partition_base_dir=location if partitioned else None,
        )
        fragments = list(dataset.get_fragments(filter=filter))
    except _READ_ERRORS as exc:
        raise ExecutionError(f"cannot scan Parquet {shown!r}: {exc}") from exc
    schema = dataset.schema
    if columns is not None:
        missing = [name for name in columns if name not in schema.names]
        if missing:
            raise ExecutionError(
                f"Parquet {shown!r} has no column {', '.join(map(repr, missing))} "
                f"(columns: {', '.join(schema.names)})."
            )
    selected = list(columns) if columns is not None else schema.names
    parts = [(fragment.path, fragment.partition_expression) for fragment in fragments]
    batches = _scan_batches(filesystem, parts, schema, selected, filter, batch_size)
    output = pa.schema([schema.field(name) for name in selected], metadata=schema.metadata)
    # Footers only: a file's row count is in its footer, whatever the columns selected.
    with ThreadPoolExecutor(min(16, len(fragments) or 1)) as pool:
        counts = list(pool.map(partial(_footer_rows, schema=schema, filter=filter), fragments))
    if None in counts:
        return pa.RecordBatchReader.from_batches(output, batches)
    read_column = partial(_read_column, filesystem, parts, schema, filter)
    return reader_with_num_rows(output, batches, sum(count or 0 for count in counts), read_column)


def _parquet_files(
    filesystem: pafs.FileSystem, location: str, shown: str
) -> tuple[list[str], bool]:
    """The Parquet files at ``location`` in name order, and whether it is a directory."""
    try:
        kind = filesystem.get_file_info(location).type
        if kind == pafs.FileType.File:
            return [location], False
        if kind != pafs.FileType.Directory:
            raise ExecutionError(f"cannot scan Parquet {shown!r}: no such file or directory.")
        listing = filesystem.get_file_info(pafs.FileSelector(location, recursive=True))
    except OSError as exc:
        raise ExecutionError(f"cannot scan Parquet {shown!r}: {exc}") from exc
    files = sorted(
        (info.path for info in listing if info.is_file and info.base_name[:1] not in "_."),
        key=lambda name: name.split("/"),
    )
    if not files:
        raise ExecutionError(f"cannot scan Parquet {shown!r}: the directory holds no file.")
    return files, True


def _footer_rows(fragment: Any, schema: pa.Schema, filter: pc.Expression | None) -> int | None:
    """The rows a scan yields from ``fragment``, from its footer: ``None`` when the statistics
    leave a row group the filter keeps part of (its rows are known only once read)."""
    try:
        fragment.ensure_complete_metadata()
        if filter is None:
            return fragment.metadata.num_rows  # type: ignore[no-any-return]
        kept = fragment.subset(filter, schema=schema).row_groups
        # Row groups where the filter may be false or null for some row.
        doubtful = fragment.subset(~filter | filter.is_null(), schema=schema).row_groups
    except _READ_ERRORS as exc:
        raise ExecutionError(f"cannot read Parquet file {fragment.path!r}: {exc}") from exc
    if {group.id for group in kept} & {group.id for group in doubtful}:
        return None
    return sum(int(group.num_rows) for group in kept)


def _scan_batches(
    filesystem: pafs.FileSystem,
    parts: Sequence[tuple[str, Any]],
    schema: pa.Schema,
    columns: list[str],
    filter: pc.Expression | None,
    batch_size: int,
) -> Iterator[pa.RecordBatch]:
    """The ``columns`` of the rows of each file (path, partition expression) that ``filter``
    keeps, typed as in ``schema``, from the files as they are when reached."""
    import pyarrow.dataset as ds

    parquet_format = ds.ParquetFileFormat()
    # One file at a time, no pre-buffering, no read-ahead and no threads: only the row group
    # being decoded is held, which is what keeps a scan's memory flat.
    options = ds.ParquetFragmentScanOptions(pre_buffer=False)
    for path, partition in parts:
        fragment = _open_fragment(parquet_format, filesystem, path, partition, schema, columns)
        if filter is not None:
            fragment = fragment.subset(filter, schema=schema)
        try:
            for batch in fragment.to_batches(
                schema=schema,
                columns=columns,
                filter=filter,
                batch_size=batch_size,
                batch_readahead=0,
                fragment_readahead=0,
                fragment_scan_options=options,
                use_threads=False,
            ):
                if batch.num_rows:
                    yield batch
        except _READ_ERRORS as exc:
            exc.add_note(f"reading Parquet file {path!r}")
            raise


def _open_fragment(
    parquet_format: Any,
    filesystem: pafs.FileSystem,
    path: str,
    partition: Any,
    schema: pa.Schema,
    columns: list[str],
) -> Any:
    """The file at ``path`` as a dataset fragment, its footer read and its columns checked."""
    import pyarrow.dataset as ds

    try:
        fragment = parquet_format.make_fragment(path, filesystem, partition)
        physical = fragment.physical_schema
    except _READ_ERRORS as exc:
        raise ExecutionError(f"cannot read Parquet file {path!r}: {exc}") from exc
    from_path = ds.get_partition_keys(fragment.partition_expression)
    stored = [name for name in columns if name not in from_path]
    try:
        target = pa.schema([schema.field(name) for name in stored])
        physical.empty_table().select(stored).cast(target)
    except (KeyError, *_READ_ERRORS) as exc:
        raise ExecutionError(
            f"Parquet file {path!r} does not match the first file's schema ({exc}).\n"
            f"first: {schema}\nthis file: {physical}"
        ) from exc
    return fragment


def _read_column(
    filesystem: pafs.FileSystem,
    parts: Sequence[tuple[str, Any]],
    schema: pa.Schema,
    filter: pc.Expression | None,
    name: str,
) -> pa.ChunkedArray:
    """Column ``name`` of every row the scan yields, alone (a state store reads the keys of
    the whole input this way)."""
    batches = _scan_batches(filesystem, parts, schema, [name], filter, batch_size=1 << 20)
    return pa.chunked_array([batch.column(0) for batch in batches], schema.field(name).type)


# --------------------------------------------------------------------------- writing


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
    """Write each stream as it completes, in order and in bounded memory, to one Parquet file
    or to a dataset of them.

    ``path`` is local, a ``file://``, ``s3://``, ``gs://`` or ``abfs://`` URI, or a path inside
    ``filesystem``. Writing (encoding, compressing, uploading) happens on a thread of its own,
    one table behind the run at most, so it overlaps with the next streams' work. The schema is
    the first stream's; a later stream with the same columns (in any order) is cast to it,
    anything else is an ``ExecutionError``. Streams without rows are not written.

    With ``partition_by`` or ``max_rows_per_file``, ``path`` is a directory, written and
    published as a whole. ``partition_by`` sends each row to
    ``path/<column>=<value>/part-00000.parquet`` by its values in those columns (hive style:
    the files leave them out, :func:`scan_parquet` gives them back), in run order within each
    file. A file that reaches ``max_rows_per_file`` rows is finished and the next rows go to
    ``part-00001.parquet``, and so on. The directory replaces whatever was at ``path``, and
    holds a ``_SUCCESS`` file (which readers skip) once complete.

    The output never looks complete unless the run was. While the run writes, it is at
    ``<path>.partial`` (:attr:`partial_path`, e.g. ``out.parquet.partial``), so a process
    killed outright leaves only that name, unreadable or partial, never ``path``; what is at
    ``path`` stays as it was until then. The run ends with one of:

    - :meth:`close` (the run succeeded): what is queued is written, the files are finished
      and published at ``path``, replacing any earlier output there (if writing failed, it
      raises and keeps the output as ``abort`` does). Closing a sink nothing was written to
      removes a stale ``<path>.partial`` left by an earlier killed run.
    - :meth:`abort` (the run failed, was interrupted or was stopped early): the sink's thread
      writes the streams already handed to it (two at most) and the files' footers, and the
      output stays at ``<path>.partial``: readable Parquet of the streams written before the
      run stopped. It waits for nothing else, and leaves ``path`` untouched.

    Each is idempotent and, once either has run, the other does nothing. :meth:`read_back`
    reads the rows written lazily, from wherever they are when the reader is first pulled (a
    dataset file by file, in the order they were started, with the partition columns as
    written). :attr:`path` and :attr:`partial_path` are ``Path`` objects on a local disk, paths
    inside :attr:`filesystem` (``bucket/key``) elsewhere.

    Publishing on a local disk is one atomic rename, once the data is flushed to the disk (a
    dataset replacing an earlier one renames that one away first). An object store renames
    nothing: each file is copied from ``<path>.partial`` to its final key, where it appears
    whole or not at all, and ``<path>.partial`` is deleted after; a dataset first deletes the
    earlier one under ``path``, and writes ``_SUCCESS`` after its last file. A reader listing
    ``path`` during the copy, or after a crash in it, may see some files and not others: a
    dataset is complete once ``_SUCCESS`` is there, and until then ``<path>.partial`` holds
    the whole output. A process killed while writing leaves unfinished multipart uploads, which
    no reader sees (a bucket lifecycle rule removes them).

    Example:
        >>> import arrowflow as af, pyarrow as pa
        >>> sink = af.ParquetSink("doc_sink.parquet")
        >>> sink.write(pa.table({"id": [1, 2]})); sink.write(pa.table({"id": [3]}))
        >>> sink.close()
        >>> sink.read_back(pa.schema([])).read_all()["id"].to_pylist()
        [1, 2, 3]
        >>> sink = af.ParquetSink("doc_sink", partition_by=["year"], max_rows_per_file=2)
        >>> sink.write(pa.table({"year": [2024, 2025, 2024, 2024], "id": [1, 2, 3, 4]}))
        >>> sink.close()
        >>> sorted(str(p) for p in sink.path.rglob("*.parquet"))  # doctest: +NORMALIZE_WHITESPACE
        ['doc_sink/year=2024/part-00000.parquet', 'doc_sink/year=2024/part-00001.parquet',
         'doc_sink/year=2025/part-00000.parquet']
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        compression: str = "snappy",
        partition_by: Sequence[str] | None = None,
        max_rows_per_file: int | None = None,
        filesystem: pafs.FileSystem | None = None,
    ) -> None:
        self.filesystem, self._target = resolve(path, filesystem)
        self._staging = f"{self._target}.partial"
        self._shown = os.fspath(path)
        self.path: Path | str
        self.partial_path: Path | str
        if isinstance(self.filesystem, pafs.LocalFileSystem):
            self.path = Path(self._target if "://" in self._shown else path)
            self.partial_path = self.path.with_name(f"{self.path.name}.partial")
        elif is_object_store(self.filesystem) and "/" not in self._target.strip("/"):
            raise ConfigurationError(
                f"Parquet sink {self._shown!r}: give a key under the bucket or container "
                f"(e.g. '{self._target.strip('/')}/out.parquet'), not the bucket itself."
            )
        else:
            self.path, self.partial_path = self._target, self._staging
        if isinstance(partition_by, str):
            partition_by = [partition_by]
        self.partition_by = tuple(partition_by or ())
        if max_rows_per_file is not None and (
            isinstance(max_rows_per_file, bool)
            or not isinstance(max_rows_per_file, int)
            or max_rows_per_file < 1
        ):
            raise ConfigurationError(
                f"max_rows_per_file takes a positive number of rows, not {max_rows_per_file!r}."
            )
        self.max_rows_per_file = max_rows_per_file
        self.is_dataset = bool(self.partition_by) or max_rows_per_file is not None
        self.compression = compression
        self.num_rows = 0
        self._state = _SinkState.OPEN
        self._schema: pa.Schema | None = None
        self._writer: DatasetWriter | pq.ParquetWriter | None = None
        self._pending: queue.Queue[pa.Table | None] = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, table: pa.Table) -> None:
        """Queue one stream's rows; blocks while the writer is a table behind."""
        if self._state is not _SinkState.OPEN:
            raise ExecutionError(
                f"Parquet sink {self._shown!r} is {self._state.value}: it takes no more "
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
        filesystem, staging = self.filesystem, self._staging
        if self.is_dataset:
            check_partition_by(schema, self.partition_by, self._shown)
        try:
            # A stale partial output, left by an earlier killed run, goes.
            remove(filesystem, staging)
            writer: DatasetWriter | pq.ParquetWriter
            if self.is_dataset:
                if not is_object_store(filesystem):
                    filesystem.create_dir(staging, recursive=True)
                writer = DatasetWriter(
                    filesystem,
                    staging,
                    schema,
                    self.partition_by,
                    self.max_rows_per_file,
                    self.compression,
                )
            else:
                make_parent(filesystem, staging)
                writer = pq.ParquetWriter(
                    staging, schema, compression=self.compression, filesystem=filesystem
                )
        except (OSError, pa.ArrowException) as exc:
            raise ExecutionError(
                f"Parquet sink {self._shown!r}: cannot start writing at {staging!r}: {exc}"
            ) from exc
        self._schema, self._writer = schema, writer
        self._thread = threading.Thread(
            target=self._write_pending, args=(writer,), name="arrowflow-parquet-sink", daemon=True
        )
        self._thread.start()

    def _write_pending(self, writer: DatasetWriter | pq.ParquetWriter) -> None:
        # Only this thread touches the writer, footers included: whoever stops waiting for it
        # (a second Ctrl-C) cannot close a file under a write in progress.
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
                f"Parquet sink {self._shown!r}: writing failed: {self._error}"
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
            f"Parquet sink {self._shown!r}: a stream's columns do not match the file's "
            f"({problem}).\nfile: {schema}\nstream: {table.schema}\nReturn the same columns "
            "from every stream."
        )

    def _finish(self) -> None:
        """Let the thread write what it was given and the footers; the output stays partial."""
        thread = self._thread
        if thread is None:
            return
        if thread.is_alive():
            self._pending.put(None)
        thread.join()
        self._thread = None

    def close(self) -> None:
        """The run succeeded: write what is queued, finish the output and publish it at ``path``.

        A sink that failed to write is aborted instead, and the failure raised.
        """
        if self._state in (_SinkState.CLOSED, _SinkState.ABORTED):
            return
        self._finish()
        if self._error is not None:
            self._state = _SinkState.ABORTED
            self._raise_error()
        if self._schema is None:
            remove(self.filesystem, self._staging)
        else:
            self._publish()
        self._state = _SinkState.CLOSED

    def _publish(self) -> None:
        filesystem = self.filesystem
        local = isinstance(filesystem, pafs.LocalFileSystem)
        try:
            if isinstance(self._writer, DatasetWriter):
                self._writer.publish(self._target)
            elif local:
                # Flushed before the rename: after a power cut, ``path`` must not name a file
                # whose data never reached the disk.
                fsync(self._staging)
                os.replace(self._staging, self._target)
            else:
                make_parent(filesystem, self._target)
                filesystem.copy_file(self._staging, self._target)
        except (OSError, pa.ArrowException) as exc:
            self._state = _SinkState.ABORTED
            raise ExecutionError(
                f"Parquet sink: cannot move {self._staging!r} to {self._target!r} ({exc}); the "
                "output is complete under the first name."
            ) from exc
        if not local:
            try:
                remove(filesystem, self._staging)
            except OSError as exc:  # the output is published: a leftover copy is no failure
                logger.warning(
                    "Parquet sink %r: cannot delete %r: %s", self._shown, self._staging, exc
                )

    def abort(self) -> None:
        """The run did not succeed: finish what was written and keep it at ``<path>.partial``.

        Prompt (it waits only for the sink's thread to write the streams already handed to it),
        idempotent, and a no-op after :meth:`close`. A failure to write is logged, not raised:
        the run is already ending on an error of its own.
        """
        if self._state in (_SinkState.CLOSED, _SinkState.ABORTED):
            return
        # Set first: an abort interrupted while it waits is still an abort, and the thread
        # finishes the files on its own.
        self._state = _SinkState.ABORTED
        self._finish()
        if self._error is not None:
            logger.warning(
                "Parquet sink %r: writing failed (%s); %r holds what was written.",
                self._shown,
                self._error,
                self._staging,
            )

    def read_back(self, schema: pa.Schema) -> pa.RecordBatchReader:
        """The rows written, read lazily; ``schema`` serves when nothing was written.

        Called before :meth:`close` or :meth:`abort`, it finishes the output without deciding
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
        return reader_with_num_rows(self._schema, self._read_written(self._schema), self.num_rows)

    def _read_written(self, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
        root = self._target if self._state is _SinkState.CLOSED else self._staging
        if not isinstance(self._writer, DatasetWriter):
            yield from _scan_batches(
                self.filesystem, [(root, None)], schema, schema.names, None, 65_536
            )
            return
        stored = self._writer.file_schema
        for relative, values in self._writer.files:
            path = [(f"{root}/{relative}", None)]
            for batch in _scan_batches(self.filesystem, path, stored, stored.names, None, 65_536):
                columns = [
                    repeat(values[field.name], field.type, batch.num_rows)
                    if field.name in values
                    else batch.column(field.name)
                    for field in schema
                ]
                yield pa.RecordBatch.from_arrays(columns, schema=schema)


def as_sink(sink: object) -> Sink | None:
    """The sink a run option names: ``"out.duckdb::table"`` means a
    :class:`~arrowflow.DuckDBSink` (the table is what follows the first ``::``), another path
    a :class:`ParquetSink`."""
    if sink is None or isinstance(sink, Sink):
        return sink
    # Not a URI's "::" ("s3://bucket/x?endpoint_override=[::1]:9000"): DuckDB files are local.
    if isinstance(sink, str) and "::" in sink and "://" not in sink.partition("::")[0]:
        from arrowflow.duckdb_sink import DuckDBSink  # on use: io.py needs no state package

        path, _, table = sink.partition("::")
        return DuckDBSink(path, table)
    if isinstance(sink, str | PathLike):
        return ParquetSink(sink)
    missing = [
        name
        for name in ("write", "close", "abort", "read_back")
        if not callable(getattr(sink, name, None))
    ]
    raise ConfigurationError(
        "sink= takes a Parquet path, 'file.duckdb::table', or an object with write, close, "
        f"abort and read_back; {type(sink).__name__} lacks {', '.join(missing)}."
    )
