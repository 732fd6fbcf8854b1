"""Parquet in and out: read a file whole, scan it lazily, write streams as they complete."""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.parquet as pq

from arrowflow.exceptions import ConfigurationError, ExecutionError

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

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
    """Scan a Parquet file or dataset lazily: batches are read only as they are pulled.

    Streaming a scope over the returned reader keeps memory bounded by a few streams, whatever
    the file's size.

    Example:
        >>> import arrowflow as af, pyarrow as pa, pyarrow.parquet as pq
        >>> pq.write_table(pa.table({"id": range(10)}), "/tmp/arrowflow_doc_scan.parquet")
        >>> af.scan_parquet("/tmp/arrowflow_doc_scan.parquet").read_all().num_rows
        10
    """
    # pyarrow.dataset imports pandas when it is installed: import it only when scanning.
    import pyarrow.dataset as ds

    try:
        dataset = ds.dataset(path, format="parquet")
        scanner = dataset.scanner(
            columns=list(columns) if columns is not None else None, batch_size=batch_size
        )
        return scanner.to_reader()
    except (OSError, pa.ArrowInvalid) as exc:
        raise ExecutionError(f"cannot scan Parquet {str(path)!r}: {exc}") from exc


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

    The file's schema is the first stream's; a later stream with the same columns (in any
    order) is cast to it, anything else is an ``ExecutionError``. Streams without rows are not
    written. The file is complete when the run ends; reading it back is lazy
    (:func:`scan_parquet`).

    Example:
        >>> import arrowflow as af, pyarrow as pa
        >>> sink = af.ParquetSink("/tmp/arrowflow_doc_sink.parquet")
        >>> sink.write(pa.table({"id": [1, 2]})); sink.write(pa.table({"id": [3]}))
        >>> sink.close()
        >>> sink.read_back(pa.schema([])).read_all()["id"].to_pylist()
        [1, 2, 3]
    """

    def __init__(self, path: str | os.PathLike[str], *, compression: str = "zstd") -> None:
        self.path = Path(path)
        self.compression = compression
        self.num_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None

    def write(self, table: pa.Table) -> None:
        if self._writer is None or self._schema is None:
            self._open(table.schema)
        elif not table.schema.equals(self._schema):
            if not table.num_rows:
                return
            table = self._conform(table, self._schema)
        assert self._writer is not None
        self._writer.write_table(table)
        self.num_rows += table.num_rows

    def _open(self, schema: pa.Schema) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self.path, schema, compression=self.compression)
        self._schema = schema

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
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def read_back(self, schema: pa.Schema) -> pa.RecordBatchReader:
        self.close()
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
