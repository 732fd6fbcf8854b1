"""A result table of a state database, with its done keys: upsert, load, schema evolution.

Every statement here runs on a connection the caller holds (under its lock); Arrow tables are
handed to DuckDB as registered views, so no row goes through Python.

The done-keys table holds one row per key that has anything stored: ``fp`` is the id of the
fingerprint the key was done under, or ``0`` for a key that only has result rows (an agent
returned a row whose key was not in its input) or whose rows are stale. So "no done row" means
"nothing stored", which lets a run skip the deletes of an upsert for keys it knows to be new.

A row an agent *adds*, under a key that is not in its stream's input, belongs to that stream:
its key's done row has ``fp`` 0 and ``anchor``, the last input key of the stream that added it.
It is loaded with the anchor (placed where the anchor is, so it comes back in its stream, after
the stream's keyed rows, as the first run returned it), replaced when the anchor's stream is
stored again, and a key added by two streams is refused (one row per key could not give both
back).

What the agents returned comes back exactly, schema included (names, case, types,
nullability, metadata):

- A column is stored under its own name, so ``select * from quick_fit`` reads as expected,
  unless DuckDB cannot hold that name apart: ``rowid`` (it would hide DuckDB's row id), an
  empty name, a name starting with ``__arrowflow`` (arrowflow's own, in its queries), or a name
  that differs only by case from another column's (DuckDB identifiers ignore case). Such a
  column gets a *physical* name (``rowid_1``, ``score_1``), which arrowflow's metadata maps back.
- A type DuckDB cannot hold (``float16``, ``duration``, ``decimal256``, unions ...) is stored as
  a carrier type and decoded on the way out (:mod:`arrowflow.state._codec`). Dictionary-encoded
  columns are stored decoded (DuckDB reads an Arrow dictionary as its values), so keys match
  by value across runs whatever their codes, and are encoded again on the way out.
- ``arrowflow.result_schemas`` keeps, per fingerprint, the Arrow schema its agents produced
  (merged over its streams: a column some streams lacked is nullable). Rows done under a
  fingerprint are read back as exactly that schema, so after a ``version`` bump the rows have
  the new agents' columns only. ``arrowflow.result_tables`` keeps the table's own schema (each
  column as the agents last produced it, nullable unless every stored row has a value, and its
  physical name), which :meth:`ResultTable.restore_types` gives to ``to_arrow()``.
- A fingerprint whose agents produce another DuckDB type for a column than the one stored
  empties that column and retypes it. The rows of the other fingerprints that had the column
  are then stale: their keys are marked not done (``fp`` 0), so they are recomputed rather than
  loaded without their values. Within one fingerprint, a column keeps its type (a dictionary
  may widen its codes; an all-null column takes the first real type).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from arrowflow._tabular import decoded
from arrowflow.exceptions import ExecutionError
from arrowflow.state import _codec

# The DDL of a metadata table databases written before it lack (created when first needed).
from arrowflow.state._layout import _TABLES as _LAYOUT_TABLES
from arrowflow.state._layout import SCHEMA, duck_types, quote, registered, results_table
from arrowflow.state._schemas import encoded_like, merged_schema, merged_type

if TYPE_CHECKING:
    import duckdb

__all__ = ["NOT_DONE", "ResultTable"]

#: The ``fp`` of keys with stored rows that no run marked done, or whose rows are stale.
NOT_DONE = 0

_RESULTS_VIEW = "arrowflow_results_view"
_KEYS_VIEW = "arrowflow_keys_view"
_EXTRA_VIEW = "arrowflow_extra_keys_view"
_SCHEMAS = "result_schemas"
#: In the table's saved schema: the physical name of each of its fields, as JSON.
_PHYSICAL = b"arrowflow:physical_names"
#: The name of the column of :meth:`ResultTable.stored_columns_sql` that says its fingerprint.
_MARK = "__arrowflow_columns_of_fp_"
#: Column names arrowflow's queries use start with it; a user's column is renamed.
_RESERVED = "__arrowflow"
#: DuckDB's pseudo-columns of a table: a real column of that name would hide them.
_PSEUDO_COLUMNS = frozenset({"rowid"})


@dataclass(frozen=True)
class _Shape:
    """What is known of the stored table.

    Attributes:
        columns: DuckDB type by physical column name, in the table's order.
        arrow: the table's schema: the field of each physical column in the same order, as
            the agents last produced it, nullable unless every stored row has a value.
        physical: the physical name of each field of ``arrow``.
        key: the key column every stored row was written with; ``None`` once several were.
        schemas: by fingerprint id, the schema the agents produced under that fingerprint.
    """

    columns: dict[str, str]
    arrow: pa.Schema
    physical: tuple[str, ...]
    key: str | None
    schemas: dict[int, pa.Schema]

    @cached_property
    def names(self) -> dict[str, str]:
        """The physical name of each column, by its name in Arrow."""
        return dict(zip(self.arrow.names, self.physical, strict=True))


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
        # The fingerprint and schema of the last results stored: the same need no DDL check.
        self._last: tuple[int, pa.Schema] | None = None
        # For a shape, per schema of rows read from the table: how to restore them.
        self._reads: tuple[_Shape | None, dict[pa.Schema, _Read]] = (None, {})
        self._last_read: tuple[_Shape, pa.Schema, _Read] | None = None
        # The schema of the last results found storable by check(): the same need one look.
        self._checked: pa.Schema | None = None

    @property
    def exists(self) -> bool:
        return self._shape is not None

    @property
    def is_keyed_alone(self) -> bool:
        """Whether every stored row was written with this key (so the done table covers them)."""
        return self._shape is None or self._shape.key == self.key

    @property
    def key_sql(self) -> str:
        """The quoted name of the key column in the result table."""
        return quote(self._physical(self.key))

    def refresh(self, con: duckdb.DuckDBPyConnection) -> None:
        """Read what the database holds for this table (after each open, after a rollback)."""
        self._last = None
        shape = None
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
            blob, key = stored[0]
            shape = self._read_shape(con, blob, None if key is None else str(key))
        # Assigned once: another thread may be reading rows with it.
        self._shape = shape
        done = con.sql(
            "SELECT data_type FROM duckdb_columns() WHERE schema_name = ? "
            "AND lower(table_name) = lower(?) AND column_name = 'key'",
            params=[SCHEMA, self.done_name],
        ).fetchall()
        self._done_type = str(done[0][0]) if done else None

    def _read_shape(self, con: duckdb.DuckDBPyConnection, blob: bytes, key: str | None) -> _Shape:
        saved = pa.ipc.read_schema(pa.py_buffer(blob))
        metadata = dict(saved.metadata or {})
        names = metadata.pop(_PHYSICAL, None)
        if names is None:
            # Written before physical names: every column under its own name, and the
            # nullability not kept.
            fields = {field.name: field.with_nullable(True) for field in saved}
        else:
            fields = dict(zip(json.loads(names), saved, strict=True))
        columns = duck_types(con, self.sql)
        read = con.sql(f"SELECT * FROM {self.sql} LIMIT 0").to_arrow_table().schema
        arrow = pa.schema(
            [fields.get(name, read.field(name)) for name in columns], metadata=metadata or None
        )
        return _Shape(columns, arrow, tuple(columns), key, self._read_schemas(con))

    def _read_schemas(self, con: duckdb.DuckDBPyConnection) -> dict[int, pa.Schema]:
        kept = con.sql(
            "SELECT 1 FROM duckdb_tables() WHERE schema_name = ? AND table_name = ?",
            params=[SCHEMA, _SCHEMAS],
        ).fetchall()
        if not kept:  # a database written before schemas were kept per fingerprint
            return {}
        rows = con.sql(
            f"SELECT fp, arrow_schema FROM {SCHEMA}.{_SCHEMAS} WHERE lower(table_name) = lower(?)",
            params=[self.name],
        ).fetchall()
        return {int(fp): pa.ipc.read_schema(pa.py_buffer(blob)) for fp, blob in rows}

    def stored_key_type(self) -> str | None:
        """The DuckDB type keys were stored with, if any were."""
        if self._done_type is not None:
            return self._done_type
        if self._shape is not None:
            return self._shape.columns.get(self._physical(self.key))
        return None

    def holds_nothing(self, con: duckdb.DuckDBPyConnection) -> bool:
        """Whether no key is done under any fingerprint (a first run: nothing to skip)."""
        if self._done_type is None:
            return True
        return bool(con.sql(f"SELECT NOT EXISTS (SELECT 1 FROM {self.done_sql})").fetchall()[0][0])

    def ensure_done_table(self, con: duckdb.DuckDBPyConnection, key_type: str) -> None:
        if self._done_type is None:
            con.execute(
                f"CREATE TABLE IF NOT EXISTS {self.done_sql} "
                f"(fp INTEGER NOT NULL, key {key_type} NOT NULL, anchor {key_type})"
            )
            self._done_type = key_type
        else:  # a done table written before added rows were anchored
            con.execute(f"ALTER TABLE {self.done_sql} ADD COLUMN IF NOT EXISTS anchor {key_type}")

    def stored_columns_sql(self, fp: int, alias: str) -> str:
        """The SELECT list of the columns stored for fingerprint ``fp``, qualified by ``alias``.

        What it selects, :meth:`restore_types` turns into the rows the agents produced under
        ``fp``: exactly their columns, names and types. Its first column says the fingerprint.
        """
        shape = self._shape
        pairs = [] if shape is None else _columns_of(shape, fp)
        columns = [f"{alias}.{quote(name)}" for _, name in pairs]
        return ", ".join([f"NULL AS {quote(f'{_MARK}{fp}')}", *columns])

    def _physical(self, name: str) -> str:
        return name if self._shape is None else self._shape.names.get(name, name)

    # -- storing ---------------------------------------------------------------------------

    def upsert(
        self,
        con: duckdb.DuckDBPyConnection,
        fp: int,
        results: pa.Table,
        keys: pa.ChunkedArray,
        *,
        fresh: bool = False,
        unique: bool = False,
        added: bool = True,
    ) -> bool:
        """Store ``results`` in place of the rows of ``keys`` and of their own keys, and mark
        ``keys`` done under ``fp`` (and no other fingerprint), inside the caller's transaction.

        After a rollback of that transaction, :meth:`refresh` the table: the columns it added
        are gone.

        Args:
            fresh: nothing is stored for ``keys`` (the caller knows): no deletes for them.
            unique: ``keys`` are known unique and not null.
            added: ``results`` may hold keys outside ``keys`` (``False``: the caller knows
                they do not, and they are not looked for).

        Returns:
            Whether ``results`` had keys outside ``keys``.
        """
        storable = self.check(results)
        stored, physical = self._stored_form(results) if storable else (results, [])
        views = {_RESULTS_VIEW: stored}
        extra = None
        if storable and len(keys) == results.num_rows and results[self.key].equals(keys):
            # One result row per input row, same keys (the agents filtered nothing): the keys
            # are read from the results, one view fewer.
            key = quote(physical[results.schema.get_field_index(self.key)])
            keys_sql = f"SELECT {key} AS key FROM {_RESULTS_VIEW}"
        else:
            views[_KEYS_VIEW] = pa.table({"key": keys})
            keys_sql = f"SELECT key FROM {_KEYS_VIEW}"
            if storable and added and results.num_rows:
                # By value: Arrow wants a plain value set, and codes differ between encodings.
                outside = pc.invert(pc.is_in(results[self.key], value_set=decoded(keys)))
                if pc.any(outside).as_py():
                    new_keys = pc.unique(results[self.key].filter(outside))
                    # The stream's last input key: where its added rows belong.
                    anchor = keys.slice(len(keys) - 1).take(pa.array([0] * len(new_keys)))
                    extra = pa.table({"key": new_keys, "anchor": decoded(anchor)})
                    views[_EXTRA_VIEW] = extra
        with registered(con, **views):
            shape = self._shape
            if storable:
                shape = self._evolve(con, fp, results, physical)
            self._write(con, fp, results, keys_sql, shape, fresh=fresh, unique=unique, extra=extra)
        if storable:
            self._shape = shape
            # Not after an empty result: its schema describes no row (see _evolve).
            self._last = (fp, results.schema) if results.num_rows else None
        return extra is not None

    def check(self, results: pa.Table) -> bool:
        """Whether ``results`` can be stored (they have the key).

        Raises:
            ExecutionError: rows that cannot be stored: no key column, null keys, a key of a
                type DuckDB cannot compare, two columns of one name.
        """
        schema, checked = results.schema, self._checked
        if checked is not None and (schema is checked or schema.equals(checked)):
            return self._checked_key(results)
        if self.key not in results.column_names:
            if results.num_rows:
                raise ExecutionError(
                    f"State table '{self.name}': the results have no key column '{self.key}' "
                    f"(columns: {', '.join(results.column_names)}); keep it in the agents' "
                    "output."
                )
            return False
        names = results.column_names
        if len(set(names)) < len(names):
            repeated = sorted({name for name in names if names.count(name) > 1})
            raise ExecutionError(
                f"State table '{self.name}': the results have several columns named "
                f"{', '.join(repr(name) for name in repeated)}; a stored row needs distinct "
                "column names. Rename them in the agent."
            )
        key_type = results.schema.field(self.key).type
        if _codec.needs_carrier(key_type):
            raise ExecutionError(
                f"State table '{self.name}': key column '{self.key}' is {key_type}, which "
                "DuckDB cannot compare as a key. Cast it (to an integer or a string) before "
                "the scope and in the agents."
            )
        self._checked_key(results)
        self._checked = schema
        return True

    def _checked_key(self, results: pa.Table) -> bool:
        nulls = results[self.key].null_count
        if nulls:
            raise ExecutionError(
                f"State table '{self.name}': {nulls} result row(s) have a null '{self.key}'; "
                "every stored row needs a key. Drop or fill them in the agent."
            )
        return True

    def _stored_form(self, results: pa.Table) -> tuple[pa.Table, list[str]]:
        """``results`` as stored (each column under its physical name, as its carrier), and
        the physical names."""
        physical = self._plan(results.schema)
        columns = []
        for field, column in zip(results.schema, results.columns, strict=True):
            try:
                columns.append(_codec.encode(column, field.type))
            except (TypeError, pa.ArrowException) as exc:
                raise ExecutionError(
                    f"State table '{self.name}': column '{field.name}' ({field.type}) cannot "
                    f"be stored: {exc}. Cast it in the agent to a type DuckDB holds, or keep "
                    "it out of the stored results."
                ) from exc
        return pa.Table.from_arrays(columns, names=physical), physical

    def _plan(self, schema: pa.Schema) -> list[str]:
        """The physical column of each field of ``schema``: the one it was stored in before,
        else its own name when DuckDB holds it apart, else a new name."""
        shape = self._shape
        known = {} if shape is None else shape.names
        taken = set() if shape is None else {name.lower() for name in shape.columns}
        planned = {name: known[name] for name in schema.names if name in known}
        # Names of their own first, in order, so that "score_1" keeps its name beside "Score".
        for name in schema.names:
            if name not in planned and _is_plain(name) and name.lower() not in taken:
                planned[name] = name
                taken.add(name.lower())
        for name in schema.names:
            if name not in planned:
                planned[name] = _new_name(name, taken)
                taken.add(planned[name].lower())
        return [planned[name] for name in schema.names]

    def _evolve(
        self,
        con: duckdb.DuckDBPyConnection,
        fp: int,
        results: pa.Table,
        physical: list[str],
    ) -> _Shape:
        """Create the table, or add and retype the columns the results bring, and keep the
        schemas (inside the transaction)."""
        schema = results.schema
        shape = self._shape
        last = self._last
        if (
            shape is not None
            and last is not None
            and last[0] == fp
            and schema.equals(last[1], check_metadata=True)
        ):
            return shape
        incoming = duck_types(con, _RESULTS_VIEW)
        # An empty result describes no row (an agent may return its input's schema when it
        # keeps nothing): it changes no schema and no column's type; it may add columns.
        rows = results.num_rows > 0
        if shape is None:
            con.execute(f"CREATE TABLE {self.sql} AS SELECT * FROM {_RESULTS_VIEW} LIMIT 0")
            created = _Shape(dict(incoming), schema, tuple(physical), self.key, {})
            self._save(con, created)
            if rows:
                self._save_schema(con, fp, schema)
                created.schemas[fp] = schema
            return created
        own = shape.schemas.get(fp)
        if own is None and rows and self._has_rows_of(con, fp):
            # Rows stored before schemas were kept per fingerprint have every column.
            own = pa.schema([field.with_nullable(True) for field in shape.arrow])
        merged = self._merged_schema(own, schema) if rows else own
        columns = dict(shape.columns)
        fields = dict(zip(shape.physical, shape.arrow, strict=True))
        retyped = []
        for field, name in zip(schema, physical, strict=True):
            new_type = incoming[name]
            old_type = columns.get(name)
            if old_type is None:
                # An all-null column's type is written "NULL" (quoted) in DuckDB's DDL.
                ddl_type = '"NULL"' if new_type == "NULL" else new_type
                con.execute(f"ALTER TABLE {self.sql} ADD COLUMN {quote(name)} {ddl_type}")
            elif old_type != new_type and new_type != "NULL" and rows:
                # Not this fingerprint's column (_merged_schema said so): its values are of
                # rows other fingerprints stored, which the new type cannot hold.
                empty = " USING NULL" if old_type != "NULL" else ""
                con.execute(
                    f"ALTER TABLE {self.sql} ALTER COLUMN {quote(name)} "
                    f"SET DATA TYPE {new_type}{empty}"
                )
                if empty:
                    retyped.append(field.name)
            else:
                if rows:
                    fields[name] = _merged_field(fields[name], field)
                continue
            columns[name] = new_type
            fields[name] = field.with_nullable(True)
        if rows:
            # The rows just stored have no value in the columns they lack.
            for name in set(fields) - set(physical):
                fields[name] = fields[name].with_nullable(True)
        schemas = dict(shape.schemas)
        if retyped:
            schemas = self._invalidate(con, fp, retyped, schemas)
        if merged is not None:
            schemas[fp] = merged
        metadata = schema.metadata if rows else shape.arrow.metadata
        arrow = pa.schema(list(fields.values()), metadata=metadata)
        key = shape.key if shape.key == self.key else None
        evolved = _Shape(columns, arrow, tuple(fields), key, schemas)
        if (
            columns != shape.columns
            or key != shape.key
            or evolved.physical != shape.physical
            or not arrow.equals(shape.arrow, check_metadata=True)
        ):
            self._save(con, evolved)
        if merged is not None and (own is None or not merged.equals(own, check_metadata=True)):
            self._save_schema(con, fp, merged)
        return evolved

    def _merged_schema(self, own: pa.Schema | None, schema: pa.Schema) -> pa.Schema:
        """The schema of the rows of a fingerprint that has stored ``own``, once ``schema``'s
        are stored too: an error if a column changed type."""
        return merged_schema(own, schema, self.name)

    def _has_rows_of(self, con: duckdb.DuckDBPyConnection, fp: int) -> bool:
        """Whether result rows are stored under keys done under ``fp``."""
        found = con.sql(
            f"SELECT 1 FROM {self.done_sql} WHERE fp = ? "
            f"AND key IN (SELECT {self.key_sql} FROM {self.sql}) LIMIT 1",
            params=[fp],
        ).fetchall()
        return bool(found)

    def _invalidate(
        self,
        con: duckdb.DuckDBPyConnection,
        fp: int,
        names: list[str],
        schemas: dict[int, pa.Schema],
    ) -> dict[int, pa.Schema]:
        """Mark not done the keys of the fingerprints other than ``fp`` whose rows may have
        values in the columns ``names`` (being emptied); return ``schemas`` without theirs."""
        stale = [
            other
            for other, schema in schemas.items()
            if other != fp and any(name in schema.names for name in names)
        ]
        # The fingerprints known not to have those columns keep their done keys.
        kept = [NOT_DONE, fp, *(other for other in schemas if other != fp and other not in stale)]
        done_tables = con.sql(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = ? "
            "AND starts_with(lower(table_name), lower(?))",
            params=[SCHEMA, f"done:{self.name}:"],
        ).fetchall()
        for (done,) in done_tables:
            con.execute(
                f"UPDATE {SCHEMA}.{quote(str(done))} SET fp = ? WHERE NOT list_contains(?, fp)",
                [NOT_DONE, kept],
            )
        if stale:
            con.execute(
                f"DELETE FROM {SCHEMA}.{_SCHEMAS} WHERE lower(table_name) = lower(?) "
                "AND list_contains(?, fp)",
                [self.name, stale],
            )
        return {other: schema for other, schema in schemas.items() if other not in stale}

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
        key = quote(shape.names.get(self.key, self.key)) if shape is not None else ""
        if extra is not None:
            self._check_added(con, fp, keys_sql)
        if shape is not None and not fresh:
            # The rows these keys' streams added before go with them.
            con.execute(
                f"DELETE FROM {self.sql} WHERE {key} IN ({keys_sql}) OR {key} IN (SELECT key "
                f"FROM {self.done_sql} WHERE fp = ? AND anchor IN ({keys_sql}))",
                [NOT_DONE],
            )
            con.execute(
                f"DELETE FROM {self.done_sql} WHERE fp = ? AND anchor IN ({keys_sql})", [NOT_DONE]
            )
        if shape is not None and extra is not None:
            con.execute(f"DELETE FROM {self.sql} WHERE {key} IN (SELECT key FROM {_EXTRA_VIEW})")
        if results.num_rows:
            con.execute(f"INSERT INTO {self.sql} BY NAME SELECT * FROM {_RESULTS_VIEW}")
        if not fresh:
            con.execute(f"DELETE FROM {self.done_sql} WHERE key IN ({keys_sql})")
        if not unique:
            keys_sql = f"SELECT DISTINCT key FROM ({keys_sql}) WHERE key IS NOT NULL"
        con.execute(f"INSERT INTO {self.done_sql} (fp, key) SELECT ?, key FROM ({keys_sql})", [fp])
        if extra is not None:
            # Their rows were just replaced: what another fingerprint stored for them is gone.
            con.execute(
                f"UPDATE {self.done_sql} SET fp = ? WHERE fp <> ? "
                f"AND key IN (SELECT key FROM {_EXTRA_VIEW})",
                [NOT_DONE, fp],
            )
            con.execute(
                f"UPDATE {self.done_sql} SET anchor = e.anchor FROM {_EXTRA_VIEW} e "
                f"WHERE {self.done_sql}.fp = ? AND {self.done_sql}.key = e.key",
                [NOT_DONE],
            )
            con.execute(
                f"INSERT INTO {self.done_sql} SELECT ?, key, anchor FROM {_EXTRA_VIEW} "
                f"WHERE key NOT IN (SELECT key FROM {self.done_sql})",
                [NOT_DONE],
            )

    def _check_added(self, con: duckdb.DuckDBPyConnection, fp: int, keys_sql: str) -> None:
        """Refuse keys added by this stream that another stream of ``fp`` added too."""
        taken = con.sql(
            f"SELECT e.key FROM {_EXTRA_VIEW} e JOIN {self.done_sql} d ON d.key = e.key "
            f"WHERE d.fp = {NOT_DONE:d} AND d.anchor NOT IN ({keys_sql}) AND d.anchor IN "
            f"(SELECT key FROM {self.done_sql} WHERE fp = {fp:d}) LIMIT 5"
        ).fetchall()
        if taken:
            shown = ", ".join(repr(row[0]) for row in taken)
            raise ExecutionError(
                f"State table '{self.name}': the agents added rows under key {shown}, which "
                "more than one stream added: the store keeps one stream's added rows per key, "
                "so a rerun could not return both. Give each added row a key of its own (one "
                "that no other stream uses), or add such rows after the scope."
            )

    def _save(self, con: duckdb.DuckDBPyConnection, shape: _Shape) -> None:
        metadata = dict(shape.arrow.metadata or {})
        metadata[_PHYSICAL] = json.dumps(list(shape.physical)).encode()
        blob = bytes(shape.arrow.with_metadata(metadata).serialize().to_pybytes())
        con.execute(
            f"DELETE FROM {SCHEMA}.result_tables WHERE lower(table_name) = lower(?)", [self.name]
        )
        con.execute(
            f"INSERT INTO {SCHEMA}.result_tables VALUES (?, ?, ?)", [self.name, blob, shape.key]
        )

    def _save_schema(self, con: duckdb.DuckDBPyConnection, fp: int, schema: pa.Schema) -> None:
        table = f"{SCHEMA}.{_SCHEMAS}"
        con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({_LAYOUT_TABLES[_SCHEMAS]})")
        con.execute(
            f"DELETE FROM {table} WHERE lower(table_name) = lower(?) AND fp = ?", [self.name, fp]
        )
        blob = bytes(schema.serialize().to_pybytes())
        con.execute(f"INSERT INTO {table} VALUES (?, ?, ?)", [self.name, fp, blob])

    # -- reading ---------------------------------------------------------------------------

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
        done = (
            f"SELECT d.key FROM {self.done_sql} d "
            f"WHERE d.fp = {fp:d} AND d.key IN (SELECT key FROM {_KEYS_VIEW})"
        )
        with registered(con, **{_KEYS_VIEW: pa.table({"key": keys})}):
            loaded = con.sql(
                f"SELECT {self.stored_columns_sql(fp, 'r')} FROM {self.sql} r "
                f"WHERE r.{self.key_sql} IN ({done}) OR r.{self.key_sql} IN (SELECT e.key "
                f"FROM {self.done_sql} e WHERE e.fp = {NOT_DONE:d} AND e.anchor IN ({done})) "
                "ORDER BY r.rowid"
            ).to_arrow_table()
        return self.restore_types(loaded, like)

    def restore_types(self, table: pa.Table, like: pa.Table | None = None) -> pa.Table:
        """``table`` (read from DuckDB) as the agents produced it: names, types, nullability
        and metadata.

        Selected with :meth:`stored_columns_sql`, the rows are given exactly the columns of
        its fingerprint (one added to it since they were read is null); otherwise (``SELECT
        *``) every column of the table, as the agents last produced it.

        A column stored as a dictionary that ``like`` (the input rows the stored rows stand
        for) also holds as a dictionary is encoded with ``like``'s dictionary and index type
        when it has every value: a passed-through ``Categorical`` then comes back exactly as
        this run's agents return it, codes included. Other dictionary columns are encoded
        anew.

        Raises:
            ExecutionError: a column cannot take the type it was stored from.
        """
        shape = self._shape  # once: the run's writer may replace it meanwhile
        if shape is None:
            mark = _mark_of(table)
            return table if mark is None else table.drop_columns([mark])
        known, reads = self._reads
        if known is not shape:  # what was worked out for another shape does not hold
            reads = {}
            self._reads = (shape, reads)
        # Worked out once per schema read: stream after stream, the same (the last one is
        # compared first: hashing a schema costs more than comparing it).
        schema = table.schema
        last = self._last_read
        if last is not None and last[0] is shape and last[1].equals(schema):
            read = last[2]
        else:
            found = reads.get(schema)
            read = _Read.of(shape, table) if found is None else found
            reads[schema] = read
            self._last_read = (shape, schema, read)
        if read.plain is not None:
            # Read as stored: the same columns, types as they were; names and metadata.
            picked = table.select(read.columns)
            return picked if read.as_is else pa.Table.from_arrays(picked.columns, schema=read.plain)
        if read.mark is not None:
            table = table.drop_columns([read.mark])
        fields = []
        columns = []
        names = set(table.column_names)
        for field, name in read.pairs:
            if name in names:
                source = None
                if like is not None and field.name in like.column_names:
                    source = like[field.name]
                restored = self._decoded(table[name], field, source)
            else:
                restored = pa.chunked_array([pa.nulls(table.num_rows, field.type)])
            fields.append(field.with_type(restored.type))
            columns.append(restored)
        return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=read.metadata))

    def _decoded(
        self, column: pa.ChunkedArray, field: pa.Field, source: pa.ChunkedArray | None
    ) -> pa.ChunkedArray:
        try:
            if _codec.needs_carrier(field.type) or pa.types.is_null(field.type):
                return _codec.decode(column, field.type)
            return _restored(column, field.type, source)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise ExecutionError(
                f"State table '{self.name}': column '{field.name}' is stored as {column.type} "
                f"and cannot be read back as {field.type}, the type the agents produced: {exc}"
            ) from exc

    def read_all(self, con: duckdb.DuckDBPyConnection) -> pa.RecordBatchReader:
        """Every stored row, ordered by key (then by the order they were stored in)."""
        relation = con.sql(f"SELECT * FROM {self.sql} ORDER BY {self.key_sql}, rowid")
        # Older DuckDB releases only have fetch_arrow_reader, deprecated in DuckDB 2.
        to_reader = getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader
        reader: pa.RecordBatchReader = to_reader()
        return reader


def _plain_read(
    pairs: list[tuple[pa.Field, str]], read: pa.Schema, metadata: dict[bytes, bytes] | None
) -> pa.Schema | None:
    """The schema rows read as ``read`` take as they are, when every column of ``pairs`` was
    read with its own type (no carrier to decode, no dictionary to encode); else ``None``."""
    for field, name in pairs:
        index = read.get_field_index(name)
        if index < 0 or not read.field(index).type.equals(field.type):
            return None
        if pa.types.is_dictionary(field.type) or _codec.needs_carrier(field.type):
            return None
    return pa.schema([field for field, _ in pairs], metadata=metadata)


@dataclass(frozen=True, slots=True)
class _Read:
    """How rows read from the table with one schema are restored (see ``restore_types``).

    Attributes:
        mark: the column naming the fingerprint whose columns were selected, if any.
        pairs: each field to restore, with the physical column it is read from.
        metadata: the schema metadata to restore.
        plain: the restored schema when the columns need no decoding (only names and
            metadata change), else ``None``.
        columns: with ``plain``, the read columns that hold its fields, in its order.
        as_is: with ``plain``, whether those columns already have its names and metadata.
    """

    mark: str | None
    pairs: list[tuple[pa.Field, str]]
    metadata: dict[bytes, bytes] | None
    plain: pa.Schema | None
    columns: list[int]
    as_is: bool

    @classmethod
    def of(cls, shape: _Shape, table: pa.Table) -> _Read:
        mark = _mark_of(table)
        schema = shape.arrow
        if mark is not None:
            fp = int(mark[len(_MARK) :])
            schema = shape.schemas.get(fp, schema)
            pairs = _columns_of(shape, fp)
        else:
            by_physical = {name: field for field, name in _columns_of(shape, None)}
            pairs = [
                (by_physical.get(name, table.schema.field(name)), name)
                for name in table.column_names
            ]
        read = table.schema
        plain = _plain_read(pairs, read, schema.metadata)
        columns = [read.get_field_index(name) for _, name in pairs] if plain is not None else []
        as_is = plain is not None and pa.schema([read.field(i) for i in columns]).equals(
            plain, check_metadata=True
        )
        return cls(mark, pairs, schema.metadata, plain, columns, as_is)


def _mark_of(table: pa.Table) -> str | None:
    return next((name for name in table.column_names if name.startswith(_MARK)), None)


def _columns_of(shape: _Shape, fp: int | None) -> list[tuple[pa.Field, str]]:
    """The fields of fingerprint ``fp`` (the table's when ``None`` or unknown), each with its
    physical column."""
    schema = None if fp is None else shape.schemas.get(fp)
    if schema is None:
        # The whole table: rows stored before schemas were kept per fingerprint.
        return list(zip(shape.arrow, shape.physical, strict=True))
    return [(field, shape.names[field.name]) for field in schema]


def _is_plain(name: str) -> bool:
    """Whether DuckDB holds a column of this name as itself."""
    lowered = name.lower()
    return bool(name) and lowered not in _PSEUDO_COLUMNS and not lowered.startswith(_RESERVED)


def _new_name(name: str, taken: set[str]) -> str:
    """A physical name for the column ``name``: ``name_1``, ``name_2`` ... the first free."""
    base = (name.lstrip("_") if name.lower().startswith(_RESERVED) else name) or "column"
    number = 1
    while f"{base}_{number}".lower() in taken or not _is_plain(f"{base}_{number}"):
        number += 1
    return f"{base}_{number}"


def _merged_field(old: pa.Field, new: pa.Field) -> pa.Field:
    """A column of the table once ``new``'s rows are stored in it (``old`` describing the
    rows before): the type of the latest agents where DuckDB's is the same."""
    kind = merged_type(old.type, new.type) or new.type
    return pa.field(new.name, kind, old.nullable or new.nullable, new.metadata)


def _restored(
    column: pa.ChunkedArray, target: pa.DataType, source: pa.ChunkedArray | None
) -> pa.ChunkedArray:
    if (
        source is not None
        and pa.types.is_dictionary(target)
        and pa.types.is_dictionary(source.type)
    ):
        encoded = encoded_like(column, source)
        if encoded is not None:
            return encoded
    return column if column.type.equals(target) else column.cast(target)
