"""What a state store provides, and what the executor tells it about a run.

A store passed as ``state=`` supplies the three vectorised state callables. It may
also follow the run's lifecycle: the executor calls each method below when the store has it.

- ``begin_run(scope, source)`` once, after the streamed field is known and before any agent
  runs. ``source`` is the whole input when it is a table (so keys can be checked and the done
  keys fetched in one query), or ``None`` for a lazy reader; ``scope.schema`` is its schema.
- ``record_failure(stream_num, batch, error)`` for each stream that failed after its retries:
  ``batch`` holds the stream's input rows, never marked done.
- ``end_run(stats, status)`` once when the run ends, whatever the outcome (``status`` is
  ``"ok"``, ``"failed"``, ``"stopped"`` (``stream()`` closed early) or ``"interrupted"``
  (Ctrl-C)), with the scope's ``execution_stats``; a store releases its database here. It is
  called only when ``begin_run`` returned: a ``begin_run`` that raises cleans up after itself
  (it may have refused the run because another one holds the store).

``persist_each_stream`` and ``record_failure`` are only ever called from the thread that runs
the scope, in stream order; ``skip_if`` and ``load_existing`` may be called from several
streams' threads at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Mapping

    import pyarrow as pa

__all__ = ["ScopeInfo", "StateStore"]


@dataclass(frozen=True, slots=True)
class ScopeInfo:
    """The identity of a streaming scope, as a store fingerprints it.

    Attributes:
        agents: qualified names (``module.QualName``) of the scope's agents, in order.
        field: the streamed field.
        key: the key column, if known (the ``key=`` option or the store's own).
        schema: the input's schema.
        trigger: the trigger agent's name, for messages.
        scope_id: the ``scope_id`` of this run's streams (in their ``_batch_metadata``): a
            store can refuse calls from streams of a run that has ended.
    """

    agents: tuple[str, ...]
    field: str
    key: str | None
    schema: pa.Schema
    trigger: str
    scope_id: str | None = None


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
