"""Merging the outputs of streams (or chunks) back together, in order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from arrowflow._tabular import is_tabular, to_table
from arrowflow.exceptions import ExecutionError

__all__ = ["concat_in_order", "merge_outputs"]

#: Each stream's number and the fields it wrote (its streamed field always included), in
#: stream order. A mapping rather than a list of pairs: a pair holding a dict stays tracked by
#: Python's garbage collector, and a run keeps one per stream to its end.
Outputs = Mapping[int, Mapping[str, Any]]


def concat_in_order(
    tables: Sequence[tuple[int, pa.Table]], empty: pa.Schema, where: str
) -> pa.Table:
    """Concatenate numbered tables in the given order, unifying schemas when Arrow can.

    Equal schemas concatenate without a copy; otherwise Arrow's default promotion fills missing
    columns with nulls and widens null-typed columns. A stream whose schema cannot be unified
    with the first one's is an ``ExecutionError`` naming both.
    """
    if not tables:
        return empty.empty_table()
    try:
        # Arrow compares the schemas itself, in C: a run may have millions of streams.
        return pa.concat_tables([table for _, table in tables])
    except pa.ArrowInvalid:
        pass
    # A stream whose rows were all filtered or skipped may carry its input's schema; it adds
    # no rows, so it must not add columns either.
    tables = [pair for pair in tables if pair[1].num_rows] or [tables[0]]
    first_num, first = tables[0]
    try:
        return pa.concat_tables([table for _, table in tables], promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        num, schema = _first_incompatible(tables)
        raise ExecutionError(
            f"{where}: stream {num} returned a schema that cannot be merged with stream "
            f"{first_num}'s ({exc}).\nstream {first_num}: {_one_line(first.schema)}\n"
            f"stream {num}: {_one_line(schema)}\nReturn the same column types from every "
            "stream (cast in the agent)."
        ) from exc


def _first_incompatible(tables: Sequence[tuple[int, pa.Table]]) -> tuple[int, pa.Schema]:
    merged = tables[0][1].schema
    for num, table in tables[1:]:
        try:
            merged = pa.unify_schemas([merged, table.schema], promote_options="default")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return num, table.schema
    return tables[-1][0], tables[-1][1].schema  # pragma: no cover - concat failed earlier


def _one_line(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def merge_outputs(
    base: Mapping[str, Any],
    field: str,
    outputs: Outputs,
    empty: pa.Schema,
    where: str,
) -> dict[str, Any]:
    """The context after a scope: ``base`` with the fields written by the streams merged.

    The streamed field is the concatenation of every stream's table. Another field is
    concatenated when every value written to it is tabular; otherwise its values are collected
    in a list with one entry per stream that wrote it, in stream order.
    """
    merged = dict(base)
    merged.pop("_batch_metadata", None)
    merged[field] = concat_in_order(
        [(num, fields[field]) for num, fields in outputs.items()],
        empty,
        f"{where}, field '{field}'",
    )
    written: dict[str, list[tuple[int, Any]]] = {}
    for num, fields in outputs.items():
        for name, value in fields.items():
            if name != field:
                written.setdefault(name, []).append((num, value))
    for name, values in written.items():
        if all(is_tabular(value) for _, value in values):
            tables = [(num, to_table(value)) for num, value in values]
            merged[name] = concat_in_order(tables, tables[0][1].schema, f"{where}, field '{name}'")
        else:
            merged[name] = [value for _, value in values]
    return merged
