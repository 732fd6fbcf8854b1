"""``MemoryState``: the behaviour of ``DuckDBState``, kept in Arrow memory, no database.

The store holds one *piece* per stored stream, in the order they were stored: the result table
the agents returned (no copy, exact schema) and the keys it marked done under its fingerprint
(:mod:`arrowflow.state._pieces`); per fingerprint, the schema its agents produced, which loaded
rows are given exactly (:mod:`arrowflow.state._schemas`); and the runs and failures.

Skip is ``pc.is_in`` of a stream's keys against its fingerprint's done keys, load a filter of
that fingerprint's pieces, persist an append after taking the stream's keys out of the older
pieces. When the whole input's keys are known at ``begin_run`` (a table, a Parquet scan) skip
and load are answered for the whole input at once — the done mask, and the loadable rows
sorted by input position (``pc.index_in``) — and each stream takes its slice.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from arrowflow._tabular import decoded, value_type
from arrowflow.exceptions import ConfigurationError, ExecutionError
from arrowflow.state._callables import StoreCallables, array_field, ended
from arrowflow.state._keys import check_keys, key_column, key_field
from arrowflow.state._pieces import (
    Piece,
    Resume,
    added_twice,
    done_keys,
    is_in_stored,
    plain,
    replaced,
    stored_rows,
)
from arrowflow.state._runs import fingerprint
from arrowflow.state._schemas import comparable, conformed, evolved, merged_schema, restored
from arrowflow.state.base import StreamInfo, input_keys

if TYPE_CHECKING:
    from collections.abc import Mapping

    from arrowflow.state.base import ScopeInfo

__all__ = ["MemoryState"]

_TIME = pa.timestamp("us", tz="UTC")
_TOTALS = (
    "total_batches",
    "successful_batches",
    "failed_batches",
    "total_items",
    "processed_items",
    "skipped_items",
    "loaded_items",
)
#: The columns of ``runs()`` and ``failures()``: those of ``DuckDBState``'s.
_RUNS = pa.schema(
    [
        ("run_id", pa.int64()),
        *((name, pa.string()) for name in ("table_name", "fingerprint", "key", "status")),
        ("started_at", _TIME),
        ("ended_at", _TIME),
        *((name, pa.int64()) for name in _TOTALS),
    ]
)
_FAILURES = pa.schema(
    [
        ("run_id", pa.int64()),
        ("table_name", pa.string()),
        ("fingerprint", pa.string()),
        *((name, pa.int64()) for name in ("stream_num", "rows", "keys")),
        ("error", pa.string()),
        ("failed_at", _TIME),
    ]
)
_SHOWN = 5


@dataclass(slots=True)
class _Run:
    """A run of a scope (``row`` is its row of ``runs()``), or state callables used outside one."""

    field: str | None
    key: str
    fp: str
    kind: pa.DataType  # the type keys are compared as
    row: dict[str, Any] | None = None
    scope_id: str | None = None
    resume: Resume | None = None
    # A lazy input's keys, by stream: a key repeated across streams is refused.
    seen: dict[int, pa.ChunkedArray] | None = None


class MemoryState(StoreCallables):
    """Skip, load and persist a streaming scope's rows by key, in memory.

    The same protocol and behaviour as :class:`~arrowflow.state.DuckDBState`, without a
    database: a double for testing pipelines, and a store for runs that need no durability.
    Rows whose key is done under the scope's fingerprint (the qualified names of its agents,
    the streamed field, the key and ``version``) are skipped and their stored results loaded
    with exactly the schema the agents produced; each stream's new results and done keys are
    stored as it completes (keys the agents filtered out are remembered as done; rows they add
    under keys of their own come back with their stream). Change the fingerprint — bump
    ``version``, here or as the attribute between runs — and every row is processed again, its
    stored results replaced.

    Everything lives as long as the store: :meth:`close` discards it (``with`` closes too).
    Stored rows are the agents' own tables, not copies: a result that is a slice of the input
    keeps the input's buffers alive while it is stored.

    One run at a time. Another scope than the one that last wrote the store replaces it (and
    recomputes everything); the first one coming back is refused, as two scopes taking turns
    on one table would undo each other's work.

    Args:
        table: the name of the result table (in messages and in ``runs()``).
        key: the key column: unique, never null, in the input and in the results.
        version: part of the fingerprint; change it to recompute everything.

    Example:
        >>> import pyarrow as pa, pyarrow.compute as pc
        >>> import arrowflow as af
        >>> from arrowflow.state import MemoryState
        >>> store = MemoryState(table="scores", key="id")
        >>> @af.intelligent_streaming(stream_size=2, over="rows", state=store)
        ... class Score(af.Agent):
        ...     def call(self, context):
        ...         rows = context["rows"]
        ...         return {"rows": rows.append_column("score", pc.multiply(rows["n"], 10))}
        >>> first = af.Flow(Score).run(rows=pa.table({"id": [1, 2, 3], "n": [1, 2, 3]}))
        >>> again = af.Flow(Score).run(rows=pa.table({"id": [1, 2, 3, 4], "n": [1, 2, 3, 4]}))
        >>> again["rows"]["score"].to_pylist(), again.stats[0]["skipped_items"]
        ([10, 20, 30, 40], 3)
        >>> store.runs()["status"].to_pylist(), store.to_arrow().num_rows
        (['ok', 'ok'], 4)
        >>> store.close()
    """

    def __init__(
        self, table: str = "quick_fit", key: str = "id", version: str | int | None = None
    ) -> None:
        for name, value in (("table", table), ("key", key)):
            if not isinstance(value, str) or not value:
                raise ConfigurationError(
                    f"MemoryState: {name}= must be a non-empty string, got {value!r}."
                )
        self.table = table
        self.key = key
        self.version = version
        self._lock = threading.RLock()
        self._run: _Run | None = None
        self._fingerprint: str | None = None
        # The scope_id of every run that ended: their abandoned streams are refused.
        self._ended: set[str | None] = set()
        self._forget()

    def __reduce__(self) -> tuple[Any, ...]:
        # A copy in another process (a Ray worker receiving an agent's declaration) is a new,
        # empty store of the same configuration: the results stay with the run that has them.
        return (type(self), (self.table, self.key, self.version))

    def __repr__(self) -> str:
        return f"MemoryState(table={self.table!r}, key={self.key!r})"

    @property
    def version(self) -> str | int | None:
        """Part of the fingerprint; a new value (between runs) recomputes everything."""
        return self._version

    @version.setter
    def version(self, version: str | int | None) -> None:
        if version is not None and (not isinstance(version, str | int) or version is True):
            raise ConfigurationError(
                f"MemoryState: version= must be a string, an int or None, got {version!r}."
            )
        self._version = version

    @property
    def fingerprint(self) -> str | None:
        """The fingerprint of the current or last run, if any."""
        return self._fingerprint

    @property
    def is_open(self) -> bool:
        """Whether the store holds anything (it has been used since it was made or closed)."""
        return self.lifecycle != "closed"

    @property
    def pending_streams(self) -> int:
        """Always 0: a stream is stored when it completes."""
        return 0

    @property
    def lifecycle(self) -> str:
        """``"closed"`` (holds nothing), ``"open"`` (holds what runs or state callables
        stored) or ``"running"`` (a run holds the store).

        ``begin_run`` takes the store to running, ``end_run`` to open; :meth:`close` takes it
        to closed from anywhere, discarding what it holds.
        """
        if self._run is not None:
            return "running"
        return "open" if self._opened else "closed"

    def __enter__(self) -> MemoryState:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Discard everything the store holds; a run in progress is abandoned."""
        with self._lock:
            run, self._run = self._run, None
            if run is not None and run.scope_id is not None:
                self._ended.add(run.scope_id)
            self._forget()

    def _forget(self) -> None:
        """Hold nothing: what was stored, the schemas, the runs."""
        self._opened = False
        self._pieces: list[Piece] = []
        self._schemas: dict[str, pa.Schema] = {}  # by fingerprint: what its agents produced
        self._table_schema: pa.Schema | None = None  # the columns of to_arrow()
        self._key_types: dict[str, pa.DataType] = {}  # by key column: what keys were
        self._descriptions: dict[str, str] = {}  # by fingerprint: the JSON it hashes
        self._loose: dict[tuple[str | None, str | int | None], _Run] = {}
        self._runs: list[dict[str, Any]] = []
        self._failures: list[dict[str, Any]] = []

    # -- the run, as the executor drives it (arrowflow.state.base.Store) ------------------

    def begin_run(self, scope: ScopeInfo, source: pa.Table | pa.RecordBatchReader | None) -> None:
        """Check the input's keys and the scope, and learn what is done.

        When the input's keys are known up front (a table, a Parquet scan) they are checked
        (present, not null, unique, of the stored type) and the done rows found for the whole
        input; for another reader only the key's presence and type are checked here, the rest
        stream by stream.
        """
        with self._lock:
            running = self._run
            if running is not None:
                assert running.row is not None  # a run, not state callables used outside one
                raise ExecutionError(
                    f"{self}: a run of this store is in progress (started "
                    f"{running.row['started_at']:%Y-%m-%d %H:%M:%S} UTC); one run at a time "
                    "per store. Let it finish, or close the stream() iterator it belongs to, "
                    "first."
                )
            key = scope.key or self.key
            where = self._where(scope.field)
            field = key_field(scope.schema, key, where)
            kind = self._key_kind(field.type, key, where)
            keys = input_keys(source, key)
            if keys is not None:
                check_keys(keys, key, where)
            fp, description = fingerprint(scope.agents, scope.field, key, self.version)
            self._check_owner(scope.agents, scope.field, key, where)
            row: dict[str, Any] = {
                "run_id": len(self._runs) + 1,
                "table_name": self.table,
                "fingerprint": fp,
                "key": key,
                "status": "running",
                "started_at": datetime.now(UTC),
                "ended_at": None,
            }
            run = _Run(scope.field, key, fp, kind, row, scope.scope_id)
            if keys is not None:
                pieces, schema = list(self._pieces), self._schemas.get(fp, self._table_schema)
                run.resume = Resume.of(pieces, fp, key, kind, keys, schema)
            else:
                run.seen = {}
            self._key_types.setdefault(key, value_type(field.type))
            self._descriptions[fp] = description
            self._runs.append(row)
            self._run, self._fingerprint, self._opened = run, fp, True

    def skip(self, stream: StreamInfo, batch: pa.Table) -> pa.Array:
        """``True`` for the rows of ``batch`` whose key is done under the scope's fingerprint."""
        run = self._current(stream, batch)
        where = self._where(run.field, stream.num)
        keys = key_column(batch, run.key, where)
        resume = run.resume
        if resume is not None and resume.covers(stream, keys):
            return resume.mask_of(stream, len(keys))
        check_keys(keys, run.key, where)
        values = self._plain(keys, run, where)
        if run.seen is not None:
            self._check_seen(run, values, stream.num, where)
        mask: pa.Array = is_in_stored(values, self._done(run)).combine_chunks()
        return mask

    def load(self, stream: StreamInfo, skipped: pa.Table) -> pa.Table:
        """The stored result rows of the ``skipped`` keys (those done; none for the others),
        in the order they were stored, with the schema the scope's agents produced."""
        run = self._current(stream, skipped)
        where = self._where(run.field, stream.num)
        keys = key_column(skipped, run.key, where)
        with self._lock:  # the table's schema until the fingerprint stores a row
            schema = self._schemas.get(run.fp, self._table_schema)
        if schema is None:
            return pa.table({run.key: keys.slice(0, 0)})
        piece = stream.context.get(run.field) if run.field is not None else None
        resume = run.resume
        rows: pa.Table | None
        if (
            resume is not None
            and isinstance(piece, pa.Table)
            and run.key in piece.column_names
            and resume.covers(stream, piece[run.key])
            and piece[run.key].filter(resume.mask_of(stream, piece.num_rows)).equals(keys)
        ):
            rows = resume.rows_of(stream, piece.num_rows)
        else:
            done = self._done(run)
            wanted = done.filter(pc.is_in(done, value_set=self._plain(keys, run, where)))
            with self._lock:
                pieces = list(self._pieces)
            rows = stored_rows(pieces, run.fp, run.kind, wanted, schema)
        if rows is None:
            return schema.empty_table()
        return restored(rows, schema, skipped)

    def persist(self, stream: StreamInfo, results: pa.Table, processed: pa.Table) -> None:
        """Store ``results`` and mark the ``processed`` input keys done, at once.

        The keys marked done are those of ``processed`` (the rows that went through the
        agents), so keys the agents filtered out are remembered too. The rows stored before
        for those keys, or for the keys of ``results``, are replaced.
        """
        run = self._current(stream, results)
        if not processed.num_rows and not results.num_rows:
            return
        where = self._where(run.field, stream.num)
        if run.key in processed.column_names:
            keys = processed[run.key]
        else:
            keys = key_column(results, run.key, where)
        values = self._plain(keys, run, where)
        done = pc.unique(values.drop_null())
        storable = self._storable(results, run.key)
        extra = owners = None
        if storable and results.num_rows:
            found = self._plain(results[run.key], run, f"State table '{self.table}': results")
            if not found.equals(values):
                outside = pc.invert(pc.is_in(found, value_set=done))
                if pc.any(outside).as_py() and len(values):
                    # Rows the agents added: the stream's own, anchored at its last key.
                    extra = pc.unique(found.filter(outside))
                    owners = pc.if_else(outside, values[len(values) - 1], found)
        with self._lock:
            if run.row is not None and run is not self._run:
                raise ended(where)
            own, table = self._schemas.get(run.fp), self._table_schema
            retyped: list[str] = []
            if storable:  # see arrowflow.state._schemas
                if results.num_rows:
                    own = merged_schema(own, results.schema, self.table)
                table, retyped = evolved(table, results.schema, rows=results.num_rows > 0)
            if extra is not None:
                self._check_added(run, extra, done)
            if extra is None and run.resume is not None and run.resume.is_fresh(stream, values):
                pieces = self._pieces  # nothing stored for these keys: nothing to replace
            else:
                gone = done if extra is None else pa.concat_arrays([done, extra])
                pieces = replaced(self._pieces, run.key, run.kind, gone, done)
                if extra is not None:
                    # Rows of other streams' keys may be gone: the run asks per stream now.
                    run.resume = None
            if retyped:
                pieces = self._invalidate(pieces, run.fp, retyped)
            rows = results if storable else pa.table({})
            pieces.append(Piece(run.fp, run.key, rows, done, owners))
            self._pieces = pieces
            if own is not None:
                self._schemas[run.fp] = own
            self._table_schema = table

    def record_failure(self, stream: StreamInfo, batch: pa.Table, error: BaseException) -> None:
        """Record a stream that failed after its retries; its keys stay not done."""
        with self._lock:
            run = self._run
            key = run.key if run is not None else self.key
            keys = None
            if key in batch.column_names:
                keys = len(pc.unique(batch[key].drop_null()))
            self._failures.append(
                {
                    "run_id": None if run is None or run.row is None else run.row["run_id"],
                    "table_name": self.table,
                    "fingerprint": "" if run is None else run.fp,
                    "stream_num": stream.num,
                    "rows": batch.num_rows,
                    "keys": keys,
                    "error": f"{type(error).__name__}: {error}",
                    "failed_at": datetime.now(UTC),
                }
            )

    def end_run(self, stats: Mapping[str, Any], status: str) -> None:
        """Record the run's status and totals; the store stays open with what it holds."""
        with self._lock:
            run, self._run = self._run, None
            if run is None:
                return
            if run.scope_id is not None:
                self._ended.add(run.scope_id)
            if run.row is not None:
                run.row.update(status=status, ended_at=datetime.now(UTC))
                run.row.update({name: stats.get(name) for name in _TOTALS})

    def _run_field(self) -> str | None:
        return None if self._run is None else self._run.field

    # -- reading what is stored ------------------------------------------------------------

    def to_arrow(self) -> pa.Table:
        """Every stored result row, ordered by key, with the types the agents produced.

        A column has the type the agents last gave it; rows stored without it, or stored
        with a type it can no longer hold (another ``version``'s), have nulls there.
        """
        with self._lock:
            schema, pieces = self._table_schema, list(self._pieces)
            key = self._run.key if self._run is not None else self.key
        if schema is None:
            raise ExecutionError(
                f"State table '{self.table}' (in memory) holds no results yet: run the "
                "pipeline first."
            )
        parts = [conformed(piece.rows, schema) for piece in pieces if piece.rows.num_rows]
        rows = pa.concat_tables(parts) if parts else schema.empty_table()
        if key not in rows.column_names or not rows.num_rows:
            return rows
        return rows.take(pc.sort_indices(decoded(rows[key])))  # stable: then as stored

    def runs(self) -> pa.Table:
        """One row per run: fingerprint, status, times and totals (``DuckDBState.runs()``'s
        columns).

        ``status`` is ``running``, ``ok``, ``failed``, ``stopped`` (``stream()`` closed early)
        or ``interrupted`` (Ctrl-C).
        """
        with self._lock:
            rows = [dict(row) for row in self._runs]
        return pa.Table.from_pylist(rows, schema=_RUNS)

    def failures(self) -> pa.Table:
        """One row per failed stream: run, stream, rows, keys, error."""
        with self._lock:
            rows = list(self._failures)
        return pa.Table.from_pylist(rows, schema=_FAILURES)

    # -- internals -------------------------------------------------------------------------

    def _where(self, field: str | None, stream: int | None = None) -> str:
        where = f"State table '{self.table}' (in memory)"
        if field is not None:
            where += f", field '{field}'"
        if stream:
            where += f", stream {stream}"
        return where

    def _current(self, stream: StreamInfo, sample: pa.Table) -> _Run:
        """The run in progress, or — for callables used outside a run — one for the field.

        A stream of a run that has ended (abandoned after a timeout or an interrupt) is
        refused: nothing of it is read or stored any more.
        """
        if stream.scope_id is not None and stream.scope_id in self._ended:
            raise ended(self._where(None, stream.num))
        run = self._run
        if run is not None:
            return run
        field = array_field(stream.context)
        with self._lock:
            loose = self._loose.get((field, self.version))
            if loose is None:
                where = self._where(field, stream.num)
                found = key_field(sample.schema, self.key, where)
                kind = self._key_kind(found.type, self.key, where)
                fp, description = fingerprint((), field, self.key, self.version)
                loose = _Run(field, self.key, fp, kind)
                self._key_types.setdefault(self.key, value_type(found.type))
                self._descriptions[fp] = description
                self._loose[(field, self.version)] = loose
                self._fingerprint, self._opened = fp, True
            return loose

    def _key_kind(self, key_type: pa.DataType, key: str, where: str) -> pa.DataType:
        """The type keys of ``key_type`` are compared as; refused if not the stored keys'."""
        kind = comparable(key_type)
        stored = self._key_types.get(key)
        if stored is not None and comparable(stored) != kind:
            raise ExecutionError(
                f"{where}: key column '{key}' is {key_type} but table '{self.table}' stores its "
                f"keys as {stored}. Cast the column to the stored type before the scope, or "
                "give the store another table=."
            )
        return kind

    def _plain(self, keys: pa.ChunkedArray, run: _Run, where: str) -> pa.ChunkedArray:
        """``keys`` as the plain values the store compares (``run.kind``)."""
        try:
            return plain(keys, run.kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise ExecutionError(
                f"{where}: key column '{run.key}' is {keys.type}, which cannot be compared "
                f"with the stored keys ({run.kind}): {exc}. Keep the key's type in the "
                "agents' output."
            ) from exc

    def _check_owner(
        self, agents: tuple[str, ...], field: str | None, key: str, where: str
    ) -> None:
        """Refuse a scope that shares the table with another one (``DuckDBState``'s rule).

        A scope is its agents, field and key (its ``version`` aside). A scope other than the
        one that last wrote the table is taken as its replacement (its fingerprint differs, so
        it recomputes everything) unless it wrote the table before: two scopes taking turns
        would each undo the other's done keys, and neither would ever resume.
        """
        mine = (list(agents), field, key)
        scopes = [(run, _scope_of(self._descriptions[run["fingerprint"]])) for run in self._runs]
        if not scopes or scopes[-1][1] == mine:
            return
        before = next((run for run, scope in reversed(scopes) if scope == mine), None)
        if before is None:
            return
        last, owner = scopes[-1]
        raise ExecutionError(
            f"{where}: table '{self.table}' is shared by two scopes: its last run "
            f"(#{last['run_id']}, started {last['started_at']:%Y-%m-%d %H:%M:%S}) was of agents "
            f"{', '.join(owner[0]) or 'none'} over field {owner[1]!r}, key {owner[2]!r}, and run "
            f"#{before['run_id']} before it of this one (agents {', '.join(agents)} over field "
            f"{field!r}, key {key!r}). Two scopes sharing a table undo each other's work and "
            "never resume: give each scope its own store, with its own table= (another "
            "MemoryState)."
        )

    def _check_seen(self, run: _Run, keys: pa.ChunkedArray, stream: int, where: str) -> None:
        """Refuse keys that an earlier stream of the same lazy input already had."""
        assert run.seen is not None
        with self._lock:
            earlier = [c for num, seen in run.seen.items() if num != stream for c in seen.chunks]
            before = pa.chunked_array(earlier, run.kind)
            repeated = before.filter(pc.is_in(before, value_set=keys))
            if not len(repeated):
                run.seen[stream] = keys
                return
            shown = ", ".join(repr(value) for value in repeated[:_SHOWN].to_pylist())
            more = ", ..." if len(repeated) > _SHOWN else ""
            raise ExecutionError(
                f"{where}: keys already seen in an earlier stream of the input: {shown}{more}. "
                "Keys must be unique in the input: deduplicate it, or choose another key=."
            )

    def _done(self, run: _Run) -> pa.ChunkedArray:
        """Every key done under the run's fingerprint."""
        with self._lock:
            pieces = list(self._pieces)
        return done_keys(pieces, run.fp, run.kind)

    def _storable(self, results: pa.Table, key: str) -> bool:
        """Whether ``results`` can be stored (they have the key).

        Raises:
            ExecutionError: rows that cannot be stored: no key column, null keys, two
                columns of one name.
        """
        if key not in results.column_names:
            if results.num_rows:
                raise ExecutionError(
                    f"State table '{self.table}': the results have no key column '{key}' "
                    f"(columns: {', '.join(results.column_names)}); keep it in the agents' "
                    "output."
                )
            return False
        names = results.column_names
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ExecutionError(
                f"State table '{self.table}': the results have several columns named "
                f"{', '.join(repr(name) for name in repeated)}; a stored row needs distinct "
                "column names. Rename them in the agent."
            )
        nulls = results[key].null_count
        if nulls:
            raise ExecutionError(
                f"State table '{self.table}': {nulls} result row(s) have a null '{key}'; "
                "every stored row needs a key. Drop or fill them in the agent."
            )
        return True

    def _check_added(self, run: _Run, added: pa.Array, keys: pa.Array) -> None:
        """Refuse keys added by this stream (of input ``keys``) that another stream of the
        fingerprint added too: a rerun could not give both back."""
        taken = added_twice(self._pieces, run.fp, run.kind, added, keys)
        if len(taken):
            shown = ", ".join(repr(key) for key in taken[:_SHOWN].to_pylist())
            raise ExecutionError(
                f"State table '{self.table}': the agents added rows under key {shown}, which "
                "more than one stream added: the store keeps one stream's added rows per key, "
                "so a rerun could not return both. Give each added row a key of its own (one "
                "that no other stream uses), or add such rows after the scope."
            )

    def _invalidate(self, pieces: list[Piece], fp: str, names: list[str]) -> list[Piece]:
        """Mark not done the keys of the fingerprints other than ``fp`` whose rows have the
        columns ``names``, which now hold another type (``to_arrow()`` shows them null)."""
        stale = {
            other
            for other, schema in self._schemas.items()
            if other != fp and any(name in schema.names for name in names)
        }
        for other in stale:
            del self._schemas[other]
        empty = {piece.key: piece.done.slice(0, 0) for piece in pieces}
        return [
            replace(piece, done=empty[piece.key]) if piece.fp in stale else piece
            for piece in pieces
        ]


def _scope_of(description: str) -> tuple[list[str], str | None, str | None]:
    scope = json.loads(description)
    return list(scope.get("agents") or []), scope.get("field"), scope.get("key")
