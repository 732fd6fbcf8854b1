"""One stream's work: state callables, the scope's agents, retries.

Everything here runs on a stream's own context and touches nothing shared, so the executor can
run several streams at once. Persistence is separate (:func:`persist_stream`): the executor
calls it in stream order, from the run's own thread, so a stream abandoned by its run (timed
out, interrupted) can never write to the state store.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from arrowflow._invoke import Callables, Fields, as_table, invoke_agent
from arrowflow._merge import concat_in_order
from arrowflow._retry import Attempt, Tries, with_retries
from arrowflow._tabular import decoded, without_views
from arrowflow.exceptions import ConfigurationError, ExecutionError
from arrowflow.state.base import StreamInfo

if TYPE_CHECKING:
    from collections.abc import Callable

    from arrowflow._async import EventLoop
    from arrowflow._config import StreamingConfig
    from arrowflow.agent import Agent
    from arrowflow.state.base import Store

__all__ = [
    "Split",
    "StreamOutcome",
    "StreamPlan",
    "merge_done",
    "persist_stream",
    "run_agents",
    "run_stream",
    "split_done",
]

_NEVER = threading.Event()  # the cancel event of work that runs to its end


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """What every stream of one scope run shares.

    Attributes:
        store: the run's state store (see :mod:`arrowflow._store`), if any.
        loop: the run's event loop, for ``async def`` agents.
        cancelled: set when the run stops; streams still running stop at their next step.
    """

    agents: list[Agent]
    field: str
    key: str | None
    config: StreamingConfig
    callables: Callables
    store: Store | None
    loop: EventLoop
    cancelled: threading.Event
    # Per agent, the last schema it returned that had no view type: the same schema again
    # (stream after stream) is taken without looking into it.
    plain_schemas: dict[int, pa.Schema] = dataclasses.field(default_factory=dict)

    def as_plain_table(self, index: int, table: pa.Table) -> pa.Table:
        """``table`` with view types normalised (see :mod:`arrowflow._tabular`)."""
        schema = table.schema
        known = self.plain_schemas.get(index)
        if known is not None and schema.equals(known):
            return table
        plain = without_views(table)
        if plain is table:
            self.plain_schemas[index] = schema
        return plain

    def retry(
        self,
        tries: Tries,
        work: Callable[..., Any],
        *args: Any,
        timeout: float | None = None,
        cancelled: threading.Event | None = None,
    ) -> Any:
        """``work(attempt, *args)`` with this scope's retry options (see :mod:`arrowflow._retry`);
        ``cancelled`` defaults to the run's."""
        stop = self.cancelled if cancelled is None else cancelled
        return with_retries(tries, self.config, timeout, stop, work, args)


@dataclass(slots=True)
class StreamOutcome:
    """What became of one stream. ``fields`` is ``None`` when it failed.

    Attributes:
        fields: the fields the stream wrote, its streamed field always present as a table.
        processed: the input rows that went through the agents (not skipped).
        produced: the rows the agents returned for them (the loaded rows excluded).
        tries: the attempts of the agents (and state callables), and how the last failed.
        persisted: the attempts to persist the stream, counted apart from the agents' (``None``
            until it is persisted).
    """

    stream_num: int
    rows_in: int
    tries: Tries = dataclasses.field(default_factory=Tries)
    persisted: Tries | None = None
    fields: Fields | None = None
    processed: pa.Table | None = None
    produced: pa.Table | None = None
    skipped: int = 0
    loaded: int = 0

    @property
    def failure(self) -> Tries | None:
        """The tries that failed the stream (the agents' or the persisting), if it failed."""
        if self.fields is not None:
            return None
        persisted = self.persisted
        return persisted if persisted is not None and persisted.error is not None else self.tries


def run_stream(plan: StreamPlan, stream: StreamInfo) -> StreamOutcome:
    """Skip, load, run the agents on the rest and order the rows, retrying as configured."""
    piece: pa.Table = stream.context[plan.field]
    outcome = StreamOutcome(stream.num, piece.num_rows)
    config = plan.config
    args = (plan, stream, piece)
    done = with_retries(outcome.tries, config, config.timeout, plan.cancelled, _attempt, args)
    if done is not None:
        outcome.fields, outcome.processed, outcome.produced, outcome.skipped, outcome.loaded = done
    return outcome


def _attempt(
    attempt: Attempt, plan: StreamPlan, stream: StreamInfo, piece: pa.Table
) -> tuple[Fields, pa.Table, pa.Table, int, int]:
    split = None if plan.store is None else split_done(attempt, plan, stream, piece)
    todo = piece if split is None else split.todo
    written, processed = run_agents(attempt, plan, stream, todo)
    return merge_done(attempt, plan, piece, split, written, processed)


class Split(NamedTuple):
    """A stream's rows as the state store parted them.

    Attributes:
        todo: the rows to run through the agents.
        loaded: the stored results of the done rows (``load_existing``), if any were done.
        mask: ``skip_if``'s mask over the stream's rows, if it gave one.
        skipped: the done rows, if any.
    """

    todo: pa.Table
    loaded: pa.Table | None
    mask: np.ndarray | None
    skipped: pa.Table | None


def split_done(attempt: Attempt, plan: StreamPlan, stream: StreamInfo, piece: pa.Table) -> Split:
    """Ask the store which of ``piece``'s rows are done, and load their results."""
    store = plan.store
    assert store is not None
    attempt.enter("skip_if")
    found = store.skip(stream, piece)
    if found is None:
        return Split(piece, None, None, None)
    mask = _as_mask(found, piece, plan, stream)
    done = int(np.count_nonzero(mask))
    if not done:
        return Split(piece, None, mask, None)
    attempt.enter("load_existing")
    if done == piece.num_rows:
        todo, skipped = piece.slice(0, 0), piece
    else:
        # One take, then two slices: half the kernel calls of two filters.
        order = np.concatenate([np.flatnonzero(mask), np.flatnonzero(~mask)])
        parted = piece.take(_indices(order))
        todo, skipped = parted.slice(done), parted.slice(0, done)
    return Split(todo, store.load(stream, skipped), mask, skipped)


def run_agents(
    attempt: Attempt, plan: StreamPlan, stream: StreamInfo, todo: pa.Table
) -> tuple[Fields, pa.Table]:
    """The scope's agents, in order, on the stream's context with ``todo`` as its field: the
    fields they wrote, and the field as the last one left it."""
    field, context = plan.field, stream.context
    if not todo.num_rows:
        return {}, todo
    # The stream's context holds its rows already: a copy only when rows were skipped.
    current = context if todo is context[field] else {**context, field: todo}
    written: Fields = {}
    for index, agent in enumerate(plan.agents):
        attempt.enter(agent.name)
        before = current[field]
        fields = invoke_agent(agent, current, plan.loop, attempt)
        value = fields.get(field, before)
        if value is before and len(fields) == (field in fields):
            continue  # nothing changed (None, or the field as it came): the context stands
        if value is not before:
            table = (
                plan.as_plain_table(index, value)
                if type(value) is pa.Table
                else as_table(agent, value, field, f"stream {stream.num}")
            )
            if table is not value:
                # A copy: the agent's own dict is left as it returned it.
                fields = {**fields, field: table}
        current = {**current, **fields}
        written.update(fields)
    return written, current[field]


def merge_done(
    attempt: Attempt,
    plan: StreamPlan,
    piece: pa.Table,
    split: Split | None,
    written: Fields,
    processed: pa.Table,
) -> tuple[Fields, pa.Table, pa.Table, int, int]:
    """The stream's results: the loaded rows and the processed ones in input order (see
    DESIGN's state rules), as the streamed field of ``written``; with the rows processed, the
    rows produced, and the numbers of skipped and loaded rows."""
    if split is None:
        written[plan.field] = processed
        return written, piece, processed, 0, 0
    todo, loaded, mask, skipped = split
    if mask is not None and plan.key is not None:
        attempt.enter("merge of loaded and processed rows")
        results = _in_input_order(loaded, processed, piece, mask, skipped, todo, plan.key)
    elif loaded is not None:
        attempt.enter("merge of loaded and processed rows")
        results = _combine(loaded, processed)
    else:
        results = processed
    written[plan.field] = results
    skipped_rows = piece.num_rows - todo.num_rows
    return written, todo, processed, skipped_rows, 0 if loaded is None else loaded.num_rows


def persist_stream(plan: StreamPlan, outcome: StreamOutcome, stream: StreamInfo) -> None:
    """Hand a completed stream's processed results to the store, with retries.

    Only rows that went through the agents are persisted, with the stream's context (the
    fields its agents wrote laid over it). Persisting has a retry budget of its own
    (``retries``, counted in ``outcome.persisted``, not in the agents' attempts); when it runs
    out the stream fails.
    """
    store = plan.store
    processed, produced = outcome.processed, outcome.produced
    if store is None or outcome.fields is None or processed is None or produced is None:
        return
    context = {**stream.context, **outcome.fields}
    done = StreamInfo(stream.num, stream.offset, stream.rows, stream.scope_id, context)
    # No timeout: an abandoned save could still be writing when its retry starts. Not
    # cancellable: the executor persists streams that completed before an interrupt.
    outcome.persisted = Tries()
    saved = plan.retry(
        outcome.persisted, _persist, store, done, produced, processed, cancelled=_NEVER
    )
    if saved is None:
        outcome.fields = None


def _persist(
    attempt: Attempt, store: Store, stream: StreamInfo, results: pa.Table, processed: pa.Table
) -> bool:
    attempt.enter("persist_each_stream")
    store.persist(stream, results, processed)
    return True


def _as_mask(mask: Any, piece: pa.Table, plan: StreamPlan, stream: StreamInfo) -> np.ndarray:
    """``skip_if``'s result (Arrow or numpy) as a numpy boolean mask; nulls mean keep."""
    if isinstance(mask, np.ndarray) and mask.dtype == np.bool_ and mask.shape == (piece.num_rows,):
        return mask
    array = mask if isinstance(mask, pa.Array | pa.ChunkedArray) else pa.array(mask)
    if not pa.types.is_boolean(array.type) or len(array) != piece.num_rows:
        raise ConfigurationError(
            f"Agent '{plan.agents[0].name}', stream {stream.num}: skip_if must return a "
            f"boolean mask of {piece.num_rows} values (one per row of the stream), got "
            f"{len(array)} values of type {array.type}."
        )
    if array.null_count:
        array = pc.fill_null(array, pa.scalar(False))
    # numpy: at a stream's size, its operations cost a fraction of a compute call's.
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype=np.bool_)


def _indices(positions: np.ndarray) -> pa.Array:
    # As an Arrow array: ``take`` given numpy indices converts them on a path that costs more
    # than the take itself at a stream's size.
    return pa.array(positions)


def _combine(loaded: pa.Table, processed: pa.Table) -> pa.Table:
    return concat_in_order([(1, loaded), (2, processed)], processed.schema, "loaded + processed")


def _in_input_order(
    loaded: pa.Table | None,
    processed: pa.Table,
    piece: pa.Table,
    mask: np.ndarray,
    skipped: pa.Table | None,
    todo: pa.Table,
    key: str,
) -> pa.Table:
    """Loaded and processed rows in the input order of their keys; rows whose key
    is not in the input keep their order, last."""
    results = processed if loaded is None else _combine(loaded, processed)
    if key not in results.column_names:
        raise ExecutionError(
            f"key column '{key}' is missing from the stream's results; keep it in the output "
            "of the scope's agents."
        )
    keys = piece[key]
    if results[key].equals(keys):
        return results
    if (
        loaded is not None
        and skipped is not None
        and key in loaded.column_names
        and key in processed.column_names
        and loaded[key].equals(skipped[key])
        and processed[key].equals(todo[key])
    ):
        # The usual resume: one loaded row per skipped row and one result per processed row,
        # each side in input order. Interleave by position, without hashing keys or sorting:
        # the row at each input position is the next loaded row where it was done, else the
        # next processed one (they follow the loaded rows in ``results``).
        taken = np.empty(len(mask), dtype=np.int64)
        done = int(np.count_nonzero(mask))
        taken[mask] = np.arange(done)
        taken[~mask] = np.arange(done, len(mask))
        return results.take(_indices(taken))
    # By value: Arrow refuses a dictionary-encoded value set.
    positions = pc.index_in(results[key], value_set=decoded(keys))
    return results.take(pc.array_sort_indices(positions, null_placement="at_end"))  # stable
