"""``DuckDBSink``: a run's streams written into a DuckDB table as they complete.

Each stream is one transaction into a partial table beside the destination; the run's rows
reach the destination in one more transaction when the run succeeds. A run that stops — even
killed outright — leaves whole streams in the partial table and the destination as it was, and
the next run starts the partial table afresh, so a rerun never writes a row twice.
"""

from __future__ import annotations

import enum
import os
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import duckdb
import pyarrow as pa

from arrowflow._retry import is_interrupt
from arrowflow._row_counts import reader_with_num_rows
from arrowflow.exceptions import ConfigurationError, ExecutionError
from arrowflow.state._layout import SCHEMA, duck_types, quote, registered, transaction

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["DuckDBSink"]

MODES = ("append", "replace")
#: The partial table of ``table`` is ``table + PARTIAL``, as a Parquet sink's file is
#: ``<path>.partial``.
PARTIAL = ".partial"

_MEMORY = ":memory:"
_STREAM_VIEW = "arrowflow_sink_stream"
_BATCH_ROWS = 65_536
_SAMPLE_ROWS = 64
# DuckDB's main header is an 8-byte checksum followed by these magic bytes.
_MAGIC = b"DUCK"
_MAGIC_AT = 8

_writing: set[tuple[str, str]] = set()
_writing_lock = threading.Lock()


class _SinkState(enum.Enum):
    OPEN = "open"  # taking streams into the partial table
    FINISHED = "finished"  # read back before the run's outcome was known: takes no more streams
    CLOSED = "closed"  # the run succeeded: its rows are in the table
    ABORTED = "aborted"  # the run did not succeed: the partial table keeps its streams


class DuckDBSink:
    """Write each stream into a DuckDB table as it completes; the table gets the run's rows
    in one transaction when the run succeeds.

    Give it as ``run(..., sink=DuckDBSink("out.duckdb", "prospects"))``, or as the string
    ``sink="out.duckdb::prospects"`` (the path, then ``::``, then the table, taken literally:
    everything after the first ``::``). ``table`` is one name in the database's ``main``
    schema, quoted as given (``"my table"``, ``"Sales.2024"``); no column is added to it.

    - Each stream is inserted, in stream order, into the partial table ``"<table>.partial"``
      (:attr:`partial_table`) of the same database, in one transaction of its own, before the
      run goes on: it is there whole, or not at all, whenever the run stops.
    - When the run succeeds (:meth:`close`), one transaction moves the rows into ``table``:
      ``mode="append"`` (the default) adds them after the rows it holds (the table is created
      when absent); ``mode="replace"`` drops the table and gives the partial table its name.
    - A run that does not succeed (failed, interrupted, stopped early, or killed, even with
      ``kill -9``) leaves ``table`` as it was and its completed streams, each whole, in the
      partial table. The next run of this table replaces the partial table at its first
      stream, so rerunning never writes a row twice: with an :class:`~arrowflow.DuckDBState`,
      the rerun's streams carry the rows it loads and those it computes, and ``table``
      receives each of them once, when the rerun succeeds. A rerun of a run that succeeded
      appends its rows again: that is what ``mode="append"`` means; use ``"replace"`` to
      recompute a table.

    Appending checks the columns at the first stream: the same names (DuckDB ignores case)
    with types DuckDB casts to the table's implicitly (``INTEGER`` into ``BIGINT``, not
    ``VARCHAR`` into ``BIGINT``), else an ``ExecutionError`` names the table and the columns.
    The partial table takes the first stream's columns; a later stream with the same columns,
    in any order, is cast to them, anything else is an ``ExecutionError``; streams without
    rows are not written. Values are stored as DuckDB stores them (a duration becomes an
    ``INTERVAL``); a type DuckDB cannot store fails the first stream.

    Order: the rows land in stream order, each stream's rows in the agents' order. DuckDB
    keeps the insertion order of a table for a scan of it alone (``select * from prospects``,
    with ``WHERE``, ``LIMIT`` or ``OFFSET``) while ``preserve_insertion_order`` is on, its
    default; other queries need an ``ORDER BY`` on a column of yours.

    The database is opened at the first stream and held until the run ends. DuckDB lets one
    process at a time open a file (a writer keeps out even read-only readers), so other
    processes can read the table after the run; in this process, ``duckdb.connect(path)``
    (default settings) shares the open database, and a ``DuckDBState`` may use the same file.
    The state's result table cannot be the sink's table.

    :meth:`read_back` reads this run's rows lazily, when first pulled: from the partial table
    before :meth:`close` or after :meth:`abort`, and from ``table`` after :meth:`close` (by
    position: the rows after those the table held before, which rows appended later do not
    move; if rows before them were deleted, or the table replaced, in the meantime, it is an
    ``ExecutionError``). The columns have the Arrow types the agents produced wherever DuckDB's
    values cast back to them unchanged (a ``large_string`` column is ``VARCHAR`` in DuckDB and
    ``large_string`` again when read back), else DuckDB's.

    Args:
        path: the DuckDB database file (created, with its directory, when absent).
        table: the destination table's name, in ``main``.
        mode: ``"append"`` or ``"replace"``.

    Example:
        >>> import arrowflow as af, duckdb, pyarrow as pa, pyarrow.compute as pc
        >>> @af.intelligent_streaming(stream_size=2, over="rows")
        ... class KeepBig(af.Agent):
        ...     def call(self, context):
        ...         return {"rows": context["rows"].filter(pc.field("n") >= 2)}
        >>> result = af.Flow(KeepBig).run(rows=pa.table({"n": range(6)}), sink="doc.duckdb::big")
        >>> result["rows"].read_all()["n"].to_pylist()
        [2, 3, 4, 5]
        >>> with duckdb.connect("doc.duckdb") as con:
        ...     con.sql("select n from big").fetchall()
        [(2,), (3,), (4,), (5,)]
    """

    def __init__(self, path: str | os.PathLike[str], table: str, *, mode: str = "append") -> None:
        if not isinstance(path, str | os.PathLike) or not os.fspath(path):
            raise ConfigurationError(
                f"DuckDBSink: path must be the path of a DuckDB file ('out.duckdb'), got {path!r}."
            )
        text = os.fspath(path)
        if not isinstance(text, str):
            raise ConfigurationError(f"DuckDBSink: path must be a text path, got {path!r}.")
        if text == _MEMORY:
            raise ConfigurationError(
                "DuckDBSink: path ':memory:' would vanish with the run; give the path of a file "
                "('out.duckdb')."
            )
        if not isinstance(table, str) or not table.strip() or "\0" in table:
            raise ConfigurationError(
                f"DuckDB sink '{text}': table must be a table's name, got {table!r}: "
                f"DuckDBSink('{text}', 'prospects'), or sink='{text}::prospects'."
            )
        if table.lower().endswith(PARTIAL):
            raise ConfigurationError(
                f"DuckDB sink '{text}': table {table!r} ends with '{PARTIAL}', which names the "
                "partial table of another sink; give another table name."
            )
        if mode not in MODES:
            raise ConfigurationError(
                f"DuckDB sink '{text}', table '{table}': mode must be 'append' or 'replace', "
                f"got {mode!r}."
            )
        self.path = Path(text)
        self.table = table
        self.mode = mode
        self.partial_table = table + PARTIAL
        self.num_rows = 0
        self._file = os.path.abspath(text)
        self._where = f"DuckDB sink '{text}', table '{table}'"
        self._target = f"main.{quote(table)}"
        self._partial = f"main.{quote(self.partial_table)}"
        self._state = _SinkState.OPEN
        self._schema: pa.Schema | None = None  # the first stream's: the partial table's columns
        self._read_schema: pa.Schema | None = None  # what read_back yields
        self._offset = 0  # the table's rows before this run's, once published
        self._marks: tuple[object, ...] = ()  # hashes of this run's first and last rows there
        self._con: duckdb.DuckDBPyConnection | None = None
        self._resources = ExitStack()

    def __repr__(self) -> str:
        return f"DuckDBSink({str(self.path)!r}, {self.table!r}, mode={self.mode!r})"

    # -- the protocol (arrowflow.io.Sink) ----------------------------------------------------

    def write(self, table: pa.Table) -> None:
        """Insert one stream's rows into the partial table, in one transaction."""
        if self._state is not _SinkState.OPEN:
            raise ExecutionError(
                f"{self._where}: the sink is {self._state.value}: it takes no more streams. "
                "Use a new sink for each run."
            )
        if self._schema is None:
            self._start(table, check=True)
        else:
            if not table.schema.equals(self._schema):
                if not table.num_rows:
                    return
                table = self._conform(table, self._schema)
            con = self._connection()
            with registered(con, **{_STREAM_VIEW: table}):
                self._execute(con, f"INSERT INTO {self._partial} SELECT * FROM {_STREAM_VIEW}")
        self.num_rows += table.num_rows

    def close(self) -> None:
        """The run succeeded: move its rows into the table, in one transaction.

        With nothing written, a stale partial table is dropped; :meth:`read_back`, which
        knows the columns, then makes the table. A failure to publish aborts the sink (the
        table stays as it was, the partial table keeps the rows) and raises.
        """
        if self._state in (_SinkState.CLOSED, _SinkState.ABORTED):
            return
        try:
            con = self._connection()
            if self._schema is None:
                self._execute(con, f"DROP TABLE IF EXISTS {self._partial}")
            else:
                self._publish(con)
        except BaseException:
            self._state = _SinkState.ABORTED
            self._release()
            raise
        self._state = _SinkState.CLOSED
        self._release()

    def abort(self) -> None:
        """The run did not succeed: keep the streams written in the partial table and let the
        database go. Idempotent, and a no-op after :meth:`close`."""
        if self._state in (_SinkState.CLOSED, _SinkState.ABORTED):
            return
        self._state = _SinkState.ABORTED
        self._release()

    def read_back(self, schema: pa.Schema) -> pa.RecordBatchReader:
        """This run's rows, read lazily as a ``RecordBatchReader`` over a DuckDB query;
        ``schema`` serves when nothing was written.

        Called before :meth:`close` or :meth:`abort`, it ends the writing without deciding
        where the rows end up: the reader reads them from wherever they are when first pulled.
        """
        if self._schema is None:
            if self._state is _SinkState.CLOSED:
                # A run without rows still leaves the table, with ``schema``'s columns.
                try:
                    self._start(schema.empty_table(), check=False)
                    self._publish(self._connection())
                finally:
                    self._release()
            elif self._state is not _SinkState.ABORTED:
                self._start(schema.empty_table(), check=False)
                self._state = _SinkState.FINISHED
            return reader_with_num_rows(schema, [], 0)
        if self._state is _SinkState.OPEN:
            self._state = _SinkState.FINISHED
        read_schema = self._read_schema or self._schema
        return reader_with_num_rows(read_schema, self._read(read_schema), self.num_rows)

    # -- writing -----------------------------------------------------------------------------

    def _start(self, table: pa.Table, *, check: bool) -> None:
        """Check the destination and replace the partial table by one holding ``table``."""
        names = [name.lower() for name in table.schema.names]
        twins = sorted({name for name in table.schema.names if names.count(name.lower()) > 1})
        if twins:
            raise ExecutionError(
                f"{self._where}: columns {', '.join(map(repr, twins))} are one column to "
                "DuckDB, which ignores case in names. Rename them in the scope's last agent."
            )
        con = self._connection()
        try:
            with registered(con, **{_STREAM_VIEW: table}):
                self._check_destination(con)
                if check and self.mode == "append" and self._table_exists(con):
                    self._check_columns(con, quote(_STREAM_VIEW))
                # One statement, so one transaction; it drops a killed run's partial table.
                con.execute(
                    f"CREATE OR REPLACE TABLE {self._partial} AS SELECT * FROM {_STREAM_VIEW}"
                )
        except duckdb.Error as exc:
            self._raise(exc, "writing the first stream")
        self._schema = table.schema
        self._read_schema = self._restored_schema(con, table)

    def _conform(self, table: pa.Table, schema: pa.Schema) -> pa.Table:
        problem = "other columns"
        if sorted(table.schema.names) == sorted(schema.names):
            try:
                return table.select(schema.names).cast(schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError, NotImplementedError) as exc:
                problem = str(exc)
        raise ExecutionError(
            f"{self._where}: a stream's columns do not match the first stream's ({problem}).\n"
            f"first stream: {schema}\nthis stream: {table.schema}\nReturn the same columns "
            "from every stream."
        )

    def _publish(self, con: duckdb.DuckDBPyConnection) -> None:
        try:
            with transaction(con):
                self._check_destination(con)
                exists = self._table_exists(con)
                before = 0
                if self.mode == "append" and exists:
                    before = self._count(con, self._target)
                    if self.num_rows:  # a run without rows leaves the table as it is
                        self._check_columns(con, self._partial)
                        con.execute(
                            f"INSERT INTO {self._target} BY NAME SELECT * FROM {self._partial}"
                        )
                    con.execute(f"DROP TABLE {self._partial}")
                else:
                    con.execute(f"DROP TABLE IF EXISTS {self._target}")
                    con.execute(f"ALTER TABLE {self._partial} RENAME TO {quote(self.table)}")
                marks = self._marks_at(con, before)
        except duckdb.Error as exc:
            self._raise(exc, "moving the rows into the table")
        self._offset, self._marks = before, marks

    def _marks_at(self, con: duckdb.DuckDBPyConnection, offset: int) -> tuple[object, ...]:
        """Hashes of the table's rows at ``offset`` and ``offset + num_rows - 1``: where this
        run's rows are, as long as they hold these."""
        if not self.num_rows:
            return ()
        return tuple(
            con.sql(
                f"SELECT hash(r) FROM (SELECT * FROM {self._target} LIMIT 1 OFFSET {at}) AS r"
            ).fetchall()
            for at in (offset, offset + self.num_rows - 1)
        )

    def _check_destination(self, con: duckdb.DuckDBPyConnection) -> None:
        """Refuse a view of that name, and the result table of a ``DuckDBState``."""
        views = con.sql(
            "SELECT view_name FROM duckdb_views() WHERE database_name = current_database() "
            "AND schema_name = 'main' AND NOT internal AND lower(view_name) = lower(?)",
            params=[self.table],
        ).fetchall()
        if views:
            raise ExecutionError(
                f"{self._where}: '{views[0][0]}' is a view in this database, and the sink "
                "writes tables. Give the sink another table name."
            )
        has_state = con.sql(
            "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
            "AND schema_name = ? AND table_name = 'result_tables'",
            params=[SCHEMA],
        ).fetchall()[0][0]
        if not has_state:
            return
        owned = con.sql(
            f"SELECT count(*) FROM {SCHEMA}.result_tables WHERE lower(table_name) = lower(?)",
            params=[self.table],
        ).fetchall()[0][0]
        if owned:
            raise ExecutionError(
                f"{self._where}: '{self.table}' is the result table of a DuckDBState in this "
                "database, which keeps it by key. Give the sink another table name."
            )

    def _table_exists(self, con: duckdb.DuckDBPyConnection) -> bool:
        return bool(self._columns(con))

    def _columns(self, con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
        rows = con.sql(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = "
            "current_database() AND schema_name = 'main' AND lower(table_name) = lower(?) "
            "ORDER BY column_index",
            params=[self.table],
        ).fetchall()
        return [(str(name), str(kind)) for name, kind in rows]

    def _check_columns(self, con: duckdb.DuckDBPyConnection, relation: str) -> None:
        """The rows of ``relation`` can be appended to the table: same names, types DuckDB
        casts to the table's implicitly; otherwise an error naming the columns."""
        table_columns = self._columns(con)
        theirs = {name.lower(): (name, kind) for name, kind in table_columns}
        ours = duck_types(con, relation)
        mine = {name.lower(): name for name in ours}
        problems = [
            f"missing {name} {kind}" for name, kind in table_columns if name.lower() not in mine
        ]
        problems += [
            f"not in the table: {name} {kind}"
            for name, kind in ours.items()
            if name.lower() not in theirs
        ]
        for name, kind in ours.items():
            if name.lower() not in theirs:
                continue
            their_name, their_kind = theirs[name.lower()]
            if kind == their_kind:
                continue
            castable = con.sql(
                f"SELECT can_cast_implicitly((SELECT {quote(name)} FROM {relation} LIMIT 0), "
                f"(SELECT {quote(their_name)} FROM {self._target} LIMIT 0))"
            ).fetchall()[0][0]
            if not castable:
                problems.append(f"{name} is {kind} here but {their_kind} in the table")
        if problems:
            shown = ", ".join(f"{name} {kind}" for name, kind in table_columns)
            found = ", ".join(f"{name} {kind}" for name, kind in ours.items())
            raise ExecutionError(
                f"{self._where} (mode='append'): this run's columns do not match the table's: "
                f"{'; '.join(problems)}.\ntable: {shown}\nthis run: {found}\nReturn the "
                "table's columns (or types DuckDB casts to them implicitly) from the scope's "
                "last agent, or use mode='replace' or another table."
            )

    def _restored_schema(self, con: duckdb.DuckDBPyConnection, table: pa.Table) -> pa.Schema:
        """The schema to read back: each column typed as written where the first rows, read
        back from DuckDB and cast to that type, come back equal; else as DuckDB gives it."""
        written = table.schema
        sample = table.slice(0, _SAMPLE_ROWS)
        back = self._query(con, f"SELECT * FROM {self._partial} LIMIT {_SAMPLE_ROWS}")
        stored = back.read_all()
        fields = []
        for index, field in enumerate(written):
            column = stored.column(index)
            fields.append(
                field if _casts_back(column, sample.column(index)) else field.with_type(column.type)
            )
        return pa.schema(fields, metadata=written.metadata)

    # -- reading -----------------------------------------------------------------------------

    def _read(self, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
        """This run's rows from where they are now: the table once published, else the
        partial table."""
        published = self._state is _SinkState.CLOSED
        relation = self._target if published else self._partial
        offset = self._offset if published else 0
        con = self._connect()
        try:
            found = self._count(con, relation)
            if published:
                # Rows appended since (by a later run, say) leave this run's where they were.
                moved = found < offset + self.num_rows or self._marks_at(con, offset) != self._marks
            else:
                moved = found != self.num_rows
            if moved:
                where = f"table '{self.table}'" if published else f"'{self.partial_table}'"
                raise ExecutionError(
                    f"{self._where}: this run's rows are no longer where it wrote them in "
                    f"{where} (rows before them were deleted, or the table replaced, since). "
                    "Read the result before changing the table, or query the table itself."
                )
            columns = ", ".join(f"{quote(name)} AS {quote(name)}" for name in schema.names)
            query = f"SELECT {columns} FROM {relation} LIMIT {self.num_rows} OFFSET {offset}"
            for batch in self._query(con, query):
                if batch.schema.equals(schema, check_metadata=True):
                    yield batch
                    continue
                try:
                    yield batch.cast(schema)
                except (pa.ArrowInvalid, pa.ArrowTypeError, NotImplementedError) as exc:
                    raise ExecutionError(
                        f"{self._where}: the rows read back do not cast to this run's types "
                        f"({exc}).\nread: {batch.schema}\nexpected: {schema}"
                    ) from exc
        except duckdb.Error as exc:
            self._raise(exc, "reading the rows back")
        finally:
            con.close()

    def _query(self, con: duckdb.DuckDBPyConnection, query: str) -> pa.RecordBatchReader:
        try:
            return con.sql(query).to_arrow_reader(_BATCH_ROWS)
        except duckdb.Error as exc:
            self._raise(exc, "reading the rows back")

    def _count(self, con: duckdb.DuckDBPyConnection, relation: str) -> int:
        try:
            return int(con.sql(f"SELECT count(*) FROM {relation}").fetchall()[0][0])
        except duckdb.Error as exc:
            self._raise(exc, "counting the rows")

    # -- the database ------------------------------------------------------------------------

    def _connection(self) -> duckdb.DuckDBPyConnection:
        """The writing connection: opened once, with this process's claim on the table."""
        if self._con is None:
            key = (self._file, self.table.lower())
            with _writing_lock:
                if key in _writing:
                    raise ExecutionError(
                        f"{self._where}: another sink of this process is writing this table. "
                        "Let its run finish first, or give this sink another table."
                    )
                _writing.add(key)
            self._resources.callback(_unclaim, key)
            try:
                con = self._connect()
            except BaseException:
                self._resources.close()
                raise
            self._resources.callback(con.close)
            self._con = con
        return self._con

    def _release(self) -> None:
        self._con = None
        self._resources.close()

    def _connect(self) -> duckdb.DuckDBPyConnection:
        """A connection with DuckDB's default settings, which connections of this process to
        the same file share (a ``DuckDBState`` of the file included)."""
        self._check_file()
        try:
            return duckdb.connect(self._file)
        except duckdb.Error as exc:
            if is_interrupt(exc):
                raise
            raise ExecutionError(self._open_failure(exc)) from exc

    def _check_file(self) -> None:
        """Refuse, before DuckDB opens it, a path that is not a DuckDB database."""
        path = self._file
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "rb") as file:
                head = file.read(_MAGIC_AT + len(_MAGIC))
        except FileNotFoundError:
            return
        except IsADirectoryError as exc:
            raise ExecutionError(
                f"{self._where}: the path is a directory. Give the sink the path of a file "
                f"('{os.path.join(str(self.path), 'out.duckdb')}', say)."
            ) from exc
        except OSError as exc:
            raise ExecutionError(
                f"{self._where}: the file cannot be read or created ({exc}). Give this user "
                "access, or give the sink another path."
            ) from exc
        if head[_MAGIC_AT:] != _MAGIC:
            raise ExecutionError(
                f"{self._where}: the file is not a DuckDB database (it is left as it is). Give "
                "the sink another path, or move the file away."
            )

    def _open_failure(self, exc: duckdb.Error) -> str:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        lowered = text.lower()
        if "different configuration" in lowered:
            return (
                f"{self._where}: the database is open in this process with other settings (a "
                "duckdb.connect(path, read_only=True) of yours, say), and DuckDB opens a file "
                "one way per process. Close that connection before the run, or give the sink "
                "another path."
            )
        if "lock" in lowered:
            return (
                f"{self._where}: another process holds the database ({text}). DuckDB lets one "
                "process at a time open a file: let that process finish or close it, or give "
                "the sink another path."
            )
        return f"{self._where}: the database cannot be opened: {text}. Give the sink another path."

    def _execute(self, con: duckdb.DuckDBPyConnection, statement: str) -> None:
        try:
            con.execute(statement)
        except duckdb.Error as exc:
            self._raise(exc, "writing a stream")

    def _raise(self, exc: duckdb.Error, doing: str) -> NoReturn:
        """Raise an ``ExecutionError`` for a DuckDB error; an interrupt is raised as it is."""
        if is_interrupt(exc):
            raise exc
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExecutionError(
            f"{self._where}: {doing} failed: {text}. The table is as it was before this run; "
            f"the streams written so far are in '{self.partial_table}'."
        ) from exc


def _unclaim(key: tuple[str, str]) -> None:
    with _writing_lock:
        _writing.discard(key)


def _casts_back(stored: pa.ChunkedArray, written: pa.ChunkedArray) -> bool:
    """Whether values DuckDB gives back cast to the written type and equal what was written."""
    if stored.type == written.type:
        return True
    try:
        back = stored.cast(written.type)
        if pa.types.is_dictionary(written.type):  # equal values, whatever the dictionary
            plain = written.type.value_type
            back, written = back.cast(plain), written.cast(plain)
        return bool(back.equals(written))
    except (pa.ArrowInvalid, pa.ArrowTypeError, NotImplementedError):
        return False
