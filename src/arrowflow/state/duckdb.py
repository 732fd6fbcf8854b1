"""``DuckDBState``: vectorised, resumable state for a streaming scope, kept in DuckDB.

The store skips the rows whose key is already done (an anti-join), loads their stored results
(a semi-join) and persists each stream's new results together with its done keys (an upsert),
so a rerun — even after ``kill -9`` — resumes where the last one stopped and returns what an
uninterrupted run would have. The pieces:

- :mod:`~arrowflow.state._layout`: the database's tables, opening it, errors that say what
  happened;
- :mod:`~arrowflow.state._keys`: what a key may be, and the null and duplicate checks;
- :mod:`~arrowflow.state._results`: a result table and its done keys: upsert, load, schemas;
- :mod:`~arrowflow.state._resume`: one join per run when the input's keys are known up front;
- :mod:`~arrowflow.state._writer`: group commit of completed streams, in the background;
- :mod:`~arrowflow.state._runs`: fingerprints, the scope owning a table, the runs' records.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from arrowflow._row_counts import known_column, known_num_rows, reads_column
from arrowflow._tabular import decoded, value_type
from arrowflow.display import properties_html
from arrowflow.exceptions import ConfigurationError, ExecutionError
from arrowflow.state._callables import StoreCallables, array_field, ended
from arrowflow.state._keys import KeyOrder, check_keys, key_column
from arrowflow.state._layout import (
    SCHEMA,
    duck_types,
    open_database,
    raise_translated,
    registered,
    transaction,
)
from arrowflow.state._results import ResultTable
from arrowflow.state._resume import Resume
from arrowflow.state._runs import (
    SEEN,
    Run,
    check_owner,
    check_seen,
    fingerprint,
    fingerprint_id,
    record_run,
)
from arrowflow.state._writer import PendingWrite, Writer
from arrowflow.state.base import StreamInfo, input_keys

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    import numpy as np

    from arrowflow.state.base import ScopeInfo

__all__ = ["DuckDBState", "fingerprint"]

logger = logging.getLogger("arrowflow")

MEMORY = ":memory:"


class _FilesInUse:
    """The database files a run of this process holds, one run per file.

    DuckDB shares one database between the connections a process opens on a file, so its file
    lock keeps other processes out but not a second store object of this process.
    """

    def __init__(self) -> None:
        self._holders: dict[str, str] = {}
        self._lock = threading.Lock()

    def claim(self, path: str, table: str) -> None:
        if path == MEMORY:  # each in-memory store is a database of its own
            return
        with self._lock:
            holder = self._holders.get(path)
            if holder is not None:
                raise ExecutionError(
                    f"State database '{path}' is in use by a run of table '{holder}' in this "
                    "process; one run at a time per file. Let that run finish, or give this "
                    "store another path=."
                )
            self._holders[path] = table

    def release(self, path: str) -> None:
        with self._lock:
            self._holders.pop(path, None)


_files_in_use = _FilesInUse()
_Method = TypeVar("_Method", bound="Callable[..., Any]")


def _translating(method: _Method) -> _Method:
    """``method`` with any DuckDB error turned into an ``ExecutionError`` naming the store and
    saying what happened (interrupts excepted): no raw ``duckdb`` exception leaves the store."""

    @functools.wraps(method)
    def wrapper(self: DuckDBState, *args: Any, **kwargs: Any) -> Any:
        # Not store_errors: a context manager costs more than the skip of a small stream.
        try:
            return method(self, *args, **kwargs)
        except duckdb.Error as exc:
            raise_translated(exc, self._where(None))

    return wrapper  # type: ignore[return-value]


_KEY_TYPE_VIEW = "arrowflow_key_type_view"


class DuckDBState(StoreCallables):
    """Skip, load and persist a streaming scope's rows by key, in a DuckDB database.

    Give it as ``state=`` to ``intelligent_streaming``: rows whose key is done under the
    scope's fingerprint are skipped and their stored results loaded; each stream's new results
    and done keys are stored as the stream completes, by a writer that commits at most every
    ``commit_interval`` seconds and always when the run ends (a ``kill -9`` loses at most the
    streams of the last interval, which a rerun recomputes). The fingerprint covers
    the qualified names of the scope's agents, the streamed field, the key and ``version``:
    change any of them (bump ``version`` when an agent's logic changes) and every row is
    processed again, its stored results replaced.

    The results are a plain table named ``table`` (``select * from quick_fit``), whose
    columns follow the agents' output (new columns are added as they appear); arrowflow's
    bookkeeping (done keys, runs, streams, failures) lives in the ``arrowflow`` schema.

    A file database is opened when a run starts and closed when it ends, so other processes
    (``duckdb.connect(path, read_only=True)``) can read it between runs. ``":memory:"`` stays
    open until :meth:`close` (closing it discards it). State callables called outside a run
    open the database and keep it open until :meth:`close`; use the store as a context manager.
    One run at a time per store and per file: a second run fails at its start, whether it uses
    the same store, another store on the same file (in this process) or comes from another
    process (DuckDB's file lock). A table of the same name that arrowflow did not create is
    refused and left untouched.

    The key column must hold values Arrow and DuckDB compare alike: integers, strings,
    binary, booleans, dates, times, timestamps or ``decimal128`` (or a dictionary of those).
    Float keys (``0.0`` and ``-0.0``, or two NaNs, are one key to DuckDB and two to Arrow),
    struct, list, map and union keys, and null, duration, interval and extension keys are
    refused before any agent runs: cast ids that pandas read as ``float64`` to ``int64`` (or
    string) before the scope.

    When the input's keys are known up front (a table, or a :func:`~arrowflow.scan_parquet`
    reader, which reads its key column alone), skip and load are answered by one join for the
    whole run, the stored rows read back in input order as the streams need them; another
    reader is answered by a query per stream. A first run over a Parquet scan reads no key up
    front (nothing is stored to join them with): its keys are checked as its streams come, at
    no cost while they are in increasing order; the first stream out of order has the whole
    key column read and checked, and a duplicate or a null fails that stream before its agents
    run. DuckDB works within ``memory_limit``, spilling to ``temp_directory``. Two scopes
    cannot share a table: a run of another scope (other agents, field or key) than the one
    whose runs wrote it is refused at its start.

    Args:
        path: a database file (created if missing) or ``":memory:"``.
        table: the name of the result table.
        key: the key column: unique, never null, in the input and in the results.
        version: part of the fingerprint; change it to recompute everything.
        commit_interval: at most this many seconds between a stream's completion and the
            commit that makes it durable; ``0`` commits as soon as the writer can.
        memory_limit: DuckDB's ``memory_limit`` while the store is open (``"2GB"``, or a
            share of the machine's memory: ``"25%"``, the default); joins and sorts beyond it
            spill to ``temp_directory``. ``None`` keeps DuckDB's own default (80%).
        write_memory_limit: DuckDB's ``memory_limit`` once a run only writes: from its start
            when nothing is stored yet, else once the stored rows of the resume join are all
            read. Writing needs no cache of the blocks written, which DuckDB would otherwise
            keep up to ``memory_limit``: a long run's memory stays flat. Never above
            ``memory_limit``; ``None`` keeps ``memory_limit`` throughout.
        temp_directory: where DuckDB spills; ``None`` keeps DuckDB's default (``<path>.tmp``
            beside a file database).

    Example:
        >>> import pyarrow as pa, pyarrow.compute as pc
        >>> import arrowflow as af
        >>> from arrowflow.state import DuckDBState
        >>> store = DuckDBState(":memory:", table="scores", key="id")
        >>> @af.intelligent_streaming(stream_size=2, over="rows", state=store)
        ... class Score(af.Agent):
        ...     def call(self, context):
        ...         rows = context["rows"]
        ...         return {"rows": rows.append_column("score", pc.multiply(rows["n"], 10))}
        >>> first = af.Flow(Score).run(rows=pa.table({"id": [1, 2, 3], "n": [1, 2, 3]}))
        >>> again = af.Flow(Score).run(rows=pa.table({"id": [1, 2, 3, 4], "n": [1, 2, 3, 4]}))
        >>> again["rows"]["score"].to_pylist(), again.stats[0]["skipped_items"]
        ([10, 20, 30, 40], 3)
        >>> store.close()
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = MEMORY,
        table: str = "quick_fit",
        key: str = "id",
        version: str | int | None = None,
        *,
        commit_interval: float = 1.0,
        memory_limit: str | None = "25%",
        write_memory_limit: str | None = "64MB",
        temp_directory: str | os.PathLike[str] | None = None,
    ) -> None:
        for name, value in (("table", table), ("key", key)):
            if not isinstance(value, str) or not value:
                raise ConfigurationError(
                    f"DuckDBState: {name}= must be a non-empty string, got {value!r}."
                )
        if version is not None and (not isinstance(version, str | int) or version is True):
            raise ConfigurationError(
                f"DuckDBState: version= must be a string, an int or None, got {version!r}."
            )
        if not isinstance(path, str | os.PathLike):
            raise ConfigurationError(f"DuckDBState: path= must be a path, got {path!r}.")
        if (
            not isinstance(commit_interval, int | float)
            or isinstance(commit_interval, bool)
            or not commit_interval >= 0
        ):
            raise ConfigurationError(
                "DuckDBState: commit_interval= must be a number of seconds >= 0, got "
                f"{commit_interval!r}."
            )
        self.commit_interval = float(commit_interval)
        self._settings: dict[str, str] = {}
        options = (
            ("memory_limit", memory_limit),
            ("write_memory_limit", write_memory_limit),
            ("temp_directory", temp_directory),
        )
        for name, setting in options:
            if setting is None:
                continue
            if not isinstance(setting, str | os.PathLike) or "'" in os.fspath(setting):
                raise ConfigurationError(
                    f"DuckDBState: {name}= must be a string without quotes, got {setting!r}."
                )
            self._settings[name] = os.fspath(setting)
        self._write_limit = self._settings.pop("write_memory_limit", None)
        text = os.fspath(path)
        self.path: str = text if text == MEMORY else os.path.abspath(text)
        if text != MEMORY and _catalog_name(self.path).lower() == SCHEMA:
            # DuckDB names a file's catalog after it: "arrowflow.x" would be ambiguous.
            raise ConfigurationError(
                f"DuckDBState: path= {text!r} cannot be used: DuckDB would name its catalog "
                f"'{SCHEMA}', like the schema arrowflow keeps its bookkeeping in. Give the file "
                "another name, e.g. 'state.duckdb'."
            )
        self.table = table
        self.key = key
        self.version = version
        self._lock = threading.RLock()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._tables: dict[str, ResultTable] = {}
        self._run: Run | None = None
        self._loose: dict[str | None, Run] = {}
        self._fingerprint: str | None = None
        # The scope_id of every run that ended: their abandoned streams are refused.
        self._ended: set[str | None] = set()

    def __reduce__(self) -> tuple[Any, ...]:
        # A copy in another process (a Ray worker receiving an agent's declaration) is the
        # configuration only, a store that has opened nothing: the connection and the run stay
        # here, and the engine's workers never call the store.
        settings = self._settings
        return (
            functools.partial(
                type(self),
                commit_interval=self.commit_interval,
                memory_limit=settings.get("memory_limit"),
                write_memory_limit=self._write_limit,
                temp_directory=settings.get("temp_directory"),
            ),
            (self.path, self.table, self.key, self.version),
        )

    def __repr__(self) -> str:
        return (
            f"DuckDBState(path={self.path!r}, table={self.table!r}, key={self.key!r}, "
            f"version={self.version!r}, lifecycle={self.lifecycle!r})"
        )

    def _repr_html_(self) -> str:
        # Configuration only: showing a store never opens its database.
        return properties_html(
            "DuckDBState",
            {
                "path": self.path,
                "table": self.table,
                "key": self.key,
                "version": self.version,
                "lifecycle": self.lifecycle,
                "commit_interval": f"{self.commit_interval:g} s",
            },
        )

    @property
    def fingerprint(self) -> str | None:
        """The fingerprint of the current or last run, if any."""
        return self._fingerprint

    @property
    def is_open(self) -> bool:
        """Whether the store holds its database open."""
        return self._con is not None

    @property
    def pending_streams(self) -> int:
        """The streams of the run in progress that completed and are not committed yet."""
        run = self._run
        writer = run.writer if run is not None else None
        return 0 if writer is None else writer.pending

    @property
    def lifecycle(self) -> str:
        """``"closed"`` (no database open), ``"open"`` (open between runs: ``":memory:"``, or
        state callables used outside a run) or ``"running"`` (a run holds the store).

        ``begin_run`` takes a closed or open store to running and ``end_run`` back to closed
        (open for ``":memory:"``); :meth:`close` takes it to closed from anywhere.
        """
        if self._run is not None:
            return "running"
        return "open" if self._con is not None else "closed"

    def __enter__(self) -> DuckDBState:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database (an in-memory one is then gone)."""
        with self._lock:
            run, self._run = self._run, None
            if run is not None:
                _files_in_use.release(self.path)
                if run.scope_id is not None:
                    self._ended.add(run.scope_id)
                if run.writer is not None:
                    with suppress(ExecutionError):  # logged by no one: the run is abandoned
                        run.writer.close()
                if run.resume is not None:
                    run.resume.close()
            self._forget()
            con, self._con = self._con, None
            if con is not None:
                con.close()

    # -- the run, as the executor drives it (arrowflow.state.base.Store) ------------------

    @_translating
    def begin_run(self, scope: ScopeInfo, source: pa.Table | pa.RecordBatchReader | None) -> None:
        """Open the database, check the input's keys, and learn what is done.

        When the input's keys are known up front (a table, a Parquet scan) they are checked
        (present, not null, unique, of the stored type) and the done rows found in one join
        (:mod:`arrowflow.state._resume`); on a first run over a scan, and for another reader,
        only the key's presence and type are checked here, the rest stream by stream.
        """
        with self._lock:
            if self._run is not None:
                raise ExecutionError(
                    f"{self}: a run of this store is in progress (started "
                    f"{self._run.started_at:%Y-%m-%d %H:%M:%S} UTC); one run at a time per store. "
                    "Let it finish, or close the stream() iterator it belongs to, first."
                )
            key = scope.key or self.key
            where = self._where(scope.field)
            key_column(scope.schema.empty_table(), key, where)
            _files_in_use.claim(self.path, self.table)
            try:
                self._run = self._start(scope, key, source, where)
            except BaseException:
                _files_in_use.release(self.path)
                self._release()
                raise

    def _start(
        self,
        scope: ScopeInfo,
        key: str,
        source: pa.Table | pa.RecordBatchReader | None,
        where: str,
    ) -> Run:
        con = self._connection()
        if self._write_limit is not None:  # the last run may have left its write limit
            limit = self._settings.get("memory_limit")
            con.execute("RESET memory_limit" if limit is None else f"SET memory_limit = '{limit}'")
        table = self._result_table(key)
        key_type = self._key_type(con, table, scope.schema.field(key), where)
        keys = None
        # A first run over a scan: nothing stored to join its keys with, so none is read up
        # front; they are checked as its streams come (KeyOrder), in order at no cost.
        order = None
        if (
            isinstance(source, pa.RecordBatchReader)
            and reads_column(source, key)
            and table.holds_nothing(con)
        ):
            order = KeyOrder(functools.partial(known_column, source, key, whole=True), key)
        else:
            keys = input_keys(source, key)
            if keys is not None:
                check_keys(keys, key, where)
        fp, description = fingerprint(scope.agents, scope.field, key, self.version)
        started = datetime.now(UTC)
        check_owner(con, self.table, scope.agents, scope.field, key, where)
        with transaction(con):
            # This run holds the file: a run still marked running was killed with its process.
            con.execute(f"UPDATE {SCHEMA}.runs SET status = 'killed' WHERE status = 'running'")
            fp_id = fingerprint_id(con, fp, description)
            table.ensure_done_table(con, key_type)
            run_id = int(
                con.sql(f"SELECT coalesce(max(run_id), 0) + 1 FROM {SCHEMA}.runs").fetchall()[0][0]
            )
            con.execute(
                f"INSERT INTO {SCHEMA}.runs (run_id, table_name, fingerprint, key, status, "
                "started_at) VALUES (?, ?, ?, ?, 'running', ?)",
                [run_id, self.table, fp, key, started],
            )
        run = Run(scope.field, key, fp, fp_id, table, run_id, started, scope_id=scope.scope_id)
        run.checked_all = keys is not None
        run.order = order
        if order is not None:
            run.resume = Resume(known_num_rows(source) or 0, None, None)  # nothing stored
        elif keys is not None:
            run.resume = Resume.fetch(con, table, fp_id, keys, self._only_writing)
        if run.resume is None or not run.resume.reading:
            self._only_writing(con)
        if run.resume is None:
            con.execute(f"CREATE OR REPLACE TEMP TABLE {SEEN} (stream BIGINT, key {key_type})")
            run.seen = set()
        advice = None
        if self._write_limit is not None:
            advice = (
                f"While a run only writes, the store gives DuckDB write_memory_limit="
                f"{self._write_limit!r} (or memory_limit when lower); wide rows may need more: "
                "DuckDBState(..., write_memory_limit='256MB'), or None to keep memory_limit."
            )
        run.writer = Writer(con.cursor(), table, fp_id, self.commit_interval, where, advice)
        self._fingerprint = fp
        return run

    @_translating
    def skip(self, stream: StreamInfo, batch: pa.Table) -> pa.Array | np.ndarray[Any, Any]:
        """``True`` for the rows of ``batch`` whose key is done under the scope's fingerprint."""
        run = self._current(stream, batch)
        where = self._where(run.field, stream.num)
        keys = key_column(batch, run.key, where)
        # Within a run, remember what this stream's upsert may skip.
        run.fresh_streams.discard(stream.num)
        resume = run.resume
        if resume is not None and resume.covers(stream, keys):
            if run.order is not None and stream.offset is not None:
                run.order.check(stream.offset, keys, where)
                run.checked.add(stream.num)
            mask, fresh = resume.skip(stream, len(keys))
            if fresh and run.table.is_keyed_alone:
                run.fresh_streams.add(stream.num)
            return mask
        check_keys(keys, run.key, where)
        if run.run_id is not None:
            run.checked.add(stream.num)
        with self._lock:
            con = self._connection(run)
            if run.seen is not None:
                check_seen(con, run, keys, stream.num, where)
            stored = run.table.stored_keys(con, keys)
        mine = pc.equal(stored["fp"], run.fp_id)
        only_mine = stored.num_rows == 0 or pc.all(mine).as_py()
        if run.run_id is not None and only_mine and run.table.is_keyed_alone:
            run.fresh_streams.add(stream.num)
        # Plain values: a dictionary key matches them by value, and its codes might overflow.
        done = stored["key"].filter(mine).cast(value_type(keys.type))
        return pc.is_in(keys, value_set=done).combine_chunks()

    @_translating
    def load(self, stream: StreamInfo, skipped: pa.Table) -> pa.Table:
        """The stored result rows of the ``skipped`` keys (those done; none for the others)."""
        run = self._current(stream, skipped)
        keys = key_column(skipped, run.key, self._where(run.field, stream.num))
        piece = stream.context.get(run.field) if run.field is not None else None
        resume = run.resume
        if (
            resume is not None
            and isinstance(piece, pa.Table)
            and run.key in piece.column_names
            and resume.covers(stream, piece[run.key])
        ):
            mask, rows = resume.stored_rows(stream, piece.num_rows)
            if rows is None:  # nothing stored at all
                if not len(keys):
                    return pa.table({run.key: keys.slice(0, 0)})
            else:
                loaded = run.table.restore_types(rows, skipped)
                # The answer holds the rows of the stream's done keys: right for ``skipped``
                # when they are those keys. The usual case shows it at once: one stored row
                # per skipped key, in their order.
                if run.key in loaded.column_names and loaded[run.key].equals(keys):
                    return loaded
                asked = piece[run.key]
                if len(keys) != piece.num_rows:
                    asked = asked.filter(mask)
                if asked.equals(keys):
                    return loaded
        with self._lock:
            return run.table.load(self._connection(run), run.fp_id, keys, skipped)

    @_translating
    def persist(self, stream: StreamInfo, results: pa.Table, processed: pa.Table) -> None:
        """Store ``results`` and mark the ``processed`` input keys done, atomically.

        The keys marked done are those of ``processed`` (the rows that went through the
        agents), so keys the agents filtered out are remembered too. In a run, the write is
        handed to the run's writer (group commit, see :mod:`arrowflow.state._writer`).
        """
        run = self._current(stream, results)
        if run.resume is not None:
            run.resume.completed(stream)
        # A stream is persisted once: what was noted of it is needed no more after this.
        # (Outside a run, streams have no numbers to tell them apart: nothing was noted.)
        in_run = run.run_id is not None
        fresh = in_run and stream.num in run.fresh_streams
        unique = run.checked_all or (in_run and stream.num in run.checked)
        run.fresh_streams.discard(stream.num)
        run.checked.discard(stream.num)
        if not processed.num_rows and not results.num_rows:
            return
        where = self._where(run.field, stream.num)
        if run.key in processed.column_names:
            keys = processed[run.key]
        else:
            keys = key_column(results, run.key, where)
        run.table.check(results)
        alone = _has_keys_outside(results, run.key, keys)
        if run.writer is not None:
            run.writer.submit(PendingWrite(stream.num, results, keys, fresh, unique, alone))
            return
        with self._lock:
            con = self._connection(run)
            with transaction(con):
                run.table.upsert(con, run.fp_id, results, keys, fresh=False, unique=unique)

    def record_failure(self, stream: StreamInfo, batch: pa.Table, error: BaseException) -> None:
        """Record a stream that failed after its retries; its keys stay not done."""
        with self._lock:
            run = self._run
            if run is not None:
                run.fresh_streams.discard(stream.num)
                run.checked.discard(stream.num)
                if run.resume is not None:
                    run.resume.completed(stream)
            key = run.key if run is not None else self.key
            keys = None
            if key in batch.column_names:
                keys = len(pc.unique(batch[key].drop_null()))
            try:
                self._connection().execute(
                    f"INSERT INTO {SCHEMA}.failures VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        None if run is None else run.run_id,
                        self.table,
                        "" if run is None else run.fingerprint,
                        stream.num,
                        batch.num_rows,
                        keys,
                        f"{type(error).__name__}: {error}",
                        datetime.now(UTC),
                    ],
                )
            except (duckdb.Error, ExecutionError) as exc:
                logger.warning(
                    "%s: could not record the failure of stream %s: %s", self, stream.num, exc
                )

    def end_run(self, stats: Mapping[str, Any], status: str) -> None:
        """Commit what the writer holds, record the run and its streams, then release the
        database (a file is closed).

        Raises:
            ExecutionError: the pending results could not be stored (the run is recorded as
                failed; a rerun recomputes those streams).
        """
        with self._lock:
            run, self._run = self._run, None
            if run is None:
                return
            _files_in_use.release(self.path)
            if run.scope_id is not None:
                self._ended.add(run.scope_id)
            con = self._con
            failure: BaseException | None = None
            try:
                if run.writer is not None:
                    try:
                        run.writer.close()
                    except ExecutionError as exc:
                        failure, status = exc, "failed"
                if run.resume is not None:
                    run.resume.close()
                if run.run_id is not None and con is not None:
                    record_run(con, run, stats, status)
                if run.seen is not None and con is not None:
                    con.execute(f"DROP TABLE IF EXISTS {SEEN}")
            except Exception as exc:
                # Called from the executor's ``finally``: raising would hide the run's own error.
                logger.warning("%s: could not record the run: %s", self, exc)
            finally:
                self._release()
            if failure is not None:
                raise failure

    def _run_field(self) -> str | None:
        return None if self._run is None else self._run.field

    # -- reading what is stored ------------------------------------------------------------

    @_translating
    def to_arrow(self) -> pa.Table:
        """Every stored result row, ordered by key, with the types the agents produced."""
        with self._reading() as (con, table):
            return table.restore_types(table.read_all(con).read_all())

    @_translating
    def to_parquet(self, path: str | os.PathLike[str]) -> int:
        """Write every stored result row to a Parquet file, ordered by key; return the count.

        Read it back with ``pl.read_parquet(path)``, ``pq.read_table(path)`` or
        ``duckdb.sql("select * from 'path'")``.
        """
        import pyarrow.parquet as pq

        rows = 0
        with self._reading() as (con, table):
            reader = table.read_all(con)
            schema = table.restore_types(reader.schema.empty_table()).schema
            with pq.ParquetWriter(os.fspath(path), schema) as writer:
                for batch in reader:
                    writer.write_table(table.restore_types(pa.Table.from_batches([batch])))
                    rows += batch.num_rows
        return rows

    @_translating
    def runs(self) -> pa.Table:
        """One row per run of this store's table: fingerprint, status, times and totals.

        ``status`` is ``running``, ``ok``, ``failed``, ``stopped`` (``stream()`` closed early),
        ``interrupted`` (Ctrl-C) or ``killed``: a run still marked running when a later run
        opened the file, whose process died (``kill -9``, a crash) before it could end.
        """
        return self._bookkeeping("runs", "run_id")

    @_translating
    def failures(self) -> pa.Table:
        """One row per failed stream of this store's table: run, stream, rows, keys, error."""
        return self._bookkeeping("failures", "failed_at")

    # -- internals -------------------------------------------------------------------------

    def _where(self, field: str | None, stream: int | None = None) -> str:
        where = f"State table '{self.table}' ({self.path})"
        if field is not None:
            where += f", field '{field}'"
        if stream:
            where += f", stream {stream}"
        return where

    def _connection(self, run: Run | None = None) -> duckdb.DuckDBPyConnection:
        """The open database (opened if needed); for a call of ``run``, only while it lasts.

        Called under the lock: a stream abandoned by its run must never reopen the file.
        """
        if run is not None and run.run_id is not None and run is not self._run:
            raise ended(self._where(run.field))
        if self._con is None:
            con = open_database(self.path)
            try:
                for name, value in self._settings.items():
                    con.execute(f"SET {name} = '{value}'")
            except duckdb.Error as exc:
                con.close()
                raise ConfigurationError(
                    f"{self}: DuckDB refused the setting {name} = {value!r}: {exc}"
                ) from exc
            self._con = con
        return self._con

    def _only_writing(self, con: duckdb.DuckDBPyConnection) -> None:
        """Give DuckDB ``write_memory_limit`` (see the class docstring), on ``con``'s
        database; ``memory_limit`` is set again when the next run starts."""
        limit = self._write_limit
        if limit is None:
            return
        user = self._settings.get("memory_limit")
        if user is not None and _limit_bytes(con, user) < _limit_bytes(con, limit):
            limit = user
        con.execute(f"SET memory_limit = '{limit}'")

    def _forget(self) -> None:
        self._tables.clear()
        self._loose.clear()

    def _release(self) -> None:
        """Close a file database so other processes can open it; keep ``:memory:`` open."""
        if self.path == MEMORY or self._con is None:
            return
        self._forget()
        con, self._con = self._con, None
        con.close()

    def _result_table(self, key: str) -> ResultTable:
        table = self._tables.get(key)
        if table is None:
            table = ResultTable(self.table, key)
            table.refresh(self._connection())
            self._tables[key] = table
        return table

    def _key_type(
        self, con: duckdb.DuckDBPyConnection, table: ResultTable, field: pa.Field, where: str
    ) -> str:
        """The DuckDB type of the input's key; ``ExecutionError`` if keys are stored as another."""
        with registered(con, **{_KEY_TYPE_VIEW: pa.schema([field]).empty_table()}):
            found = duck_types(con, _KEY_TYPE_VIEW)[field.name]
        stored = table.stored_key_type()
        if stored is not None and stored != found:
            raise ExecutionError(
                f"{where}: key column '{field.name}' is {field.type} ({found}) but table "
                f"'{self.table}' stores its keys as {stored}. Cast the column to the stored type "
                "before the scope, or give the store another table=."
            )
        return found

    def _current(self, stream: StreamInfo, sample: pa.Table) -> Run:
        """The run in progress, or — for callables used outside a run — one for the field.

        A stream of a run that has ended (abandoned after a timeout or an interrupt) is
        refused: it must never reopen the database nor write to it.
        """
        if stream.scope_id is not None and stream.scope_id in self._ended:
            raise ended(self._where(None, stream.num))
        run = self._run
        if run is not None:
            return run
        field = array_field(stream.context)
        with self._lock:
            loose = self._loose.get(field)
            if loose is None:
                con = self._connection()
                table = self._result_table(self.key)
                where = self._where(field, stream.num)
                key_column(sample, self.key, where)
                key_type = self._key_type(con, table, sample.schema.field(self.key), where)
                fp, description = fingerprint((), field, self.key, self.version)
                with transaction(con):
                    fp_id = fingerprint_id(con, fp, description)
                    table.ensure_done_table(con, key_type)
                loose = Run(field, self.key, fp, fp_id, table)
                self._loose[field] = loose
                self._fingerprint = fp
            return loose

    @contextmanager
    def _reading(self) -> Iterator[tuple[duckdb.DuckDBPyConnection, ResultTable]]:
        """The connection and result table; a database opened for this is released after."""
        with self._lock:
            opened = self._con is None
            try:
                con = self._connection()
                table = self._result_table(self._run.key if self._run else self.key)
                if not table.exists:
                    raise ExecutionError(
                        f"State table '{self.table}' ({self.path}) holds no results yet: run "
                        "the pipeline first."
                    )
                yield con, table
            finally:
                if opened:
                    self._release()

    def _bookkeeping(self, name: str, order: str) -> pa.Table:
        with self._lock:
            opened = self._con is None
            try:
                return (
                    self._connection()
                    .sql(
                        f"SELECT * FROM {SCHEMA}.{name} WHERE table_name = ? ORDER BY {order}",
                        params=[self.table],
                    )
                    .to_arrow_table()
                )
            finally:
                if opened:
                    self._release()


def _catalog_name(path: str) -> str:
    """The name DuckDB gives the catalog of a database file: its name up to the first dot."""
    return os.path.basename(path).split(".", 1)[0]


def _limit_bytes(con: duckdb.DuckDBPyConnection, setting: str) -> float:
    """The bytes DuckDB makes of a ``memory_limit`` setting (``"25%"``, ``"2GB"``); sets it."""
    con.execute(f"SET memory_limit = '{setting}'")
    shown = str(con.sql("SELECT current_setting('memory_limit')").fetchall()[0][0])
    value, _, unit = shown.partition(" ")
    return float(value) * _BYTES_PER.get(unit, 1)


_BYTES_PER = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "PiB": 2**50}


def _has_keys_outside(results: pa.Table, key: str, keys: pa.ChunkedArray) -> bool:
    """Whether ``results`` hold a key that is not among the stream's input ``keys``."""
    if key not in results.column_names or not results.num_rows:
        return False
    found = results[key]
    if found.equals(keys):
        return False
    # By value: Arrow wants a plain value set, and codes differ between encodings.
    return bool(pc.any(pc.invert(pc.is_in(found, value_set=decoded(keys)))).as_py())
