"""Partitioned Parquet datasets written stream by stream: the writer behind
``ParquetSink(partition_by=, max_rows_per_file=)``."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from arrowflow._filesystems import SUCCESS, fsync, make_parent, remove, touch
from arrowflow.exceptions import ExecutionError

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

__all__ = ["DatasetWriter", "check_partition_by", "repeat", "value_type"]

#: Files a dataset sink keeps open at once: past it, the least recently written is finished
#: and its partition goes on in a new file (an upload to an object store holds a part, 5 to
#: 10 MB, in memory for each open file).
MAX_OPEN_FILES = 32


class DatasetWriter:
    """Writes a sink's tables as files under its ``<path>.partial``, on the sink's thread: a
    directory per partition (``<column>=<value>/...``), ``part-00000.parquet``,
    ``part-00001.parquet``... in each, a file finished once it holds ``max_rows_per_file``."""

    def __init__(
        self,
        filesystem: pafs.FileSystem,
        root: str,
        schema: pa.Schema,
        partition_by: tuple[str, ...],
        max_rows: int | None,
        compression: str,
    ) -> None:
        self.filesystem, self.root = filesystem, root
        self.partition_by, self.max_rows, self.compression = partition_by, max_rows, compression
        self.file_schema = pa.schema(
            [field for field in schema if field.name not in partition_by], metadata=schema.metadata
        )
        #: Each file's path under the root and partition values, in the order started.
        self.files: list[tuple[str, dict[str, pa.Scalar]]] = []
        self._open: dict[str, tuple[Any, int]] = {}  # by directory, least recently written first
        self._started: dict[str, int] = {}

    def write_table(self, table: pa.Table) -> None:
        for directory, values, rows in partitions(table, self.partition_by):
            self._append(directory, values, rows.drop_columns(list(self.partition_by)))

    def _append(self, directory: str, values: dict[str, pa.Scalar], table: pa.Table) -> None:
        offset = 0
        while offset < table.num_rows:
            opened = self._open.pop(directory) if directory in self._open else None
            writer, rows = opened or self._start(directory, values)
            size = table.num_rows - offset
            if self.max_rows is not None:
                size = min(size, self.max_rows - rows)
            writer.write_table(table.slice(offset, size))
            offset, rows = offset + size, rows + size
            if self.max_rows is not None and rows >= self.max_rows:
                writer.close()
            else:
                self._open[directory] = (writer, rows)

    def _start(self, directory: str, values: dict[str, pa.Scalar]) -> tuple[Any, int]:
        while len(self._open) >= MAX_OPEN_FILES:
            self._open.pop(next(iter(self._open)))[0].close()
        number = self._started.get(directory, 0)
        self._started[directory] = number + 1
        name = f"part-{number:05d}.parquet"
        relative = f"{directory}/{name}" if directory else name
        path = f"{self.root}/{relative}"
        make_parent(self.filesystem, path)
        writer = pq.ParquetWriter(
            path, self.file_schema, compression=self.compression, filesystem=self.filesystem
        )
        self.files.append((relative, values))
        return writer, 0

    def close(self) -> None:
        if not self.files and not self.partition_by:
            # No rows: one file with the schema, as a single-file sink leaves.
            self._open[""] = self._start("", {})
        with contextlib.ExitStack() as stack:
            for writer, _ in self._open.values():
                stack.callback(writer.close)
            self._open.clear()

    def publish(self, target: str) -> None:
        """Move the finished dataset from the root to ``target`` (see :class:`ParquetSink`)."""
        filesystem, root = self.filesystem, self.root
        if isinstance(filesystem, pafs.LocalFileSystem):
            for relative, _ in self.files:
                fsync(f"{root}/{relative}")
            touch(filesystem, f"{root}/{SUCCESS}")
            aside = f"{target}.replaced"
            remove(filesystem, aside)
            if filesystem.get_file_info(target).type != pafs.FileType.NotFound:
                os.replace(target, aside)
            os.replace(root, target)
            remove(filesystem, aside)
            return
        remove(filesystem, target)
        for relative, _ in self.files:
            make_parent(filesystem, f"{target}/{relative}")
            filesystem.copy_file(f"{root}/{relative}", f"{target}/{relative}")
        touch(filesystem, f"{target}/{SUCCESS}")


def partitions(
    table: pa.Table, names: Sequence[str]
) -> Iterator[tuple[str, dict[str, pa.Scalar], pa.Table]]:
    """``table``'s rows grouped by their values in the ``names`` columns, each group in table
    order, with its directory (``country=FR/year=2024``) and its values."""
    if not names:
        yield "", {}, table
        return
    if not table.num_rows:
        return
    import numpy as np

    keys, codes = [], np.zeros(table.num_rows, dtype=np.int64)
    for name in names:
        column = table[name]
        keys.append(column := column.cast(value_type(column.type)).combine_chunks())
        encoded = pc.dictionary_encode(column, null_encoding="encode")
        indices = encoded.indices.to_numpy(zero_copy_only=False)
        # Numbered densely again, so that the codes of several columns never overflow.
        codes = np.unique(codes * len(encoded.dictionary) + indices, return_inverse=True)[1]
    order = np.argsort(codes, kind="stable")
    for rows in np.split(order, np.flatnonzero(np.diff(codes[order])) + 1):
        # Taken (copied): a scalar of the column would keep the whole stream's column alive.
        first = pa.array([rows[0]])
        values = {name: key.take(first)[0] for name, key in zip(names, keys, strict=True)}
        directory = "/".join(f"{name}={hive_value(value)}" for name, value in values.items())
        yield directory, values, table if len(rows) == len(order) else table.take(rows)


def hive_value(value: pa.Scalar) -> str:
    if not value.is_valid:
        return "__HIVE_DEFAULT_PARTITION__"  # what pyarrow, Spark and Hive read as null
    return quote(str(value.cast(pa.string()).as_py()), safe="")


def check_partition_by(schema: pa.Schema, names: Sequence[str], shown: str) -> None:
    missing = [name for name in names if name not in schema.names]
    nested = [
        name
        for name in names
        if name not in missing and pa.types.is_nested(value_type(schema.field(name).type))
    ]
    if missing:
        problem = f"partition_by names {', '.join(map(repr, missing))}: no such column"
    elif nested:
        problem = f"cannot partition by {', '.join(map(repr, nested))}, whose values are nested"
    elif len(set(names)) == len(schema.names):
        problem = "partition_by names every column: leave one to write in the files"
    else:
        return
    raise ExecutionError(f"Parquet sink {shown!r}: {problem} (columns: {', '.join(schema.names)}).")


def value_type(kind: pa.DataType) -> pa.DataType:
    return kind.value_type if pa.types.is_dictionary(kind) else kind


def repeat(value: pa.Scalar, kind: pa.DataType, num_rows: int) -> pa.Array:
    """``value`` ``num_rows`` times, as ``kind``."""
    if not value.is_valid:
        return pa.nulls(num_rows, kind)
    return pa.nulls(num_rows, value.type).fill_null(value).cast(kind)
