"""Checks on the key column of a state store's input, vectorised.

Keys are compared by value: a dictionary-encoded key column (a pandas ``Categorical``, a polars
``Categorical``) is decoded first, so two codes of one value are one key, whatever the order of
the categories.

A key means what Arrow means, and DuckDB must mean the same: the uniqueness check hashes keys
with Arrow, the store joins them in DuckDB. So a key column must hold plain values that both
compare alike: integers, strings, binary, booleans, dates, times, timestamps or ``decimal128``
(or a dictionary of those). Every other type is refused by its type alone, before any row is
read, with a message saying what to cast to:

- floating-point keys (``float16``, ``float32``, ``float64``): Arrow tells ``0.0`` from ``-0.0``
  and one NaN from another, DuckDB does not, so a key could be skipped for another or stored
  twice. Ids read through pandas with missing values arrive as ``float64``: cast them to
  ``int64`` (or string) before the scope.
- nested keys (struct, list of any kind, map, union, run-end encoded) and the ``null`` type.
- types DuckDB stores otherwise than Arrow compares them: durations (stored as intervals, in
  microseconds), intervals (DuckDB equates 1 month and 30 days), ``decimal32``, ``decimal64``
  and ``decimal256``, and extension types (``uuid``, ``json``...).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from arrowflow._tabular import decoded
from arrowflow.exceptions import ExecutionError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["KeyOrder", "check_key_type", "check_keys", "key_column", "key_field"]

_SHOWN = 5
_TO_PLAIN = "Cast the column to int64 or string before the scope"


def key_column(table: pa.Table, key: str, where: str) -> pa.ChunkedArray:
    """``table[key]``; an ``ExecutionError`` if it is missing or of a type keys cannot have."""
    key_field(table.schema, key, where)
    return table[key]


def key_field(schema: pa.Schema, key: str, where: str) -> pa.Field:
    """The field of ``key`` in ``schema``, checked as :func:`key_column` checks its column.

    For a lazy input, whose schema is known before its rows.
    """
    if key not in schema.names:
        columns = ", ".join(schema.names) or "none"
        raise ExecutionError(
            f"{where}: key column '{key}' is missing (columns: {columns}). Give the store the "
            "key= of a column of the input, or add the column before the scope."
        )
    field = schema.field(key)
    check_key_type(field.type, key, where)
    return field


def check_key_type(key_type: pa.DataType, key: str, where: str) -> None:
    """Refuse a key type that Arrow and DuckDB would not compare alike (see the module rules)."""
    values = key_type.value_type if pa.types.is_dictionary(key_type) else key_type
    refusal = _refusal(values)
    if refusal is None:
        return
    why, advice = refusal
    if values is not key_type:
        why = f"a dictionary key is compared by its values, of type {values}, and {why}"
    raise ExecutionError(
        f"{where}: key column '{key}' has type {key_type}, which cannot be a key: {why}. {advice}."
    )


def check_keys(keys: pa.ChunkedArray, key: str, where: str) -> None:
    """Refuse keys of a type that cannot be a key, null keys and duplicate keys.

    A row is only found again by its key. Keys already in increasing order are checked in one
    comparison; otherwise by hashing.
    """
    check_key_type(keys.type, key, where)
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


class KeyOrder:
    """Checks a lazy input's keys stream by stream, keeping none, while they come in
    increasing order (so unique, none null); at the first stream that breaks the order, the
    whole key column is read and checked (:func:`check_keys`) once.

    Each stream's keys must increase within it, and its first key must be above the last key
    of the stream before it (and its last below the first of the stream after): whichever of
    two neighbours is checked second compares them, so streams may be checked in any order
    (several at once), and only the ends of streams whose neighbour is not checked yet are
    kept. A duplicate or a null is reported by the stream that finds it, before its agents run,
    and every stream checked after it is refused too: the input's keys cannot be trusted.
    """

    def __init__(self, read_all: Callable[[], pa.ChunkedArray | None], key: str) -> None:
        self._read_all = read_all
        self._key = key
        self._lock = threading.Lock()
        self._starts: dict[int, pa.Scalar] = {}  # by position: first key of the stream there
        self._ends: dict[int, pa.Scalar] = {}  # by position: last key of the stream ending there
        self._checked = False  # the whole column was read and found unique
        self._refusal: str | None = None  # or found not to be: why

    def check(self, offset: int, keys: pa.ChunkedArray, where: str) -> None:
        """Check the keys of the stream at ``offset``; ``ExecutionError`` if the input has
        null or duplicate keys."""
        if self._refusal is not None:  # the input's keys were refused: none can be trusted
            raise ExecutionError(f"{where}: refused with the rest of the input: {self._refusal}")
        if self._checked or not len(keys):
            return
        values = decoded(keys)
        if values.null_count or not _is_increasing(values):
            self._check_all(where)
            return
        first, last = values[0], values[-1]
        with self._lock:
            before = self._ends.pop(offset, None)
            after = self._starts.pop(offset + len(keys), None)
            if before is None:
                self._starts[offset] = first
            if after is None:
                self._ends[offset + len(keys)] = last
        if (before is not None and not _above(first, before)) or (
            after is not None and not _above(after, last)
        ):
            self._check_all(where)

    def _check_all(self, where: str) -> None:
        with self._lock:
            if self._checked:
                return
            if self._refusal is None:  # read once: later streams are refused with its reason
                self._refusal = self._refused(where)
                if self._refusal is None:
                    self._checked = True
                    self._starts.clear()
                    self._ends.clear()
                    return
            raise ExecutionError(self._refusal)

    def _refused(self, where: str) -> str | None:
        """Why the whole key column cannot be keys (the first stream that found it named),
        or ``None`` when it can."""
        keys = self._read_all()
        if keys is None:
            return (
                f"{where}: the input changed while it was read (its files hold another number "
                f"of rows), so its '{self._key}' keys cannot be checked. Rerun once the files "
                "stay as they are."
            )
        try:
            check_keys(keys, self._key, where)
        except ExecutionError as exc:
            return str(exc)
        return None


def _above(value: pa.Scalar, other: pa.Scalar) -> bool:
    return bool(pc.greater(value, other).as_py())


def _refusal(values: pa.DataType) -> tuple[str, str] | None:
    """Why values of this type cannot be keys, and what to do; ``None`` when they can."""
    if _is_plain(values):
        return None
    if pa.types.is_floating(values):
        return (
            "floating-point keys are refused, because Arrow tells 0.0 from -0.0 (and one NaN "
            "from another) where DuckDB does not, so a key could be skipped for another or "
            "stored twice",
            f"{_TO_PLAIN} (ids read through pandas with missing values arrive as float64: "
            "pc.cast(table['id'], pa.int64()) or df['id'].astype('int64'))",
        )
    if pa.types.is_null(values):
        return "a column of type null holds no values", "Give key= a column with values"
    if isinstance(values, pa.BaseExtensionType):
        return (
            "Arrow cannot hash extension types",
            f"Cast the column to its storage type ({values.storage_type}) or to string before "
            "the scope",
        )
    if pa.types.is_run_end_encoded(values):
        return (
            "Arrow cannot hash run-end encoded values",
            "Decode the column (pc.run_end_decode) before the scope",
        )
    if pa.types.is_nested(values):
        return (
            "a key must be a single value, not a struct, list, map or union",
            "Choose a column of plain values as key=, or build one before the scope (a string "
            "joining the parts, say)",
        )
    if pa.types.is_decimal(values):
        return (
            "DuckDB reads decimal128 only",
            "Cast the column to decimal128 (precision up to 38), int64 or string before the scope",
        )
    if pa.types.is_duration(values):
        return "DuckDB stores durations as intervals, in microseconds", _TO_PLAIN
    if pa.types.is_interval(values):
        return "DuckDB equates intervals Arrow tells apart (1 month and 30 days)", _TO_PLAIN
    return "Arrow and DuckDB do not compare its values alike", _TO_PLAIN


def _is_plain(values: pa.DataType) -> bool:
    return bool(
        pa.types.is_integer(values)
        or pa.types.is_boolean(values)
        or pa.types.is_string(values)
        or pa.types.is_large_string(values)
        or pa.types.is_string_view(values)
        or pa.types.is_binary(values)
        or pa.types.is_large_binary(values)
        or pa.types.is_binary_view(values)
        or pa.types.is_fixed_size_binary(values)
        or pa.types.is_date(values)
        or pa.types.is_time(values)
        or pa.types.is_timestamp(values)
        or pa.types.is_decimal128(values)
    )


def _is_increasing(keys: pa.ChunkedArray) -> bool:
    if len(keys) < 2:
        return True
    try:
        ordered = pc.all(pc.greater(keys[1:], keys[:-1])).as_py()
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
        return False
    return bool(ordered)


def _listed(items: list[Any], total: int) -> str:
    return ", ".join(str(item) for item in items) + (", ..." if total > len(items) else "")
