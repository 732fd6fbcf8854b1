"""What a state store is to the executor: a declared protocol, and the stream it is told about.

``state=`` takes any object with the three vectorised state callables (:class:`StateStore`:
``skip_if``, ``load_existing``, ``persist_each_stream``), called with the stream's context. A
store that implements :class:`Store` as well follows the whole run instead: the executor then
calls these methods and no others, with a typed :class:`StreamInfo` rather than a context to
read ``_batch_metadata`` from (its state callables remain for use outside the executor).

- ``begin_run(scope, source)`` once, after the streamed field is known and before any agent
  runs. ``source`` is the input: a table, or a lazy reader that the store must not read from
  (:func:`input_keys` gives its key column when it can be read cheaply, as a Parquet scan's
  can), or ``None``.
- ``skip(stream, batch)`` and ``load(stream, skipped)`` inside each stream's attempts, possibly
  from several streams' threads at once and out of order.
- ``persist(stream, results, processed)`` for every stream that completed, in stream order,
  from the thread that runs the scope, even when every row was skipped (``processed`` then has
  no rows): a store learns there that a stream is over.
- ``record_failure(stream, batch, error)`` for each stream that failed after its retries, in
  stream order too; ``batch`` holds its input rows, never marked done.
- ``end_run(stats, status)`` once when the run ends, whatever the outcome (``status`` is
  ``"ok"``, ``"failed"``, ``"stopped"`` (``stream()`` closed early) or ``"interrupted"``
  (Ctrl-C)), with the scope's ``execution_stats``; a store writes what it holds and releases
  its resources here. It is called only when ``begin_run`` returned: a ``begin_run`` that
  raises cleans up after itself (it may have refused the run because another one holds the
  store).

A stream abandoned by its run (timed out, interrupted) may still call ``skip`` or ``load`` after
``end_run``; a store refuses those calls (its ``scope_id`` tells it the run is over).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import pyarrow as pa

from arrowflow._row_counts import known_column

if TYPE_CHECKING:
    from collections.abc import Mapping

    import numpy as np

__all__ = ["ScopeInfo", "StateStore", "Store", "StreamInfo", "input_keys"]


@dataclass(frozen=True, slots=True)
class ScopeInfo:
    """The identity of a streaming scope, as a store fingerprints it.

    Attributes:
        agents: qualified names (``module.QualName``) of the scope's agents, in order.
        field: the streamed field.
        key: the key column, if known (the ``key=`` option or the store's own).
        schema: the input's schema.
        trigger: the trigger agent's name, for messages.
        scope_id: identifies this run; every :class:`StreamInfo` of the run carries it.
    """

    agents: tuple[str, ...]
    field: str
    key: str | None
    schema: pa.Schema
    trigger: str
    scope_id: str | None = None


class StreamInfo(NamedTuple):
    """One stream of a run, as the executor tells a store about it (a named tuple: made for
    every stream, it costs a fifth of a frozen dataclass).

    Attributes:
        num: the stream's number, from 1.
        offset: the position of its first row in the input; ``None`` when not known (a
            state callable called with a context, outside the executor's own calls).
        rows: its number of input rows.
        scope_id: the run it belongs to (``ScopeInfo.scope_id``).
        context: the stream's context, for stores that hand it to user callables.
    """

    num: int
    offset: int | None
    rows: int
    scope_id: str | None
    context: Mapping[str, Any]


@runtime_checkable
class StateStore(Protocol):
    """The three vectorised state callables: skip what is done, load it, persist what is new."""

    def skip_if(self, batch: pa.Table, context: Mapping[str, Any]) -> Any:
        """A boolean mask over ``batch``'s rows: ``True`` for rows already done."""
        ...

    def load_existing(self, skipped: pa.Table, context: Mapping[str, Any]) -> pa.Table:
        """The stored results of the skipped rows."""
        ...

    def persist_each_stream(self, results: pa.Table, context: Mapping[str, Any]) -> None:
        """Store a stream's newly processed results; ``context``'s field holds its input rows."""
        ...


@runtime_checkable
class Store(Protocol):
    """A store that follows a whole run (the module docstring says when each call comes)."""

    def begin_run(self, scope: ScopeInfo, source: pa.Table | pa.RecordBatchReader | None) -> None:
        """Get ready for a run over ``source``; refuse it (raise) before any agent runs."""
        ...

    def skip(self, stream: StreamInfo, batch: pa.Table) -> pa.Array | np.ndarray[Any, Any]:
        """A boolean mask over ``batch``'s rows: ``True`` for rows already done (an Arrow
        array, or a numpy one of ``bool``, which the executor takes as it is)."""
        ...

    def load(self, stream: StreamInfo, skipped: pa.Table) -> pa.Table:
        """The stored results of the ``skipped`` rows."""
        ...

    def persist(self, stream: StreamInfo, results: pa.Table, processed: pa.Table) -> None:
        """Store the ``results`` the agents returned for the ``processed`` input rows."""
        ...

    def record_failure(self, stream: StreamInfo, batch: pa.Table, error: BaseException) -> None:
        """Note a stream that failed after its retries; its rows stay not done."""
        ...

    def end_run(self, stats: Mapping[str, Any], status: str) -> None:
        """Finish the run: write what is pending, record it, release resources."""
        ...


def input_keys(source: pa.Table | pa.RecordBatchReader | None, key: str) -> pa.ChunkedArray | None:
    """The key column of the whole input, when it is known without reading the input.

    A table has it; a reader made by :func:`arrowflow.scan_parquet` reads just that column
    from its files (the rows it has not yielded yet); any other reader gives ``None``.

    Example:
        >>> import pyarrow as pa
        >>> input_keys(pa.table({"id": [1, 2]}), "id").to_pylist()
        [1, 2]
        >>> input_keys(pa.RecordBatchReader.from_batches(pa.schema([]), []), "id") is None
        True
    """
    if source is None:
        return None
    if isinstance(source, pa.Table):
        return source[key] if key in source.column_names else None
    return known_column(source, key)
