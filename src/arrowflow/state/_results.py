"""A result table of a state database, with its done keys: upsert, load, schema evolution.

Every statement here runs on a connection the caller holds (under its lock); Arrow tables are
handed to DuckDB as registered views, so no row goes through Python.

The done-keys table holds one row per key that has anything stored: ``fp`` is the id of the
fingerprint the key was done under, or ``0`` for a key that only has result rows (an agent
returned a row whose key was not in its input). So "no done row" means "nothing stored", which
lets a run skip the deletes of an upsert for keys it knows to be new.

Dictionary-encoded columns are stored decoded (DuckDB reads an Arrow dictionary as its values),
so keys match by value across runs whatever their codes; the Arrow schema kept beside the table
encodes them again on the way out (:meth:`ResultTable.restore_types`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from arrowflow._tabular import decoded
from arrowflow.exceptions import ExecutionError
from arrowflow.state._layout import (
    SCHEMA,
    duck_types,
    quote,
    registered,
    results_table,
    transaction,
)

if TYPE_CHECKING:
    import duckdb

__all__ = ["NOT_DONE", "ResultTable"]

#: The ``fp`` of keys with stored rows that no run marked done.
NOT_DONE = 0

_RESULTS_VIEW = "arrowflow_results_view"
_KEYS_VIEW = "arrowflow_keys_view"
_EXTRA_VIEW = "arrowflow_extra_keys_view"


@dataclass(frozen=True)
class _Shape:
    """What is known of the stored table.

    Attributes:
        columns: DuckDB type by column.
        arrow: the Arrow schema the agents produced.
        key: the key column every stored row was written with; ``None`` once several were.
    """

    columns: dict[str, str]
    arrow: pa.Schema
    key: str | None


class ResultTable:
    """The result table ``name`` keyed by ``key``, and its done-keys table.

    Attributes:
        name: the table's name as the user gave it.
        key: the key column.
        sql: the quoted, qualified name of the result table.
        done_sql: the quoted, qualified name of its done-keys table.
    """

    def __init__(self, name: str, key: str) -> None:
        self.name = name
        self.key = key
        self.sql = results_table(name)
        self.done_name = f"done:{name}:{key}"
        self.done_sql = f"{SCHEMA}.{quote(self.done_name)}"
        self._shape: _Shape | None = None
        self._done_type: str | None = None
        # The schema of the last results stored: the same schema needs no DDL check again.
        self._last_schema: pa.Schema | None = None

    @property
    def exists(self) -> bool:
        return self._shape is not None

    @property
    def is_keyed_alone(self) -> bool:
        """Whether every stored row was written with this key (so the done table covers them)."""
        return self._shape is None or self._shape.key == self.key

    def refresh(self, con: duckdb.DuckDBPyConnection) -> None:
        """Read what the database holds for this table (after each open)."""
        self._last_schema = None
        self._shape = None
        found = con.sql(
            # DuckDB identifiers are case-insensitive: "Quick_Fit" is the table "quick_fit".
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main' "
            "AND lower(table_name) = lower(?)",
            params=[self.name],
        ).fetchall()
        if found:
            stored = con.sql(
                f"SELECT arrow_schema, key_column FROM {SCHEMA}.result_tables "
                "WHERE lower(table_name) = lower(?)",
                params=[self.name],
            ).fetchall()
            if not stored:
                # Created in one transaction with its metadata, a table of ours always has it.
                raise ExecutionError(
                    f"State table '{found[0][0]}' exists in the database but arrowflow did not "
                    "create it (arrowflow.result_tables has no entry for it), so it is left "
                    "untouched. Give the store another table=, or rename or drop that table."
                )
            arrow = con.sql(f"SELECT * FROM {self.sql} LIMIT 0").to_arrow_table().schema
            arrow = _merge_schemas(arrow, pa.ipc.read_schema(pa.py_buffer(stored[0][0])))
            key = None if stored[0][1] is None else str(stored[0][1])
            self._shape = _Shape(duck_types(con, self.sql), arrow, key)
        done = con.sql(
            "SELECT data_type FROM duckdb_columns() WHERE schema_name = ? "
            "AND lower(table_name) = lower(?) AND column_name = 'key'",
            params=[SCHEMA, self.done_name],
        ).fetchall()
        self._done_type = str(done[0][0]) if done else None

    def stored_key_type(self) -> str | None:
        """The DuckDB type keys were stored with, if any were."""
        if self._done_type is not None:
            return self._done_type
        if self._shape is not None:
            return self._shape.columns.get(self.key)
        return None

    def ensure_done_table(self, con: duckdb.DuckDBPyConnection, key_type: str) -> None:
        if self._done_type is None:
            con.execute(
                f"CREATE TABLE IF NOT EXISTS {self.done_sql} "
                f"(fp INTEGER NOT NULL, key {key_type} NOT NULL)"
            )
            self._done_type = key_type

    def upsert(
        self,
        con: duckdb.DuckDBPyConnection,
        fp: int,
        results: pa.Table,
        keys: pa.ChunkedArray,
        *,
        fresh: bool = False,
        unique: bool = False,
    ) -> bool:
        """Store ``results`` in place of the rows of ``keys`` and of their own keys, and mark
        ``keys`` done under ``fp`` (and no other fingerprint): one transaction.

        Args:
            fresh: nothing is stored for ``keys`` (the caller knows): no deletes for them.
            unique: ``keys`` are known unique and not null.

        Returns:
            Whether ``results`` had keys outside ``keys``.
        """
        storable = self._check(results)
        views = {_RESULTS_VIEW: results}
        extra = None
        if storable and len(keys) == results.num_rows and results[self.key].equals(keys):
            # One result row per input row, same keys (the agents filtered nothing): the keys
            # are read from the results, one view fewer.
            keys_sql = f"SELECT {quote(self.key)} AS key FROM {_RESULTS_VIEW}"
        else:
            views[_KEYS_VIEW] = pa.table({"key": keys})
            keys_sql = f"SELECT key FROM {_KEYS_VIEW}"
            if storable and results.num_rows:
                # By value: Arrow wants a plain value set, and codes differ between encodings.
                outside = pc.invert(pc.is_in(results[self.key], value_set=decoded(keys)))
                if pc.any(outside).as_py():
                    extra = pa.table({"key": pc.unique(results[self.key].filter(outside))})
                    views[_EXTRA_VIEW] = extra
        with registered(con, **views), transaction(con):
            shape = self._evolve(con, results.schema) if storable else self._shape
            self._write(con, fp, results, keys_sql, shape, fresh=fresh, unique=unique, extra=extra)
        if storable:
            self._shape = shape
            self._last_schema = results.schema
        return extra is not None

    def _check(self, results: pa.Table) -> bool:
        """Whether ``results`` can be stored (they have the key); errors for rows that cannot."""
        if self.key not in results.column_names:
            if results.num_rows:
                raise ExecutionError(
                    f"State table '{self.name}': the results have no key column '{self.key}' "
                    f"(columns: {', '.join(results.column_names)}); keep it in the agents' "
                    "output."
                )
            return False
        nulls = results[self.key].null_count
        if nulls:
            raise ExecutionError(
                f"State table '{self.name}': {nulls} result row(s) have a null '{self.key}'; "
                "every stored row needs a key. Drop or fill them in the agent."
            )
        return True

    def _write(
        self,
        con: duckdb.DuckDBPyConnection,
        fp: int,
        results: pa.Table,
        keys_sql: str,
        shape: _Shape | None,
        *,
        fresh: bool,
        unique: bool,
        extra: pa.Table | None,
    ) -> None:
        key = quote(self.key)
        if shape is not None and not fresh:
            con.execute(f"DELETE FROM {self.sql} WHERE {key} IN ({keys_sql})")
        if shape is not None and extra is not None:
            con.execute(f"DELETE FROM {self.sql} WHERE {key} IN (SELECT key FROM {_EXTRA_VIEW})")
        if results.num_rows:
            con.execute(f"INSERT INTO {self.sql} BY NAME SELECT * FROM {_RESULTS_VIEW}")
        if not fresh:
            con.execute(f"DELETE FROM {self.done_sql} WHERE key IN ({keys_sql})")
        if not unique:
            keys_sql = f"SELECT DISTINCT key FROM ({keys_sql}) WHERE key IS NOT NULL"
        con.execute(f"INSERT INTO {self.done_sql} SELECT ?, key FROM ({keys_sql})", [fp])
        if extra is not None:
            con.execute(
                f"INSERT INTO {self.done_sql} SELECT ?, key FROM {_EXTRA_VIEW} "
                f"WHERE key NOT IN (SELECT key FROM {self.done_sql})",
                [NOT_DONE],
            )

    def _evolve(self, con: duckdb.DuckDBPyConnection, schema: pa.Schema) -> _Shape:
        """Create the table, or add the columns the results bring (inside the transaction)."""
        last = self._last_schema
        if self._shape is not None and last is not None and schema.equals(last):
            return self._shape
        incoming = duck_types(con, _RESULTS_VIEW)
        if self._shape is None:
            con.execute(f"CREATE TABLE {self.sql} AS SELECT * FROM {_RESULTS_VIEW} LIMIT 0")
            shape = _Shape(dict(incoming), pa.schema(list(schema)), self.key)
            self._save(con, shape)
            return shape
        columns = dict(self._shape.columns)
        arrow = self._shape.arrow
        by_lower = {name.lower(): name for name in columns}
        for name, new_type in incoming.items():
            field = schema.field(name)
            stored_name = by_lower.get(name.lower())
            if stored_name is None:
                con.execute(f"ALTER TABLE {self.sql} ADD COLUMN {quote(name)} {new_type}")
                columns[name] = new_type
                arrow = arrow.append(field)
                continue
            old_type = columns[stored_name]
            if old_type == new_type or new_type == "NULL":
                arrow = _with_wider_dictionary(arrow, stored_name, field)
                continue
            if old_type != "NULL":
                raise ExecutionError(
                    f"State table '{self.name}': column '{name}' is stored as {old_type} but the "
                    f"agents now produce {new_type} ({field.type}). Cast it in the agent to the "
                    "stored type, or store these results under another table=."
                )
            con.execute(
                f"ALTER TABLE {self.sql} ALTER COLUMN {quote(stored_name)} SET DATA TYPE {new_type}"
            )
            columns[stored_name] = new_type
            index = arrow.get_field_index(stored_name)
            arrow = arrow.set(index, field.with_name(stored_name)) if index >= 0 else arrow
        key = self._shape.key if self._shape.key == self.key else None
        shape = replace(self._shape, columns=columns, arrow=arrow, key=key)
        if shape != self._shape:
            self._save(con, shape)
        return shape

    def _save(self, con: duckdb.DuckDBPyConnection, shape: _Shape) -> None:
        blob = bytes(shape.arrow.remove_metadata().serialize().to_pybytes())
        con.execute(
            f"DELETE FROM {SCHEMA}.result_tables WHERE lower(table_name) = lower(?)", [self.name]
        )
        con.execute(
            f"INSERT INTO {SCHEMA}.result_tables VALUES (?, ?, ?)", [self.name, blob, shape.key]
        )

    def stored_keys(self, con: duckdb.DuckDBPyConnection, keys: pa.ChunkedArray) -> pa.Table:
        """``key`` and ``fp`` of those of ``keys`` with anything stored (done or not)."""
        with registered(con, **{_KEYS_VIEW: pa.table({"key": keys})}):
            return con.sql(
                f"SELECT key, fp FROM {self.done_sql} WHERE key IN (SELECT key FROM {_KEYS_VIEW})"
            ).to_arrow_table()

    def load(
        self,
        con: duckdb.DuckDBPyConnection,
        fp: int,
        keys: pa.ChunkedArray,
        like: pa.Table | None = None,
    ) -> pa.Table:
        """The stored rows of those of ``keys`` done under ``fp``, in the order they were stored.

        ``like``: the input rows they stand for (see :meth:`restore_types`).
        """
        if self._shape is None:
            return pa.table({self.key: keys.slice(0, 0)})
        key = quote(self.key)
        with registered(con, **{_KEYS_VIEW: pa.table({"key": keys})}):
            loaded = con.sql(
                f"SELECT r.* FROM {self.sql} r WHERE r.{key} IN (SELECT d.key FROM "
                f"{self.done_sql} d WHERE d.fp = ? AND d.key IN (SELECT key FROM {_KEYS_VIEW})) "
                "ORDER BY r.rowid",
                params=[fp],
            ).to_arrow_table()
        return self.restore_types(loaded, like)

    def restore_types(self, table: pa.Table, like: pa.Table | None = None) -> pa.Table:
        """``table`` (read from DuckDB) with the column types the agents produced.

        A column stored as a dictionary that ``like`` (the input rows the stored rows stand
        for) also holds as a dictionary is encoded with ``like``'s dictionary and index type
        when it has every value: a passed-through ``Categorical`` then comes back exactly as
        this run's agents return it, codes included. Other dictionary columns are encoded
        anew. A column that cannot take its stored type keeps the type it was read with.
        """
        if self._shape is None:
            return table
        stored = self._shape.arrow
        fields = []
        columns = []
        for name, column in zip(table.column_names, table.columns, strict=True):
            index = stored.get_field_index(name)
            field = stored.field(index) if index >= 0 else table.schema.field(name)
            source = like[name] if like is not None and name in like.column_names else None
            restored = _restored(column, field.type, source)
            # Nullable always: a schema that depended on the rows read could differ per batch.
            fields.append(field.with_type(restored.type).with_nullable(True))
            columns.append(restored)
        return pa.Table.from_arrays(columns, schema=pa.schema(fields))

    def read_all(self, con: duckdb.DuckDBPyConnection) -> pa.RecordBatchReader:
        """Every stored row, ordered by key (then by the order they were stored in)."""
        relation = con.sql(f"SELECT * FROM {self.sql} ORDER BY {quote(self.key)}, rowid")
        # Older DuckDB releases only have fetch_arrow_reader, deprecated in DuckDB 2.
        to_reader = getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader
        reader: pa.RecordBatchReader = to_reader()
        return reader


def _restored(
    column: pa.ChunkedArray, target: pa.DataType, source: pa.ChunkedArray | None
) -> pa.ChunkedArray:
    if (
        source is not None
        and pa.types.is_dictionary(target)
        and pa.types.is_dictionary(source.type)
    ):
        encoded = _encoded_like(column, source)
        if encoded is not None:
            return encoded
    try:
        return column.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return column


def _encoded_like(values: pa.ChunkedArray, source: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """``values`` encoded with the dictionary and index type of ``source``, or ``None`` when
    that dictionary lacks some of them."""
    if source.num_chunks == 0:
        return None
    kind = source.type
    # Slices of one input share its dictionary; otherwise one that holds every chunk's values.
    chunks = source.chunks if source.num_chunks == 1 else source.unify_dictionaries().chunks
    dictionary = chunks[0].dictionary
    try:
        positions = pc.index_in(values.cast(dictionary.type), value_set=dictionary)
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


def _with_wider_dictionary(arrow: pa.Schema, name: str, field: pa.Field) -> pa.Schema:
    """``arrow`` whose dictionary column ``name`` takes ``field``'s index type if it is wider,
    so that every stored value fits the type it is read back with."""
    index = arrow.get_field_index(name)
    if index < 0:
        return arrow
    old, new = arrow.field(index).type, field.type
    if not (pa.types.is_dictionary(old) and pa.types.is_dictionary(new)):
        return arrow
    if new.value_type != old.value_type or new.index_type.bit_width <= old.index_type.bit_width:
        return arrow
    return arrow.set(index, arrow.field(index).with_type(new))


def _merge_schemas(current: pa.Schema, stored: pa.Schema) -> pa.Schema:
    """The table's columns, typed as the stored Arrow schema says where it knows them."""
    fields = []
    for field in current:
        index = stored.get_field_index(field.name)
        fields.append(stored.field(index) if index >= 0 else field)
    return pa.schema(fields)
