"""Group commit: completed streams written in stream order, one transaction per interval.

One commit per stream costs milliseconds (DuckDB syncs its write-ahead log), more than a small
stream's work. So :class:`Writer` takes each completed stream's results (:meth:`Writer.submit`,
called in stream order) and a thread of its own writes them, on a connection of its own, while
the next streams run: everything pending goes in one transaction, committed at most
``interval`` seconds after the oldest pending stream was submitted, sooner when the pending
results pass :data:`FLUSH_ROWS` rows or :data:`FLUSH_BYTES`, and always at
:meth:`Writer.close` (the end of a run, on success, on error and on Ctrl-C). A ``kill -9``
therefore loses at most the streams of the last interval, which a rerun recomputes: their keys
were never marked done.

Within a transaction, consecutive streams whose results have one schema are written by a
single upsert of their concatenation. A stream whose results hold keys outside its input (an
agent that adds rows) is written on its own, in its place: a later stream with such a key in
its input must replace that row, as it would have had each stream been written alone. After
such a stream, nothing is "fresh" any more: every upsert deletes before inserting.

A write that fails is retried once, in a new transaction; if it fails again the writer stops
and the error is raised by the next :meth:`Writer.submit` and by :meth:`Writer.close`, so the
run fails. The streams it held were not marked done, so a rerun recomputes them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa

from arrowflow._workers import POLL
from arrowflow.exceptions import ExecutionError
from arrowflow.state._layout import is_out_of_memory, transaction, translated

if TYPE_CHECKING:
    from arrowflow.state._results import ResultTable

__all__ = ["FLUSH_BYTES", "FLUSH_ROWS", "PendingWrite", "Writer"]

#: DuckDB's rows per row group. An insert of whole row groups is written straight to the
#: database file; the rows of a partial one are logged, then moved at the next checkpoint. A
#: commit of two row groups' rows (some 250,000) inserts at twice the speed of 100,000 rows.
_ROW_GROUP = 122_880
#: Pending rows past this number are committed without waiting for the interval ...
FLUSH_ROWS = 4 * _ROW_GROUP
#: ... and so are pending results past this size, whatever their rows (wide rows).
FLUSH_BYTES = 16 << 20
#: Past this size, :meth:`Writer.submit` waits for a commit: memory stays bounded.
_BLOCK_BYTES = FLUSH_BYTES


@dataclass(frozen=True, slots=True)
class PendingWrite:
    """One completed stream's results, to be upserted.

    Attributes:
        stream: the stream's number, for messages.
        results: the rows the agents returned (with the key column, unless empty).
        keys: the keys of the stream's processed input rows, marked done.
        fresh: nothing is stored for ``keys`` (as the run found when it started).
        unique: ``keys`` are known unique and not null.
        alone: ``results`` hold keys outside ``keys``: written by an upsert of its own.
    """

    stream: int
    results: pa.Table
    keys: pa.ChunkedArray
    fresh: bool
    unique: bool
    alone: bool


class Writer:
    """Writes :class:`PendingWrite` s in order on ``con`` (a connection of its own), in the
    background, committing at most every ``interval`` seconds (see the module docstring)."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        table: ResultTable,
        fp: int,
        interval: float,
        where: str,
        memory_advice: str | None = None,
    ) -> None:
        self._con = con
        self._table = table
        self._fp = fp
        self._interval = interval
        self._where = where
        self._memory_advice = memory_advice  # added when DuckDB runs out of memory
        self._pending: list[PendingWrite] = []
        self._pending_bytes = 0
        self._pending_rows = 0
        self._oldest = 0.0  # monotonic time the oldest pending write was submitted
        self._flushing = False
        self._closing = False
        self._writing = False
        self._error: BaseException | None = None
        self._extras = False  # a stream stored rows under keys outside its input
        self._size = _Size()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="arrowflow-state-writer")
        self._thread.daemon = True
        self._thread.start()

    @property
    def pending(self) -> int:
        """The streams submitted and not committed yet."""
        with self._changed:
            return len(self._pending) + (1 if self._writing else 0)

    def submit(self, write: PendingWrite) -> None:
        """Queue a stream's results; ``ExecutionError`` if the writer has failed."""
        with self._changed:
            self._raise_error()
            while self._pending_bytes >= _BLOCK_BYTES and self._error is None:
                self._changed.wait(POLL)
            self._raise_error()
            first = not self._pending
            if first:
                self._oldest = time.monotonic()
            self._pending.append(write)
            self._pending_bytes += self._size.of(write)
            self._pending_rows += write.results.num_rows
            # The writer waits for the first write, then for the interval to pass: waking it
            # for each stream would only cost a thread switch per stream.
            if first or self._interval == 0 or self._full():
                self._changed.notify_all()

    def flush(self) -> None:
        """Commit everything submitted so far, now; raise the writer's error if it failed."""
        with self._changed:
            self._flushing = True
            self._changed.notify_all()
            while (self._pending or self._writing) and self._error is None:
                # In slices: Ctrl-C reaches a thread waiting on a condition only between waits.
                self._changed.wait(POLL)
            self._flushing = False
            self._raise_error()

    def close(self) -> None:
        """Commit what is pending and stop the thread; raise the writer's error if it failed."""
        try:
            self.flush()
        finally:
            with self._changed:
                self._closing = True
                self._changed.notify_all()
            self._thread.join()
            self._con.close()

    def _raise_error(self) -> None:
        error = self._error
        if error is None:
            return
        where = f"{self._where}: storing the results of completed streams"
        failure = (
            translated(error, where)
            if isinstance(error, duckdb.Error)
            else ExecutionError(f"{where} failed: {type(error).__name__}: {error}.")
        )
        if self._memory_advice is not None and is_out_of_memory(error):
            failure.add_note(self._memory_advice)
        failure.add_note("The streams not stored were not marked done: a rerun recomputes them.")
        raise failure from error

    def _loop(self) -> None:
        while True:
            with self._changed:
                while not self._due():
                    if self._closing:
                        return
                    self._changed.wait(self._wait_time())
                batch, self._pending = self._pending, []
                self._pending_bytes = self._pending_rows = 0
                self._writing = True
            try:
                self._write(batch)
            except BaseException as exc:  # a thread of ours: nobody else would see it
                with self._changed:
                    self._error = exc
                    self._writing = False
                    self._changed.notify_all()
                return
            with self._changed:
                self._writing = False
                self._changed.notify_all()

    def _due(self) -> bool:
        if not self._pending or self._error is not None:
            return False
        if self._flushing or self._closing or self._full():
            return True
        return time.monotonic() - self._oldest >= self._interval

    def _full(self) -> bool:
        return self._pending_rows >= FLUSH_ROWS or self._pending_bytes >= FLUSH_BYTES

    def _wait_time(self) -> float | None:
        if not self._pending:
            return None
        return max(self._interval - (time.monotonic() - self._oldest), 0.0) + 0.001

    def _write(self, batch: list[PendingWrite]) -> None:
        # Each group as one chunk, then the streams' own tables let go (the caller's list is
        # emptied): while DuckDB inserts, memory holds each result once.
        groups = [_Group.of(group) for group in _groups(batch)]
        batch.clear()
        for tries_left in (1, 0):
            extras = self._extras
            try:
                with transaction(self._con):
                    for group in groups:
                        extras = self._upsert(group, extras) or extras
            except Exception:
                if not tries_left:
                    raise
                # Rolled back: what the table knows of its columns may have gone with it.
                self._table.refresh(self._con)
                continue
            self._extras = extras
            return

    def _upsert(self, group: _Group, extras: bool) -> bool:
        return self._table.upsert(
            self._con,
            self._fp,
            group.results,
            group.keys,
            fresh=not extras and group.fresh,
            unique=group.unique,
            added=group.added,
        )


@dataclass(frozen=True, slots=True)
class _Group:
    """Consecutive pending writes that one upsert takes (see :func:`_groups`), combined."""

    results: pa.Table
    keys: pa.ChunkedArray
    fresh: bool
    unique: bool
    added: bool

    @classmethod
    def of(cls, group: list[PendingWrite]) -> _Group:
        if len(group) == 1:
            results, keys = group[0].results, group[0].keys
        else:
            # One chunk each: DuckDB scans an Arrow chunk at a time, and inserts many small
            # ones (a stream's rows each) several times slower than their concatenation.
            results = pa.concat_tables([write.results for write in group]).combine_chunks()
            chunks = [chunk for write in group for chunk in write.keys.chunks]
            keys = pa.chunked_array([pa.concat_arrays(chunks)], type=group[0].keys.type)
        return cls(
            results,
            keys,
            fresh=all(write.fresh for write in group),
            unique=all(write.unique for write in group),
            # A group of several holds no stream with added rows (see _groups).
            added=any(write.alone for write in group),
        )


class _Size:
    """About what a pending write holds, for the thresholds above.

    ``nbytes`` costs more than the rest of a small stream's bookkeeping, so it is measured on
    one write in :attr:`EVERY` of a schema, and the bytes per row found are used in between.
    """

    EVERY = 32

    def __init__(self) -> None:
        self._schema: pa.Schema | None = None
        self._per_row = 0.0
        self._count = 0

    def of(self, write: PendingWrite) -> int:
        rows = write.results.num_rows + len(write.keys)
        schema = write.results.schema
        if self._count % self.EVERY == 0 or self._schema is None or not schema.equals(self._schema):
            self._schema, self._count = schema, 0
            self._per_row = (write.results.nbytes + write.keys.nbytes) / max(rows, 1)
        self._count += 1
        return int(rows * self._per_row)


def _groups(batch: list[PendingWrite]) -> list[list[PendingWrite]]:
    """Consecutive writes that one upsert can take: same schema, none ``alone``."""
    groups: list[list[PendingWrite]] = []
    for write in batch:
        last = groups[-1] if groups else None
        if (
            last is not None
            and not write.alone
            and not last[-1].alone
            and write.results.schema.equals(last[-1].results.schema)
            and write.keys.type.equals(last[-1].keys.type)
        ):
            last.append(write)
        else:
            groups.append([write])
    return groups
