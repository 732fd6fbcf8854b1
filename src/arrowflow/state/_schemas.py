"""The schema of stored result rows, in Arrow terms: how it evolves and how rows are read back.

The rules ``DuckDBState`` applies to its tables (:mod:`arrowflow.state._results`), for a store
that keeps the agents' own Arrow tables (:mod:`arrowflow.state.memory`):

- Per fingerprint, the schema its agents produced, merged over its streams
  (:func:`merged_schema`): a column some streams lacked is nullable, a dictionary keeps the
  wider index type, another type within one fingerprint is an error. Rows done under a
  fingerprint are read back as exactly that schema (:func:`conformed`, :func:`restored`).
- The whole table's schema (:func:`evolved`): each column as the agents last produced it. A
  column that now holds another type than the one stored (another fingerprint's agents) is
  *retyped*: the rows stored with the old type read as null there.
- An empty result describes no row: it changes no schema and no column's type.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from arrowflow._tabular import decoded, value_type
from arrowflow.exceptions import ExecutionError

__all__ = [
    "comparable",
    "conformed",
    "encoded_like",
    "evolved",
    "merged_schema",
    "merged_type",
    "restored",
]


def comparable(kind: pa.DataType) -> pa.DataType:
    """The type values of ``kind`` compare as: by value (a dictionary's values), one type for
    all strings and one for all binaries (as DuckDB holds them: ``VARCHAR``, ``BLOB``).

    Example:
        >>> comparable(pa.dictionary(pa.int8(), pa.string())), comparable(pa.int32())
        (DataType(large_string), DataType(int32))
    """
    kind = value_type(kind)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return pa.large_string()
    if (
        pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_binary_view(kind)
        or pa.types.is_fixed_size_binary(kind)
    ):
        return pa.large_binary()
    return kind


def merged_schema(own: pa.Schema | None, schema: pa.Schema, table: str) -> pa.Schema:
    """The schema of the rows of a fingerprint that has stored ``own``, once ``schema``'s
    are stored too.

    Raises:
        ExecutionError: a column changed type within the fingerprint.
    """
    if own is None:
        return schema
    fields = []
    for old in own:
        index = schema.get_field_index(old.name)
        if index < 0:
            fields.append(old.with_nullable(True))
            continue
        new = schema.field(index)
        kind = merged_type(old.type, new.type)
        if kind is None:
            raise ExecutionError(
                f"State table '{table}': column '{new.name}' is {old.type} in the rows stored "
                f"under this fingerprint, but the agents now produce {new.type}. Cast it in the "
                f"agent to {old.type}, or bump the store's version= so that every row is "
                "recomputed with the new type."
            )
        fields.append(pa.field(new.name, kind, old.nullable or new.nullable, new.metadata))
    known = set(own.names)
    fields.extend(new.with_nullable(True) for new in schema if new.name not in known)
    return pa.schema(fields, metadata=schema.metadata)


def evolved(
    table: pa.Schema | None, schema: pa.Schema, *, rows: bool
) -> tuple[pa.Schema, list[str]]:
    """The table's schema once results of ``schema`` (with ``rows`` or none) are stored in
    it, and the columns retyped (whose older values it cannot hold any more)."""
    if table is None:
        return schema, []
    fields = {field.name: field for field in table}
    retyped = []
    for new in schema:
        old = fields.get(new.name)
        if old is None:
            fields[new.name] = new.with_nullable(True)
        elif not rows:
            continue
        elif not pa.types.is_null(new.type) and not _holds(old.type, new.type):
            if not pa.types.is_null(old.type):
                retyped.append(new.name)
            fields[new.name] = new.with_nullable(True)
        else:
            kind = merged_type(old.type, new.type) or new.type
            fields[new.name] = pa.field(new.name, kind, old.nullable or new.nullable, new.metadata)
    if rows:
        # The rows just stored have no value in the columns they lack.
        for name in set(fields) - set(schema.names):
            fields[name] = fields[name].with_nullable(True)
    metadata = schema.metadata if rows else table.metadata
    return pa.schema(list(fields.values()), metadata=metadata), retyped


def conformed(rows: pa.Table, schema: pa.Schema) -> pa.Table:
    """``rows`` with exactly the columns of ``schema``: a missing column, or one of a type it
    cannot hold (retyped since), is null."""
    if rows.schema.equals(schema, check_metadata=True):
        return rows
    columns = []
    for field in schema:
        column = rows[field.name] if field.name in rows.column_names else None
        if column is not None and column.type != field.type:
            holds = pa.types.is_null(column.type) or _holds(column.type, field.type)
            column = _cast(column, field) if holds else None
        if column is None:
            column = pa.chunked_array([pa.nulls(rows.num_rows, field.type)])
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def restored(rows: pa.Table, schema: pa.Schema, like: pa.Table) -> pa.Table:
    """``rows`` as ``schema``, a dictionary column encoded with the dictionary of ``like``'s
    (the input rows they stand for) when that holds every value: a passed-through
    ``Categorical`` then comes back exactly as the agents return it, codes included."""
    rows = conformed(rows, schema)
    columns = rows.columns
    changed = False
    for i, field in enumerate(schema):
        source = like[field.name] if field.name in like.column_names else None
        if (
            source is not None
            and pa.types.is_dictionary(field.type)
            and pa.types.is_dictionary(source.type)
        ):
            encoded = encoded_like(columns[i], source)
            if encoded is not None:
                columns[i], changed = encoded, True
    if not changed:
        return rows
    fields = [field.with_type(column.type) for field, column in zip(schema, columns, strict=True)]
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=schema.metadata))


def _holds(old: pa.DataType, new: pa.DataType) -> bool:
    """Whether a column of type ``new`` holds the values of type ``old`` as they are."""
    return merged_type(old, new) is not None or comparable(old) == comparable(new)


def merged_type(old: pa.DataType, new: pa.DataType) -> pa.DataType | None:
    """The type of a column holding values of ``old`` and of ``new``; ``None`` if none does.

    An all-null column takes the other's type; a dictionary keeps the wider of the two index
    types, so that every stored value fits the type it is read back with.
    """
    if pa.types.is_null(old):
        return new
    if pa.types.is_null(new):
        return old
    if (
        pa.types.is_dictionary(old)
        and pa.types.is_dictionary(new)
        and old.value_type.equals(new.value_type)
    ):
        return new if new.index_type.bit_width > old.index_type.bit_width else old
    return new if old.equals(new) else None


def _cast(column: pa.ChunkedArray, field: pa.Field) -> pa.ChunkedArray:
    try:
        return column.cast(field.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise ExecutionError(
            f"Column '{field.name}' is stored as {column.type} and cannot be read back as "
            f"{field.type}, the type the agents produced: {exc}"
        ) from exc


def encoded_like(values: pa.ChunkedArray, source: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """``values`` encoded with the dictionary and index type of ``source``, or ``None`` when
    that dictionary lacks some of them."""
    if source.num_chunks == 0:
        return None
    kind = source.type
    # Slices of one input share its dictionary; otherwise one that holds every chunk's values.
    chunks = source.chunks if source.num_chunks == 1 else source.unify_dictionaries().chunks
    dictionary = chunks[0].dictionary
    try:
        positions = pc.index_in(decoded(values).cast(dictionary.type), value_set=dictionary)
        indices = positions.cast(kind.index_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None
    if indices.null_count != values.null_count:
        return None
    return pa.chunked_array(
        [
            pa.DictionaryArray.from_arrays(chunk, dictionary, ordered=kind.ordered)
            for chunk in indices.chunks
        ],
        type=kind,
    )
