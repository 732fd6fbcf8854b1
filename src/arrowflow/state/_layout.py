"""The layout of a DuckDB state database, and opening one.

A state database holds the user's result tables in the ``main`` schema (one per ``table=``,
named as given) and arrowflow's own tables in the ``arrowflow`` schema:

- ``meta(name, value)``: ``layout_version`` (:data:`LAYOUT_VERSION`), checked on every open.
- ``fingerprints(id, fingerprint, description, created_at)``: each scope identity
  seen, its sha256 and the JSON it was computed from (to tell why rows were reprocessed).
- ``result_tables(table_name, arrow_schema, key_column)``: the Arrow schema of each result
  table, so loaded rows come back with the types the agents produced (DuckDB would turn
  ``large_string`` into ``string``, rename time zones, ...), and the key column its rows were
  written with (``NULL`` once written with several). Its schema metadata maps each column to
  its physical name, for the names DuckDB cannot hold apart (``rowid``, ``Score`` beside
  ``score``).
- ``result_schemas(table_name, fp, arrow_schema)``: per result table and fingerprint id, the
  exact Arrow schema the agents produced under that fingerprint (names, types, nullability,
  metadata), which the rows done under it are read back as. A database written before this
  table existed gets it when it is first needed; its rows are read with the whole table's
  schema.
- ``"done:<table>:<key>"(fp, key)``: per result table and key column, one row per key with
  anything stored: ``fp`` is the fingerprint it was done under (filtered-out keys included, with
  no result row), or 0 for a key with result rows that no run marked done, or whose rows are
  stale (another fingerprint emptied a column they had values in).
- ``runs``, ``streams``, ``failures``: one row per run, per stream of a run, per failed stream.

A change of layout bumps :data:`LAYOUT_VERSION`; a database written by a newer layout is
refused rather than misread.

Errors say what happened, name the path and say what to do: a file locked by another process
(which one) or open in this process with other settings, a permission problem, a file that is
not a DuckDB database or is damaged (only then is the advice to move it away: arrowflow then
starts a new one), a file of another DuckDB version, an ``arrowflow`` schema arrowflow did not
write. A failing statement of the store goes through :func:`store_errors` (or
:func:`translated`): disk full, I/O error, out of memory, permissions, a damaged file.
Interrupts (``duckdb.InterruptException``, "Query interrupted") are never translated.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, NoReturn

import duckdb

from arrowflow._retry import is_interrupt
from arrowflow.exceptions import ExecutionError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pyarrow as pa

__all__ = [
    "LAYOUT_VERSION",
    "SCHEMA",
    "duck_types",
    "is_out_of_memory",
    "open_database",
    "quote",
    "raise_translated",
    "registered",
    "results_table",
    "store_errors",
    "transaction",
    "translated",
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
    "result_schemas": (
        "table_name VARCHAR NOT NULL, fp INTEGER NOT NULL, arrow_schema BLOB NOT NULL"
    ),
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


_MEMORY = ":memory:"
# DuckDB's main header is an 8-byte checksum followed by these magic bytes.
_MAGIC = b"DUCK"
_MAGIC_AT = 8
_FORMATS = (
    (b"SQLite format 3\x00", "a SQLite database"),
    (b"PAR1", "a Parquet file"),
    (b"ARROW1", "an Arrow IPC file"),
)
_DAMAGED = (
    "corrupt database file",
    "could not read enough bytes",
    "does not match stored checksum",
)
_MOVE_AWAY = "Move it away (arrowflow then starts a new one) or give the store another path="
_RERUN = "then rerun: completed streams are kept"
_LOCK_HOLDER = re.compile(r"lock is held in (?P<program>.*?) \(PID (?P<pid>\d+)\)")


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
    except BaseException:
        # In a transaction the error aborted, unregistering fails too: the block's error is
        # the one to see (a later register of the same name replaces the view anyway).
        with suppress(duckdb.Error):
            for name in tables:
                con.unregister(name)
        raise
    for name in tables:
        con.unregister(name)


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """``BEGIN`` … ``COMMIT``, or ``ROLLBACK`` when the block raises."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException as exc:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error as failed:
            # After a fatal error (a full disk, say) ROLLBACK fails too: keep the first error.
            if _is_interrupt(failed):
                raise
            exc.add_note(f"ROLLBACK failed too: {failed}")
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

    A missing parent directory is created, as the Parquet sink does. A file that is refused is
    left as it was, byte for byte.

    Raises:
        ExecutionError: the file is locked by another process or open in this one with other
            settings, cannot be read or written by this user, is not a DuckDB database, is
            damaged, was written by another DuckDB version or a newer layout, or holds an
            ``arrowflow`` schema arrowflow did not write. The message names the path and says
            what to do.
    """
    if path != _MEMORY:
        _check_file(path)
    try:
        con = duckdb.connect(path)
    except duckdb.Error as exc:
        if _is_interrupt(exc):
            raise
        raise ExecutionError(_open_failure(path, exc)) from exc
    try:
        _prepare(con, path)
    except BaseException as exc:
        con.close()
        if isinstance(exc, duckdb.Error) and not _is_interrupt(exc):
            raise translated(exc, f"State database '{path}'") from exc
        raise
    return con


def translated(exc: duckdb.Error, where: str) -> ExecutionError:
    """An ``ExecutionError`` saying what the DuckDB error ``exc`` means, chained to it.

    ``where`` names what failed (``"State table 'quick_fit' (/data/state.duckdb)"``); the
    message adds what happened (disk full, I/O error, out of memory, permission denied, a
    damaged file, or DuckDB's own words) and what to do. Not for interrupts, which must
    propagate as they are: :func:`store_errors` checks that first.

    Example:
        >>> error = translated(duckdb.IOException("IO Error: No space left on device"), "Here")
        >>> str(error).split(":")[0], error.__cause__ is not None
        ('Here', True)
    """
    what, advice = _diagnosis(exc)
    error = ExecutionError(f"{where}: {what} ({_first_line(exc)}). {advice}.")
    error.__cause__ = exc
    return error


@contextmanager
def store_errors(where: str) -> Iterator[None]:
    """Turn a ``duckdb.Error`` raised in the block into :func:`translated`'s ``ExecutionError``.

    Interrupts (``duckdb.InterruptException``, "Query interrupted") propagate unchanged, and so
    does every exception that is not a ``duckdb.Error``.
    """
    try:
        yield
    except duckdb.Error as exc:
        raise_translated(exc, where)


def raise_translated(exc: duckdb.Error, where: str) -> NoReturn:
    """Raise :func:`translated`'s error for ``exc`` (from it), or ``exc`` itself when it is an
    interrupt; for an ``except duckdb.Error`` clause, as :func:`store_errors` does."""
    if _is_interrupt(exc):
        raise exc
    raise translated(exc, where) from exc


def _is_interrupt(exc: BaseException) -> bool:
    return is_interrupt(exc) or str(exc) == "Query interrupted"


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is DuckDB running out of memory (within its ``memory_limit``)."""
    return isinstance(exc, duckdb.OutOfMemoryException) or (
        isinstance(exc, duckdb.Error) and "out of memory" in str(exc).lower()
    )


def _diagnosis(exc: duckdb.Error) -> tuple[str, str]:
    """What a DuckDB error means for the store, and what to do about it."""
    text = str(exc).lower()
    if is_out_of_memory(exc):
        return "DuckDB ran out of memory", f"Free memory or use smaller streams, {_RERUN}"
    if "no space left" in text or "disk full" in text or "disk is full" in text:
        return "the disk is full", f"Free space on the disk that holds the database, {_RERUN}"
    if "permission denied" in text:
        return "permission denied", (
            "Let this user read and write the file and its directory (chmod u+rw), "
            "or give the store another path="
        )
    if any(mark in text for mark in _DAMAGED):
        return "the database file is damaged", _MOVE_AWAY
    if "database has been invalidated" in text:
        return "an earlier fatal error left the database unusable in this process", (
            f"Close the store (store.close()) and look for that error, {_RERUN}"
        )
    if isinstance(exc, duckdb.IOException):
        return "an I/O error", f"Check the disk and the file system that hold the file, {_RERUN}"
    return (
        "DuckDB failed",
        "If the database was changed outside arrowflow, give the store another path=",
    )


def _check_file(path: str) -> None:
    """Refuse, before DuckDB opens it, a path it could not open as a database of the store.

    A file that is not a DuckDB database never reaches DuckDB, which would try to download an
    extension to open a SQLite file.
    """
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise ExecutionError(
            f"State database '{path}' cannot be created: {exc}. Give the store a path= in a "
            "directory you can write to."
        ) from exc
    try:
        with open(path, "rb") as file:
            head: bytes | None = file.read(512)
    except FileNotFoundError:
        head = None
    except IsADirectoryError as exc:
        raise ExecutionError(
            f"State database '{path}' is a directory. Give the store the path= of a file "
            f"('{os.path.join(path, 'state.duckdb')}', say)."
        ) from exc
    except PermissionError as exc:
        raise ExecutionError(
            _permission_problem(path, exists=True)
            or f"State database '{path}' cannot be read: {exc}. Give this user access, or give "
            "the store another path=."
        ) from exc
    if head is not None and head[_MAGIC_AT : _MAGIC_AT + len(_MAGIC)] != _MAGIC:
        raise ExecutionError(
            f"State database '{path}' is not a DuckDB database: it is {_looks_like(head)}. "
            f"{_MOVE_AWAY}."
        )
    problem = _permission_problem(path, exists=head is not None)
    if problem is not None:
        raise ExecutionError(problem)


def _looks_like(head: bytes) -> str:
    if not head:
        return "empty"
    for magic, name in _FORMATS:
        if head.startswith(magic):
            return name
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "another kind of file, or a DuckDB file whose first bytes are damaged"
    return "a text file"


def _permission_problem(path: str, *, exists: bool) -> str | None:
    """What this user may not do that DuckDB needs, or ``None``."""
    directory = os.path.dirname(path) or "."

    def allowed(target: str, mode: int) -> bool:
        return os.access(target, mode, effective_ids=os.access in os.supports_effective_ids)

    readable = False
    if not allowed(directory, os.X_OK):
        problem, fix = f"is in directory '{directory}', which this user cannot enter", "u+rwx"
        target = directory
    elif exists and not allowed(path, os.R_OK):
        problem, fix, target = "cannot be read by this user", "u+rw", path
    elif exists and not allowed(path, os.W_OK):
        problem, fix, target = "cannot be written by this user (it is read-only)", "u+rw", path
        readable = True
    elif not allowed(directory, os.W_OK):
        problem, fix, target = (
            f"is in directory '{directory}', where this user cannot create files",
            "u+rwx",
            directory,
        )
        if exists:
            problem += f" (DuckDB writes its journal '{path}.wal' beside the database)"
            readable = True
    else:
        return None
    reading = " To only read it, use duckdb.connect(path, read_only=True)." if readable else ""
    return (
        f"State database '{path}' {problem}. Give this user access (chmod {fix} '{target}'), "
        f"or give the store another path=.{reading}"
    )


def _open_failure(path: str, exc: duckdb.Error) -> str:
    text = str(exc)
    lowered = text.lower()
    if "different configuration" in lowered:
        return (
            f"State database '{path}' is already open in this process with other settings (a "
            "duckdb.connect(path, read_only=True) of yours, say), and DuckDB opens a file one "
            "way per process. Close that connection (con.close()) before the run, or give the "
            "store another path=."
        )
    # Not just "lock": a damaged file's message may say "block".
    if "could not set lock" in lowered or "conflicting lock" in lowered:
        return _lock_failure(path, text)
    if "version number" in lowered:
        return (
            f"State database '{path}' was written by another version of DuckDB than this one "
            f"({duckdb.__version__}): {_first_line(exc)}. Open it with a DuckDB that reads it "
            "(upgrade duckdb, say), or give the store another path=."
        )
    if "not a valid duckdb database" in lowered:
        return (
            f"State database '{path}' is not a DuckDB database ({_first_line(exc)}). {_MOVE_AWAY}."
        )
    if "permission denied" in lowered and path != _MEMORY:
        problem = _permission_problem(path, exists=os.path.exists(path))
        if problem is not None:
            return problem
    what, advice = _diagnosis(exc)
    return f"State database '{path}' cannot be opened: {what} ({_first_line(exc)}). {advice}."


def _lock_failure(path: str, text: str) -> str:
    holder = _LOCK_HOLDER.search(text)
    who = "another process"
    if holder is not None:
        pid = int(holder["pid"])
        who += f" (PID {pid}: {_command(pid) or holder['program']})"
    if "read-only mode" in text:
        who += ", which has it open read-only (that keeps writers out too)"
    return (
        f"State database '{path}' is locked by {who}. Wait for that process to finish or stop "
        "it (an arrowflow run, or a DuckDB connection it keeps open), or give this store "
        "another path=."
    )


def _command(pid: int) -> str | None:
    """The command line of process ``pid``, shortened, where the system shows it (Linux)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            words = file.read().split(b"\0")
    except OSError:
        return None
    command = " ".join(word.decode(errors="replace") for word in words if word)
    return command if len(command) <= 120 else command[:117] + "..."


def _prepare(con: duckdb.DuckDBPyConnection, path: str) -> None:
    tables = _names(con, "SELECT table_name FROM duckdb_tables() WHERE schema_name = ?")
    views = _names(
        con, "SELECT view_name FROM duckdb_views() WHERE schema_name = ? AND NOT internal"
    )
    if "meta" in tables and _columns(con, "meta") == [("name", "VARCHAR"), ("value", "VARCHAR")]:
        _check_version(con, path)
        return
    if tables or views:
        found = ", ".join(sorted(tables | views))
        raise ExecutionError(
            f"State database '{path}' has a schema '{SCHEMA}' that arrowflow did not write "
            f"(tables: {found}), and arrowflow keeps its bookkeeping there. The file is left as "
            "it is: give the store another path=."
        )
    with transaction(con):
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        for name, columns in _TABLES.items():
            con.execute(f"CREATE TABLE {SCHEMA}.{name} ({columns})")
        con.execute(
            f"INSERT INTO {SCHEMA}.meta VALUES ('layout_version', ?)", [str(LAYOUT_VERSION)]
        )


def _names(con: duckdb.DuckDBPyConnection, query: str) -> set[str]:
    return {str(row[0]) for row in con.sql(query, params=[SCHEMA]).fetchall()}


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple[str, str]]:
    rows = con.sql(
        "SELECT column_name, data_type FROM duckdb_columns() WHERE schema_name = ? "
        "AND table_name = ? ORDER BY column_index",
        params=[SCHEMA, table],
    ).fetchall()
    return [(str(name), str(kind)) for name, kind in rows]


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
        advice = (
            "It was not written by this arrowflow, and the file is left as it is: give the "
            "store another path=."
        )
    raise ExecutionError(f"State database '{path}' {problem}. {advice}")
