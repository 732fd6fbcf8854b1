"""Checks on the key column of a state store's input, vectorised.

Keys are compared by value: a dictionary-encoded key column (a pandas ``Categorical``, a polars
``Categorical``) is decoded first, so two codes of one value are one key, whatever the order of
the categories.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from arrowflow._tabular import decoded
from arrowflow.exceptions import ExecutionError

__all__ = ["check_keys", "key_column"]

_SHOWN = 5


def key_column(table: pa.Table, key: str, where: str) -> pa.ChunkedArray:
    """``table[key]``, or an ``ExecutionError`` naming the columns there are."""
    if key not in table.column_names:
        columns = ", ".join(table.column_names) or "none"
        raise ExecutionError(
            f"{where}: key column '{key}' is missing (columns: {columns}). Give the store the "
            "key= of a column of the input, or add the column before the scope."
        )
    return table[key]


def check_keys(keys: pa.ChunkedArray, key: str, where: str) -> None:
    """Refuse null and duplicate keys: a row is only found again by its key.

    Keys already in increasing order are checked in one comparison; otherwise by hashing.
    """
    keys = decoded(keys)
    if keys.null_count:
        nulls = keys.null_count
        rows = _listed(pc.indices_nonzero(pc.is_null(keys))[:_SHOWN].to_pylist(), nulls)
        raise ExecutionError(
            f"{where}: key column '{key}' has {nulls} null value(s) (rows {rows}). Every row "
            "needs a key: fill or drop those rows before the scope."
        )
    if len(keys) < 2 or _is_increasing(keys) or len(pc.unique(keys)) == len(keys):
        return
    counts = pc.value_counts(keys)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    shown = [
        f"{item['values']!r} ({item['counts']} times)" for item in repeated[:_SHOWN].to_pylist()
    ]
    listed = _listed(shown, len(repeated))
    raise ExecutionError(
        f"{where}: key column '{key}' has {len(repeated)} duplicate key(s): {listed}. Keys must be "
        "unique in the input: deduplicate it, or choose another key=."
    )


def _is_increasing(keys: pa.ChunkedArray) -> bool:
    try:
        ordered = pc.all(pc.greater(keys[1:], keys[:-1])).as_py()
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
        return False
    return bool(ordered)


def _listed(items: list[Any], total: int) -> str:
    return ", ".join(str(item) for item in items) + (", ..." if total > len(items) else "")
