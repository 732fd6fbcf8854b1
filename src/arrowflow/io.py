"""Parquet in: read a file whole, or scan it lazily as a ``RecordBatchReader``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from arrowflow.exceptions import ExecutionError

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

__all__ = ["read_parquet", "scan_parquet"]


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
    try:
        dataset = ds.dataset(path, format="parquet")
        scanner = dataset.scanner(
            columns=list(columns) if columns is not None else None, batch_size=batch_size
        )
        return scanner.to_reader()
    except (OSError, pa.ArrowInvalid) as exc:
        raise ExecutionError(f"cannot scan Parquet {str(path)!r}: {exc}") from exc
