"""The one :class:`~arrowflow.state.base.Store` a scope run talks to.

A store that implements the protocol (``DuckDBState``, ``MemoryState``) is used as it is, unless
the declaration overrides one of its state callables or a subclass of the store overrides one
(``persist_each_stream`` to log, say) without overriding the protocol method behind it.
Otherwise — state callables given as options, defined as the agent's methods, or a ``state=``
object that only has the three callables — :class:`CallableStore` calls them with the stream's
context (a :class:`StreamContext`, which carries the stream's :class:`StreamInfo` for stores
that want it), and forwards the lifecycle calls a ``state=`` store has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from arrowflow._tabular import to_table
from arrowflow.context import Context
from arrowflow.exceptions import ConfigurationError
from arrowflow.state.base import Store, StreamInfo

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    import pyarrow as pa

    from arrowflow._invoke import Callables
    from arrowflow.state.base import ScopeInfo

__all__ = ["CallableStore", "StreamContext", "check_shared_tables", "store_for"]

# Each state callable, with the protocol method that does its work in a Store.
_TYPED = {"skip_if": "skip", "load_existing": "load", "persist_each_stream": "persist"}


def store_for(state: Any, callables: Callables, field: str) -> Store | None:
    """The store of a scope run: ``state`` itself, or the callables behind an adapter."""
    if (
        isinstance(state, Store)
        and callables.skip_if == getattr(state, "skip_if", None)
        and callables.load_existing == getattr(state, "load_existing", None)
        and callables.persist == getattr(state, "persist_each_stream", None)
        and not _overrides_a_callable(type(state))
    ):
        return state
    if state is None and (
        callables.skip_if is None and callables.load_existing is None and callables.persist is None
    ):
        return None
    return CallableStore(callables, field, state)


def check_shared_tables(scopes: Iterable[tuple[str, Any]]) -> None:
    """Refuse two scopes of one flow whose stores write the same table.

    ``scopes`` are (trigger agent name, ``state=``) pairs. A table is known by its store's
    ``table`` and ``path`` (a file, or the store object itself for an in-memory database):
    two scopes writing one table would undo each other's done keys, so the flow is refused
    before any agent runs.
    """
    owners: dict[tuple[object, str], str] = {}
    for trigger, state in scopes:
        table = getattr(state, "table", None)
        if not isinstance(table, str):
            continue
        path = getattr(state, "path", None)
        place: object = path if isinstance(path, str) and path != ":memory:" else id(state)
        owner = owners.setdefault((place, table.lower()), trigger)
        if owner != trigger:
            where = f"file '{path}'" if isinstance(place, str) else "one in-memory store"
            raise ConfigurationError(
                f"Agents '{owner}' and '{trigger}' both keep their state in table '{table}' "
                f"of {where}: two scopes sharing a table undo each other's work and never "
                "resume. Give each scope's store its own table= (or path=)."
            )


def _overrides_a_callable(cls: type) -> bool:
    """Whether ``cls`` defines a state callable below the class defining its protocol method."""
    for name, typed in _TYPED.items():
        owner = next((c for c in cls.__mro__ if name in vars(c)), None)
        typed_owner = next((c for c in cls.__mro__ if typed in vars(c)), None)
        if (
            owner is not None
            and typed_owner is not None
            and owner is not typed_owner
            and issubclass(owner, typed_owner)
        ):
            return True
    return False


class StreamContext(Context):
    """A stream's context, with the :class:`StreamInfo` of the stream it belongs to."""

    __slots__ = ("stream",)

    def __init__(self, stream: StreamInfo) -> None:
        super().__init__(stream.context)
        self.stream = stream


class CallableStore:
    """The state callables of a scope as a :class:`~arrowflow.state.base.Store`.

    ``skip_if`` (then ``load_existing``) and ``persist_each_stream`` are called with the
    stream's context; persisting is skipped when every row was skipped. The lifecycle calls go
    to ``state`` when it has them (a ``Store`` whose callables were overridden).
    """

    def __init__(self, callables: Callables, field: str, state: Any) -> None:
        self.callables = callables
        self.field = field
        self.state = state if isinstance(state, Store) else None

    def begin_run(self, scope: ScopeInfo, source: pa.Table | pa.RecordBatchReader | None) -> None:
        if self.state is not None:
            self.state.begin_run(scope, source)

    def skip(self, stream: StreamInfo, batch: pa.Table) -> Any:
        if self.callables.skip_if is None:
            return None
        return self.callables.skip_if(batch, StreamContext(stream))

    def load(self, stream: StreamInfo, skipped: pa.Table) -> pa.Table | None:
        if self.callables.load_existing is None:
            return None
        return to_table(self.callables.load_existing(skipped, StreamContext(stream)))

    def persist(self, stream: StreamInfo, results: pa.Table, processed: pa.Table) -> None:
        if self.callables.persist is not None and processed.num_rows:
            context = {**stream.context, self.field: processed}
            done = StreamInfo(stream.num, stream.offset, stream.rows, stream.scope_id, context)
            self.callables.persist(results, StreamContext(done))
        elif self.state is not None:
            # Nothing to store, but a store learns here that the stream is over.
            self.state.persist(stream, results, processed)

    def record_failure(self, stream: StreamInfo, batch: pa.Table, error: BaseException) -> None:
        if self.state is not None:
            self.state.record_failure(stream, batch, error)

    def end_run(self, stats: Mapping[str, Any], status: str) -> None:
        if self.state is not None:
            self.state.end_run(stats, status)
