"""What counts as a table, and how anything Arrow-shaped becomes one without a copy.

Rules (DESIGN §1, §4):

- ``pa.Table`` is used as it is; ``pa.RecordBatch`` is wrapped (no copy).
- ``pa.RecordBatchReader`` stays a reader: the executor pulls its batches lazily.
- Objects exporting ``__arrow_c_stream__``: in-memory data frames (polars, pandas) are
  converted to a ``pa.Table`` (zero-copy where their buffers allow) so the number of rows, and
  therefore of streams, is known up front; any other exporter (a DuckDB relation, a dataset
  scanner…) is read lazily as a ``RecordBatchReader``, since computing its length may run it.
- Objects exporting only ``__arrow_c_array__`` become a one-batch table.
- A list of dicts is tabular only where the caller says so (the field named by ``over=``); an
  empty list is a table with no rows and no columns.
"""

from __future__ import annotations

from typing import Any, TypeGuard

import pyarrow as pa

__all__ = [
    "describe",
    "is_tabular",
    "to_table",
    "to_table_or_reader",
]

# Libraries whose data frames live in memory: their length is free, so converting them to a
# table up front is cheap and gives every stream its total. Matched on the module name so that
# checking never imports them.
_IN_MEMORY_FRAME_MODULES = ("polars", "pandas")


def is_tabular(value: Any, *, allow_records: bool = False) -> bool:
    """Whether ``value`` is Arrow-shaped (or, when ``allow_records``, a list of dicts)."""
    if isinstance(value, pa.Table | pa.RecordBatch | pa.RecordBatchReader):
        return True
    if isinstance(value, type):
        return False
    if hasattr(value, "__arrow_c_stream__") or hasattr(value, "__arrow_c_array__"):
        return True
    return allow_records and _is_records(value)


def _is_records(value: Any) -> TypeGuard[list[dict[str, Any]]]:
    # A list of dicts: only the first element is checked; pyarrow reports any later mismatch.
    return isinstance(value, list) and (not value or isinstance(value[0], dict))


def _is_in_memory_frame(value: Any) -> bool:
    module = type(value).__module__.partition(".")[0]
    return module in _IN_MEMORY_FRAME_MODULES


def to_table_or_reader(value: Any) -> pa.Table | pa.RecordBatchReader:
    """Convert a tabular value, keeping lazy sources lazy (see the module docstring)."""
    if isinstance(value, pa.Table | pa.RecordBatchReader):
        return value
    if isinstance(value, pa.RecordBatch):
        return pa.Table.from_batches([value])
    if hasattr(value, "__arrow_c_stream__"):
        if _is_in_memory_frame(value):
            return pa.table(value)
        return pa.RecordBatchReader.from_stream(value)
    if hasattr(value, "__arrow_c_array__"):
        return pa.Table.from_batches([pa.record_batch(value)])
    if _is_records(value):
        return pa.Table.from_pylist(value) if value else pa.table({})
    raise TypeError(f"expected an Arrow table or something Arrow-shaped, got {describe(value)}")


def to_table(value: Any) -> pa.Table:
    """Convert a tabular value to a ``pa.Table``, reading a lazy source to its end."""
    converted = to_table_or_reader(value)
    if isinstance(converted, pa.RecordBatchReader):
        return converted.read_all()
    return converted


def describe(value: Any) -> str:
    """A short description of a value's type for error messages: ``int``, ``polars.DataFrame``."""
    kind = type(value)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
