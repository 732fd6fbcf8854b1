"""One stream's work: state callables, the scope's agents, retries.

Everything here runs on a stream's own context and touches nothing shared, so the executor can
run several streams at once. Persistence is separate (:func:`persist_stream`): the executor
calls it in stream order.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from arrowflow._async import resolve
from arrowflow._merge import concat_in_order, merge_outputs
from arrowflow._slicing import StreamCutter
from arrowflow._tabular import describe, is_tabular, to_table, to_table_or_reader
from arrowflow.agent import Agent, AgentLike, bound_callable
from arrowflow.context import Context
from arrowflow.exceptions import ConfigurationError, ExecutionError

if TYPE_CHECKING:
    from arrowflow._config import StreamingConfig

__all__ = [
    "Callables",
    "Fields",
    "StreamOutcome",
    "StreamPlan",
    "instantiate",
    "invoke_agent",
    "persist_stream",
    "run_stream",
]

Fields = dict[str, Any]
_T = TypeVar("_T")


def instantiate(agent: AgentLike) -> Agent:
    """An agent instance: classes are instantiated with no arguments, instances kept."""
    return agent() if isinstance(agent, type) else agent


def _to_fields(agent: Agent, returned: Any) -> Fields:
    if returned is None:
        return {}
    if type(returned) is dict:
        return returned
    if isinstance(returned, Mapping):
        return dict(returned)
    raise ExecutionError(
        f"Agent '{agent.name}' returned {describe(returned)} from call(); return a mapping of "
        "the fields to set, or None."
    )


def invoke_agent(agent: Agent, context: Mapping[str, Any]) -> Fields:
    """Run ``agent`` on ``context`` and return the fields it set.

    An agent declared ``in_chunks_of(n)`` is called once per chunk of ``n`` rows of its tabular
    field; the chunks' outputs are merged in order like streams (tables concatenated, other
    values collected in a list).
    """
    chunks = type(agent)._chunks
    if chunks is None:
        returned = agent.call(Context(context))
        if type(returned) is dict:  # the usual answer, taken without the checks below
            return returned
        return _to_fields(agent, resolve(returned))
    field = chunks.over or _only_tabular_field(agent, context)
    if field not in context or not is_tabular(context[field], allow_records=True):
        found = describe(context[field]) if field in context else "nothing"
        raise ExecutionError(
            f"Agent '{agent.name}': in_chunks_of needs a table in field '{field}', found {found}."
        )
    cutter = StreamCutter(to_table_or_reader(context[field]), chunks.size)
    outputs: list[tuple[int, Fields]] = []
    for num, piece in enumerate(cutter, 1):
        fields = _to_fields(agent, resolve(agent.call(Context({**context, field: piece}))))
        fields = {**fields, field: as_table(agent, fields.get(field, piece), field, f"chunk {num}")}
        outputs.append((num, fields))
    return merge_outputs({}, field, outputs, cutter.schema, f"Agent '{agent.name}'")


def _only_tabular_field(agent: Agent, context: Mapping[str, Any]) -> str:
    candidates = [name for name, value in context.items() if is_tabular(value)]
    if len(candidates) != 1:
        raise ConfigurationError(
            f"Agent '{agent.name}': in_chunks_of needs one tabular field, found "
            f"{len(candidates)} ({', '.join(candidates) or 'none'}); name it with "
            "in_chunks_of(n, over='field')."
        )
    return candidates[0]


def as_table(agent: Agent, value: Any, field: str, where: str) -> pa.Table:
    """The value an agent wrote to a tabular field, as a table; ``ExecutionError`` if not one."""
    if type(value) is pa.Table:
        return value
    if not is_tabular(value, allow_records=True):
        raise ExecutionError(
            f"Agent '{agent.name}', {where}: field '{field}' must stay a table, got "
            f"{describe(value)}. Return a pyarrow Table or RecordBatch for it."
        )
    return to_table(value)


@dataclass(frozen=True, slots=True)
class Callables:
    """The hooks and state callables of a scope, resolved once per run."""

    on_start: Callable[..., Any] | None
    on_complete: Callable[..., Any] | None
    on_error: Callable[..., Any] | None
    skip_if: Callable[..., Any] | None
    load_existing: Callable[..., Any] | None
    persist: Callable[..., Any] | None

    @classmethod
    def of(cls, trigger: Agent) -> Callables:
        names = (
            "on_stream_start",
            "on_stream_complete",
            "on_stream_error",
            "skip_if",
            "load_existing",
            "persist_each_stream",
        )
        return cls(*(bound_callable(trigger, name) for name in names))


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """What every stream of one scope run shares."""

    agents: list[Agent]
    field: str
    key: str | None
    config: StreamingConfig
    callables: Callables


@dataclass(slots=True)
class StreamOutcome:
    """What became of one stream. ``fields`` is ``None`` when it failed.

    Attributes:
        fields: the fields the stream wrote, its streamed field always present as a table.
        processed: the input rows that went through the agents (not skipped).
        produced: the rows the agents returned for them (the loaded rows excluded).
        step: the agent or state callable that raised, when it failed.
    """

    stream_num: int
    rows_in: int
    attempts: int = 0
    seconds: float = 0.0
    fields: Fields | None = None
    processed: pa.Table | None = None
    produced: pa.Table | None = None
    skipped: int = 0
    loaded: int = 0
    error: Exception | None = None
    step: str | None = None

    def fail(self, step: str, error: Exception) -> None:
        self.fields, self.step, self.error = None, step, error


class _Steps:
    """Which step of an attempt is running: the name a failure or a timeout is blamed on."""

    __slots__ = ("current",)

    def __init__(self) -> None:
        self.current = "skip_if"


def _call_with_timeout(function: Callable[[], _T], timeout: float) -> _T:
    """``function()``, abandoned with ``TimeoutError`` after ``timeout`` seconds.

    The attempt runs in a daemon thread that nobody waits for: an overrun cannot be
    interrupted in Python, so it may finish in the background, its result ignored.
    """
    finished = threading.Event()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = function()
        except BaseException as exc:
            box["error"] = exc
        finally:
            finished.set()

    threading.Thread(target=target, name="arrowflow-attempt", daemon=True).start()
    if not finished.wait(timeout):
        raise TimeoutError(f"stream attempt exceeded timeout={timeout}s")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def _with_retries(
    config: StreamingConfig,
    outcome: StreamOutcome,
    timeout: float | None,
    attempt: Callable[..., _T],
    *args: Any,
) -> _T | None:
    """Run ``attempt(steps, *args)`` until it succeeds or retries run out, each attempt
    abandoned after ``timeout`` seconds; a failure is recorded in ``outcome`` and gives
    ``None``."""
    started = time.perf_counter()
    try:
        while True:
            outcome.attempts += 1
            steps = _Steps()
            try:
                if timeout is None:
                    return attempt(steps, *args)
                return _call_with_timeout(partial(attempt, steps, *args), timeout)
            except Exception as error:
                retryable = isinstance(error, config.retry_on)
                if not retryable or outcome.attempts > config.retries:
                    outcome.fail(steps.current, error)
                    return None
                time.sleep(backoff_delay(config.backoff, outcome.attempts))
    finally:
        outcome.seconds += time.perf_counter() - started


def run_stream(plan: StreamPlan, context: Fields) -> StreamOutcome:
    """Skip, load, run the agents on the rest and order the rows, retrying as configured."""
    piece: pa.Table = context[plan.field]
    outcome = StreamOutcome(context["_batch_metadata"]["batch_number"], piece.num_rows)
    done = _with_retries(plan.config, outcome, plan.config.timeout, _attempt, plan, context, piece)
    if done is not None:
        outcome.fields, outcome.processed, outcome.produced, outcome.skipped, outcome.loaded = done
    return outcome


def _attempt(
    steps: _Steps, plan: StreamPlan, context: Fields, piece: pa.Table
) -> tuple[Fields, pa.Table, pa.Table, int, int]:
    field, callables = plan.field, plan.callables
    todo, loaded, mask, skipped = piece, None, None, None
    if callables.skip_if is not None:
        steps.current = "skip_if"
        mask = _as_mask(callables.skip_if(piece, Context(context)), piece)
        todo = piece.filter(pc.invert(mask))
        if callables.load_existing is not None and todo.num_rows < piece.num_rows:
            steps.current = "load_existing"
            skipped = piece.filter(mask)
            loaded = to_table(callables.load_existing(skipped, Context(context)))
    written: Fields = {}
    processed = todo
    if todo.num_rows:
        current = {**context, field: todo}
        for agent in plan.agents:
            steps.current = agent.name
            fields = invoke_agent(agent, current)
            if field in fields and type(fields[field]) is not pa.Table:
                where = f"stream {context['_batch_metadata']['batch_number']}"
                # A copy: the agent's own dict is left as it returned it.
                fields = {**fields, field: as_table(agent, fields[field], field, where)}
            current = {**current, **fields}
            written.update(fields)
        processed = current[field]
    steps.current = "merge of loaded and processed rows"
    if mask is not None and plan.key is not None:
        results = _in_input_order(loaded, processed, piece, mask, skipped, todo, plan.key)
    else:
        results = processed if loaded is None else _combine(loaded, processed)
    written[field] = results
    skipped_rows = piece.num_rows - todo.num_rows
    return written, todo, processed, skipped_rows, 0 if loaded is None else loaded.num_rows


def persist_stream(plan: StreamPlan, outcome: StreamOutcome, context: Fields) -> None:
    """Hand a completed stream's processed results to ``persist_each_stream``, with retries.

    Only rows that went through the agents are persisted; the callable's context is the
    stream's, its field holding those input rows. Nothing is persisted when every row was
    skipped.
    """
    persist = plan.callables.persist
    processed, produced = outcome.processed, outcome.produced
    if persist is None or outcome.fields is None or processed is None or produced is None:
        return
    if not processed.num_rows:
        return
    persist_context = Context({**context, **outcome.fields, plan.field: processed})
    # No timeout here: an abandoned save could still be writing when its retry starts.
    _with_retries(plan.config, outcome, None, _persist, persist, produced, persist_context)


def _persist(
    steps: _Steps, persist: Callable[..., Any], results: pa.Table, context: Context
) -> None:
    steps.current = "persist_each_stream"
    persist(results, context)


def _as_mask(mask: Any, piece: pa.Table) -> Any:
    """A boolean Arrow array from ``skip_if``'s result (Arrow or numpy); nulls mean keep."""
    array = mask if isinstance(mask, pa.Array | pa.ChunkedArray) else pa.array(mask)
    if not pa.types.is_boolean(array.type) or len(array) != piece.num_rows:
        raise ExecutionError(
            f"skip_if must return a boolean mask of {piece.num_rows} values, got "
            f"{len(array)} values of type {array.type}."
        )
    return pc.fill_null(array, pa.scalar(False)) if array.null_count else array


def _combine(loaded: pa.Table, processed: pa.Table) -> pa.Table:
    return concat_in_order([(1, loaded), (2, processed)], processed.schema, "loaded + processed")


def _in_input_order(
    loaded: pa.Table | None,
    processed: pa.Table,
    piece: pa.Table,
    mask: Any,
    skipped: pa.Table | None,
    todo: pa.Table,
    key: str,
) -> pa.Table:
    """Loaded and processed rows in the input order of their keys (DESIGN §5); rows whose key
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
        # each side in input order. Interleave by position, without hashing keys or sorting.
        positions = pa.concat_arrays(
            [
                pc.cast(pc.indices_nonzero(mask), pa.int64()),
                pc.cast(pc.indices_nonzero(pc.invert(mask)), pa.int64()),
            ]
        )
        return results.take(pc.inverse_permutation(positions))
    positions = pc.index_in(results[key], value_set=keys)
    return results.take(pc.array_sort_indices(positions, null_placement="at_end"))  # stable


def backoff_delay(base: float, attempt: int) -> float:
    """Exponential backoff with jitter: ``base * 2**(attempt-1)``, scaled by 0.5 to 1.5."""
    if base == 0:
        return 0.0
    return float(base * 2 ** (attempt - 1) * (0.5 + random.random()))
