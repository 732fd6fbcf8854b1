"""The layout of a DuckDB state database, and opening one.

A state database holds the user's result tables in the ``main`` schema (one per ``table=``,
named as given) and arrowflow's own tables in the ``arrowflow`` schema:

- ``meta(name, value)``: ``layout_version`` (:data:`LAYOUT_VERSION`), checked on every open.
- ``fingerprints(id, fingerprint, description, created_at)``: each scope identity
  seen, its sha256 and the JSON it was computed from (to tell why rows were reprocessed).
- ``result_tables(table_name, arrow_schema, key_column)``: the Arrow schema of each result
  table, so loaded rows come back with the types the agents produced (DuckDB would turn
  ``large_string`` into ``string``, rename time zones, ...), and the key column its rows were
  written with (``NULL`` once written with several).
- ``"done:<table>:<key>"(fp, key)``: per result table and key column, one row per key with
  anything stored: ``fp`` is the fingerprint it was done under (filtered-out keys included, with
  no result row), or 0 for a key with result rows that no run marked done.
- ``runs``, ``streams``, ``failures``: one row per run, per stream of a run, per failed stream.

A change of layout bumps :data:`LAYOUT_VERSION`; a database written by a newer layout is
refused rather than misread.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING

import duckdb

from arrowflow.exceptions import ExecutionError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pyarrow as pa

__all__ = [
    "LAYOUT_VERSION",
    "SCHEMA",
    "duck_types",
    "open_database",
    "quote",
    "registered",
    "results_table",
    "transaction",
]

LAYOUT_VERSION = 1
SCHEMA = "arrowflow"

_TABLES = {
    "meta": "name VARCHAR NOT NULL, value VARCHAR NOT NULL",
    "fingerprints": (
        "id INTEGER NOT NULL, fingerprint VARCHAR NOT NULL, description VARCHAR NOT NULL, "
        "created_at TIMESTAMPTZ NOT NULL"
    ),
    "result_tables": "table_name VARCHAR NOT NULL, arrow_schema BLOB NOT NULL, key_column VARCHAR",
    "runs": (
        "run_id BIGINT NOT NULL, table_name VARCHAR NOT NULL, fingerprint VARCHAR NOT NULL, "
        "key VARCHAR NOT NULL, status VARCHAR NOT NULL, started_at TIMESTAMPTZ NOT NULL, "
        "ended_at TIMESTAMPTZ, total_batches BIGINT, successful_batches BIGINT, "
        "failed_batches BIGINT, total_items BIGINT, processed_items BIGINT, "
        "skipped_items BIGINT, loaded_items BIGINT"
    ),
    "streams": (
        "run_id BIGINT NOT NULL, stream_num BIGINT, rows_in BIGINT, rows_out BIGINT, "
        "skipped BIGINT, loaded BIGINT, seconds DOUBLE, attempts BIGINT, status VARCHAR, "
        "error VARCHAR"
    ),
    "failures": (
        "run_id BIGINT, table_name VARCHAR NOT NULL, fingerprint VARCHAR NOT NULL, "
        "stream_num BIGINT NOT NULL, rows BIGINT NOT NULL, keys BIGINT, error VARCHAR NOT NULL, "
        "failed_at TIMESTAMPTZ NOT NULL"
    ),
}


def quote(name: str) -> str:
    """``name`` as a DuckDB identifier: double-quoted, inner quotes doubled."""
    return '"' + name.replace('"', '""') + '"'


def results_table(table: str) -> str:
    """The quoted name of a result table (in ``main``, so ``select * from quick_fit`` works)."""
    return f"main.{quote(table)}"


@contextmanager
def registered(con: duckdb.DuckDBPyConnection, **tables: pa.Table) -> Iterator[None]:
    """Register Arrow tables as DuckDB views for the duration of a ``with`` block."""
    for name, table in tables.items():
        con.register(name, table)
    try:
        yield
    finally:
        for name in tables:
            con.unregister(name)


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """``BEGIN`` … ``COMMIT``, or ``ROLLBACK`` when the block raises."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def duck_types(con: duckdb.DuckDBPyConnection, relation: str) -> dict[str, str]:
    """Column name to DuckDB type of ``relation`` (a table or a registered Arrow view)."""
    described = con.sql(f"DESCRIBE SELECT * FROM {relation}").fetchall()
    return {str(row[0]): _normalise(str(row[1])) for row in described}


def _normalise(type_name: str) -> str:
    # DESCRIBE shows the type of an all-null Arrow column as "NULL" with quotes.
    return type_name.strip('"')


def open_database(path: str) -> duckdb.DuckDBPyConnection:
    """Connect to ``path`` and make sure it holds arrowflow's tables, at our layout version.

    A missing parent directory is created, as the Parquet sink does.

    Raises:
        ExecutionError: the file is locked by another process, is not a DuckDB database, is
            damaged, or was written by a newer layout. The message names the path and says
            what to do.
    """
    try:
        if path != ":memory:":
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        con = duckdb.connect(path)
    except OSError as exc:
        raise ExecutionError(
            f"State database '{path}' cannot be created: {exc}. Give the store a path= in a "
            "directory you can write to."
        ) from exc
    except duckdb.Error as exc:
        raise ExecutionError(_open_failure(path, exc)) from exc
    try:
        _prepare(con, path)
    except duckdb.Error as exc:
        con.close()
        raise ExecutionError(
            f"State database '{path}' cannot be read: {exc}. It may be damaged; move it away "
            "(arrowflow then starts a new one) or give the store another path=."
        ) from exc
    except BaseException:
        con.close()
        raise
    return con


def _open_failure(path: str, exc: duckdb.Error) -> str:
    text = str(exc)
    # Not just "lock": a damaged file's message may say "block".
    if "could not set lock" in text.lower() or "conflicting lock" in text.lower():
        return (
            f"State database '{path}' is locked by another process: {text}. Wait for that run "
            "to end (or stop it), or give this store another path=."
        )
    return (
        f"State database '{path}' cannot be opened: {text}. It is not a DuckDB database or it "
        "is damaged; move it away (arrowflow then starts a new one) or give the store another "
        "path=."
    )


def _prepare(con: duckdb.DuckDBPyConnection, path: str) -> None:
    ours = con.sql(
        "SELECT table_name FROM duckdb_tables() WHERE schema_name = ?", params=[SCHEMA]
    ).fetchall()
    names = {str(row[0]) for row in ours}
    if "meta" in names:
        _check_version(con, path)
        return
    if names:
        raise ExecutionError(
            f"State database '{path}' has a schema '{SCHEMA}' that arrowflow did not write "
            f"(tables: {', '.join(sorted(names))}). Give the store another path=."
        )
    with transaction(con):
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        for name, columns in _TABLES.items():
            con.execute(f"CREATE TABLE {SCHEMA}.{name} ({columns})")
        con.execute(
            f"INSERT INTO {SCHEMA}.meta VALUES ('layout_version', ?)", [str(LAYOUT_VERSION)]
        )


def _check_version(con: duckdb.DuckDBPyConnection, path: str) -> None:
    rows = con.sql(f"SELECT value FROM {SCHEMA}.meta WHERE name = 'layout_version'").fetchall()
    found = str(rows[0][0]) if rows else None
    if found is not None and found.isdigit() and int(found) == LAYOUT_VERSION:
        return
    if found is not None and found.isdigit() and int(found) > LAYOUT_VERSION:
        problem = f"has layout version {found}, newer than this arrowflow reads ({LAYOUT_VERSION})"
        advice = "Upgrade arrowflow, or give the store another path=."
    else:
        problem = f"has an unknown layout version {found!r} (expected {LAYOUT_VERSION})"
        advice = "Move it away (arrowflow then starts a new one) or give another path=."
    raise ExecutionError(f"State database '{path}' {problem}. {advice}")
