"""What a DuckDB state file holds, read without changing it: ``arrowflow stats`` prints it.

For each result table: the key column, the rows stored, the rows done per fingerprint, the runs
with their times, status and totals, and the failed streams. The file is opened read-only, so
it can be read while no run holds it (a run in progress keeps it locked) and is left byte for
byte as it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from arrowflow.exceptions import ExecutionError
from arrowflow.state._layout import _MAGIC, _MAGIC_AT, LAYOUT_VERSION, SCHEMA, _looks_like, quote
from arrowflow.state._results import NOT_DONE

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    #: Makes the name of one of arrowflow's tables into its qualified, quoted name.
    _Qualify = Callable[[str], str]

__all__ = ["StateSummary", "TableState", "inspect_state"]

_DONE_PREFIX = "done:"
# Never fetch an extension to open a file: a stats command reads, it installs nothing.
_READ_ONLY_CONFIG: dict[str, str | bool | int | float | list[str]] = {
    "autoload_known_extensions": False,
    "autoinstall_known_extensions": False,
}


@dataclass(frozen=True)
class TableState:
    """What a state file holds for one result table.

    Attributes:
        name: the table's name.
        key: the key column its rows were written with (``None`` before any was, or when
            several were).
        result_rows: the rows in the result table.
        done: one row per key column and fingerprint: ``key_column``, ``fp``, ``fingerprint``
            (``None`` for rows stored but not done: stale, or written outside a run),
            ``description`` (the JSON of the agents, field, key and version it stands for)
            and ``rows_done``.
        runs: one row per run, oldest first: ``run_id``, ``fingerprint``, ``key``, ``status``,
            ``started_at``, ``ended_at`` and the run's totals (``total_batches``,
            ``successful_batches``, ``failed_batches``, ``total_items``, ``processed_items``,
            ``skipped_items``, ``loaded_items``). A run still marked ``running`` in a file no
            process holds is reported ``killed``, as the next run will record it.
        failures: one row per failed stream, oldest first: ``run_id``, ``stream_num``,
            ``rows``, ``keys``, ``error``, ``failed_at``.
    """

    name: str
    key: str | None
    result_rows: int
    done: pa.Table
    runs: pa.Table
    failures: pa.Table

    @property
    def fingerprint(self) -> str | None:
        """The fingerprint of the last run: its rows done are what a rerun of it skips."""
        if self.runs.num_rows:
            return str(self.runs["fingerprint"][-1].as_py())
        return None

    @property
    def rows_done(self) -> int:
        """The rows done under the last run's fingerprint (under any, before any run)."""
        done = self.done.filter(pc.is_valid(self.done["fingerprint"]))
        if self.fingerprint is not None:
            done = done.filter(pc.equal(done["fingerprint"], self.fingerprint))
        return int(pc.sum(done["rows_done"]).as_py() or 0)


@dataclass(frozen=True)
class StateSummary:
    """What a state file holds: its layout version and, per result table, a :class:`TableState`."""

    path: str
    layout_version: int
    tables: tuple[TableState, ...]


def inspect_state(path: str | os.PathLike[str], table: str | None = None) -> StateSummary:
    """Read what the state file ``path`` holds, opening it read-only.

    Args:
        path: a DuckDB file written by :class:`~arrowflow.DuckDBState`.
        table: only this result table (names compare case-insensitively, as in DuckDB).

    Raises:
        ExecutionError: the file is missing, is not a DuckDB database, is not a state file
            (or one of a newer layout), is locked by a run in progress, or has no table
            ``table``. The message names the path and says what to do.

    Example:
        >>> import pyarrow as pa
        >>> import arrowflow as af
        >>> from arrowflow.state.inspect import inspect_state
        >>> store = af.DuckDBState("doc_inspect.duckdb", table="tags", key="id")
        >>> @af.intelligent_streaming(stream_size=2, over="rows", state=store)
        ... class Tag(af.Agent):
        ...     def call(self, context):
        ...         return None
        >>> _ = af.Flow(Tag).run(rows=pa.table({"id": [1, 2, 3]}))
        >>> [(t.name, t.rows_done, t.runs["status"].to_pylist()) for t in inspect_state(
        ...     "doc_inspect.duckdb").tables]
        [('tags', 3, ['ok'])]
    """
    text = os.fspath(path)
    _check_header(text)
    try:
        con = duckdb.connect(text, read_only=True, config=_READ_ONLY_CONFIG)
    except duckdb.Error as exc:
        raise ExecutionError(_open_failure(text, exc)) from exc
    try:
        with con:
            return _summary(con, text, table)
    except duckdb.Error as exc:
        raise ExecutionError(
            f"State file '{text}' could not be read: {_first_line(exc)}. If it was changed "
            "outside arrowflow, it may no longer be a state file."
        ) from exc


def _check_header(path: str) -> None:
    """Refuse a path DuckDB should not open: missing, a directory, or not a DuckDB file."""
    try:
        with open(path, "rb") as file:
            head = file.read(512)
    except FileNotFoundError:
        raise ExecutionError(f"State file '{path}' does not exist.") from None
    except IsADirectoryError:
        raise ExecutionError(
            f"State file '{path}' is a directory; give the path of a DuckDB file."
        ) from None
    except OSError as exc:
        raise ExecutionError(f"State file '{path}' cannot be read: {exc}.") from exc
    if head[_MAGIC_AT : _MAGIC_AT + len(_MAGIC)] != _MAGIC:
        raise ExecutionError(
            f"State file '{path}' is not a DuckDB database: it is {_looks_like(head)}."
        )


def _open_failure(path: str, exc: duckdb.Error) -> str:
    text = str(exc).lower()
    if "lock" in text:
        return (
            f"State file '{path}' is in use by another process (a run in progress keeps it "
            f"locked): {_first_line(exc)}. Read it once that run has ended."
        )
    return f"State file '{path}' cannot be opened: {_first_line(exc)}."


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _summary(con: duckdb.DuckDBPyConnection, path: str, only: str | None) -> StateSummary:
    catalog = str(con.sql("SELECT current_database()").fetchall()[0][0])
    ours = {
        str(name)
        for (name,) in con.sql(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = ? AND schema_name = ?",
            params=[catalog, SCHEMA],
        ).fetchall()
    }
    if "meta" not in ours or "runs" not in ours:
        raise ExecutionError(
            f"State file '{path}' is a DuckDB database but not an arrowflow state file (it has "
            f"no {SCHEMA}.meta table); give the path of the file a DuckDBState wrote."
        )

    def qualified(name: str) -> str:
        return f"{quote(catalog)}.{SCHEMA}.{quote(name)}"

    found = con.sql(
        f"SELECT value FROM {qualified('meta')} WHERE name = 'layout_version'"
    ).fetchall()
    version = str(found[0][0]) if found else ""
    if not version.isdigit() or int(version) > LAYOUT_VERSION:
        raise ExecutionError(
            f"State file '{path}' has layout version {version or 'none'}, which this arrowflow "
            f"does not read (it reads {LAYOUT_VERSION}); upgrade arrowflow to read it."
        )
    done_tables = sorted(name for name in ours if name.startswith(_DONE_PREFIX))
    names = _table_names(con, qualified, done_tables)
    if only is not None:
        chosen = [name for name in names if name.lower() == only.lower()]
        if not chosen:
            held = ", ".join(names) or "none"
            raise ExecutionError(f"State file '{path}' has no table '{only}' (tables: {held}).")
        names = chosen
    tables = tuple(
        _table_state(con, catalog, qualified, name, _done_of(name, done_tables, names))
        for name in names
    )
    return StateSummary(path, int(version), tables)


def _table_names(
    con: duckdb.DuckDBPyConnection, qualified: _Qualify, done_tables: Sequence[str]
) -> list[str]:
    """Every result table the file knows of, by its results, runs, failures or done keys."""
    rows = con.sql(
        f"SELECT table_name FROM {qualified('result_tables')} UNION ALL "
        f"SELECT table_name FROM {qualified('runs')} UNION ALL "
        f"SELECT table_name FROM {qualified('failures')}"
    ).fetchall()
    # Done tables are "done:<table>:<key>": the key is what follows the last colon.
    named = [str(row[0]) for row in rows] + [
        name[len(_DONE_PREFIX) :].rpartition(":")[0] for name in done_tables
    ]
    names: dict[str, str] = {}
    for name in named:
        names.setdefault(name.lower(), name)  # DuckDB's identifiers ignore case
    return sorted(names.values(), key=str.lower)


def _done_of(name: str, done_tables: Sequence[str], names: Sequence[str]) -> list[tuple[str, str]]:
    """The done tables of result table ``name``, with their key columns.

    ``done:<table>:<key>`` belongs to the longest table name it begins with (``done:a:b:id``
    to ``a:b`` when that table is known), else to what comes before its last colon.
    """
    found = []
    for done in done_tables:
        rest = done[len(_DONE_PREFIX) :]
        owners = [known for known in names if rest.lower().startswith(known.lower() + ":")]
        owner = max(owners, key=len) if owners else rest.rpartition(":")[0]
        if owner.lower() == name.lower():
            found.append((done, rest[len(owner) + 1 :]))
    return found


def _table_state(
    con: duckdb.DuckDBPyConnection,
    catalog: str,
    qualified: _Qualify,
    name: str,
    done_tables: Sequence[tuple[str, str]],
) -> TableState:
    stored = con.sql(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = ? "
        "AND schema_name = 'main' AND lower(table_name) = lower(?)",
        params=[catalog, name],
    ).fetchall()
    result_rows = 0
    if stored:
        table = f"{quote(catalog)}.main.{quote(str(stored[0][0]))}"
        result_rows = int(con.sql(f"SELECT count(*) FROM {table}").fetchall()[0][0])
    runs = con.sql(
        "SELECT run_id, fingerprint, key, CASE status WHEN 'running' THEN 'killed' ELSE status "
        "END AS status, started_at, ended_at, total_batches, successful_batches, "
        "failed_batches, total_items, processed_items, skipped_items, loaded_items "
        f"FROM {qualified('runs')} WHERE lower(table_name) = lower(?) ORDER BY run_id",
        params=[name],
    ).to_arrow_table()
    failures = con.sql(
        "SELECT run_id, stream_num, rows, keys, error, failed_at "
        f"FROM {qualified('failures')} WHERE lower(table_name) = lower(?) "
        "ORDER BY failed_at, stream_num",
        params=[name],
    ).to_arrow_table()
    keys = con.sql(
        f"SELECT key_column FROM {qualified('result_tables')} WHERE lower(table_name) = lower(?)",
        params=[name],
    ).fetchall()
    key = None if not keys or keys[0][0] is None else str(keys[0][0])
    if key is None and runs.num_rows:
        key = str(runs["key"][-1].as_py())
    return TableState(name, key, result_rows, _done(con, qualified, done_tables), runs, failures)


def _done(
    con: duckdb.DuckDBPyConnection, qualified: _Qualify, done_tables: Sequence[tuple[str, str]]
) -> pa.Table:
    """Rows done per key column and fingerprint, from the table's done tables."""
    parts = [
        con.sql(
            f"SELECT ? AS key_column, d.fp, f.fingerprint, f.description, "
            f"count(*) AS rows_done FROM {qualified(done)} d "
            f"LEFT JOIN {qualified('fingerprints')} f ON f.id = d.fp AND d.fp <> ? "
            "GROUP BY ALL ORDER BY d.fp",
            params=[key, NOT_DONE],
        ).to_arrow_table()
        for done, key in done_tables
    ]
    if not parts:
        return pa.table(
            {
                "key_column": pa.array([], pa.string()),
                "fp": pa.array([], pa.int32()),
                "fingerprint": pa.array([], pa.string()),
                "description": pa.array([], pa.string()),
                "rows_done": pa.array([], pa.int64()),
            }
        )
    return pa.concat_tables(parts)
