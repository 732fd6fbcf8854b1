"""The one place where streams are cut, run, retried and merged.

:class:`PipelineBatchExecutor` runs a :class:`~arrowflow.BatchingScope`: it cuts the streamed
field into zero-copy slices, runs the scope's agents on each (state callables first, with
retries), calls the hooks, records statistics and merges the streams' results in order.
:func:`invoke_agent` runs one agent on a context, honouring ``in_chunks_of``; the flow runner
uses it for agents outside scopes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from arrowflow._config import StreamingConfig
from arrowflow._merge import concat_in_order, merge_outputs
from arrowflow._slicing import StreamCutter
from arrowflow._tabular import describe, is_tabular, to_table, to_table_or_reader
from arrowflow.agent import Agent, AgentLike, agent_class, bound_callable
from arrowflow.context import Context
from arrowflow.exceptions import BatchExecutionError, ConfigurationError, ExecutionError
from arrowflow.hooks import call_hook
from arrowflow.results import StreamResult
from arrowflow.stats import StatsRecorder, StreamRecord

if TYPE_CHECKING:
    from arrowflow.scope import BatchingScope

__all__ = ["PipelineBatchExecutor", "drain", "instantiate", "invoke_agent"]

Fields = dict[str, Any]
_R = TypeVar("_R")
_T = TypeVar("_T")


def instantiate(agent: AgentLike) -> Agent:
    """An agent instance: classes are instantiated with no arguments, instances kept."""
    return agent() if isinstance(agent, type) else agent


def drain(generator: Generator[Any, None, _R]) -> _R:
    """Run a generator to its end and return its return value."""
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


def _to_fields(agent: Agent, returned: Any) -> Fields:
    if returned is None:
        return {}
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
    chunks = agent_class(agent)._chunks
    if chunks is None:
        return _to_fields(agent, agent.call(Context(context)))
    field = chunks.over or _only_tabular_field(agent, context)
    if field not in context or not is_tabular(context[field], allow_records=True):
        found = describe(context[field]) if field in context else "nothing"
        raise ExecutionError(
            f"Agent '{agent.name}': in_chunks_of needs a table in field '{field}', found {found}."
        )
    cutter = StreamCutter(to_table_or_reader(context[field]), chunks.size)
    outputs: list[tuple[int, Fields]] = []
    for num, piece in enumerate(cutter, 1):
        fields = _to_fields(agent, agent.call(Context({**context, field: piece})))
        fields[field] = _as_table(agent, fields.get(field, piece), field, f"chunk {num}")
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


def _as_table(agent: Agent, value: Any, field: str, where: str) -> pa.Table:
    if not is_tabular(value, allow_records=True):
        raise ExecutionError(
            f"Agent '{agent.name}', {where}: field '{field}' must stay a table, got "
            f"{describe(value)}. Return a pyarrow Table or RecordBatch for it."
        )
    return to_table(value)


class _StepFailed(Exception):
    """Carries the exception of one step of a stream together with the step's name."""

    def __init__(self, step: str, error: Exception) -> None:
        super().__init__(step)
        self.step = step
        self.error = error


def _step(step: str, function: Callable[..., _T], *args: Any) -> _T:
    try:
        return function(*args)
    except Exception as exc:
        raise _StepFailed(step, exc) from exc


@dataclass(frozen=True, slots=True)
class _Callables:
    """The hooks and state callables of a scope, resolved once per run."""

    on_start: Callable[..., Any] | None
    on_complete: Callable[..., Any] | None
    on_error: Callable[..., Any] | None
    skip_if: Callable[..., Any] | None
    load_existing: Callable[..., Any] | None
    persist: Callable[..., Any] | None

    @classmethod
    def of(cls, trigger: Agent) -> _Callables:
        return cls(
            *(
                bound_callable(trigger, name)
                for name in (
                    "on_stream_start",
                    "on_stream_complete",
                    "on_stream_error",
                    "skip_if",
                    "load_existing",
                    "persist_each_stream",
                )
            )
        )


@dataclass(frozen=True, slots=True)
class _Outcome:
    record: StreamRecord
    fields: Fields | None = None
    error: Exception | None = None
    step: str | None = None


class PipelineBatchExecutor:
    """Runs a scope's agents once per stream of its field and merges the results in order.

    Attributes:
        scope: the scope it runs.
        accumulated_results: per stream that completed, in order, the fields it wrote (its
            streamed field always present, as a ``pa.Table``); reset by each call.
        execution_stats: totals and the per-stream ``"streams"`` table of the last call
            (DESIGN §6).
    """

    def __init__(self, scope: BatchingScope) -> None:
        self.scope = scope
        self.accumulated_results: list[Fields] = []
        self.execution_stats: dict[str, Any] = StatsRecorder().as_dict(finished=False)
        self.execution_stats["start_time"] = None

    def execute_in_batches(
        self, context: Mapping[str, Any], agent_results: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Run every stream and return the merged context (``agent_results`` laid over it)."""
        return drain(self.iter_batches(context, agent_results))

    def iter_batches(
        self, context: Mapping[str, Any], agent_results: Mapping[str, Any] | None = None
    ) -> Generator[StreamResult, None, dict[str, Any]]:
        """Yield each completed stream's result in order; return the merged context."""
        scope = self.scope
        size = scope.chunk_size
        if not scope.is_valid() or size is None:
            raise ConfigurationError(
                f"Scope of agent '{scope.trigger_name}' cannot run: it needs a stream size > 0 "
                "and no other trigger or terminator inside it."
            )
        base = {**context, **(agent_results or {})}
        base.pop("_batch_metadata", None)
        agents = [instantiate(member) for member in scope.agents]
        trigger = agents[0]
        config = agent_class(trigger)._streaming or StreamingConfig(stream_size=size)
        callables = _Callables.of(trigger)
        key = config.key or getattr(config.state, "key", None)
        field = scope.detect_array_field(base)
        cutter = StreamCutter(scope.get_source(base), size)
        where = f"Agent '{trigger.name}'"
        recorder = StatsRecorder()
        self.accumulated_results = []
        outputs: list[tuple[int, Fields]] = []
        scope_id = f"{trigger.name}:{id(self):x}"

        for num, piece in enumerate(cutter, 1):
            total = cutter.total
            stream_context = {
                **base,
                field: piece,
                "_batch_metadata": {
                    "batch_number": num,
                    "total_batches": total,
                    "batch_size": piece.num_rows,
                    "scope_id": scope_id,
                    "array_field": field,
                },
            }
            call_hook(
                trigger.name,
                "on_stream_start",
                callables.on_start,
                num,
                total,
                Context(stream_context),
            )
            outcome = self._run_stream(agents, stream_context, field, key, config, callables)
            recorder.add(outcome.record)
            if outcome.fields is not None:
                outputs.append((num, outcome.fields))
                self.accumulated_results.append(outcome.fields)
                results = outcome.fields[field]
                if config.incremental:
                    call_hook(
                        trigger.name,
                        "on_stream_complete",
                        callables.on_complete,
                        num,
                        total,
                        results,
                    )
                yield StreamResult(num, total, results)
                continue
            error = outcome.error
            assert error is not None
            call_hook(
                trigger.name,
                "on_stream_error",
                callables.on_error,
                num,
                total,
                error,
                Context(stream_context),
            )
            if config.on_error == "raise":
                self.execution_stats = recorder.as_dict()
                partial = merge_outputs(base, field, outputs, cutter.schema, where)
                shown = f"{num}/{total}" if total is not None else str(num)
                raise BatchExecutionError(
                    f"Agent '{outcome.step}', stream {shown}, field '{field}': "
                    f"{type(error).__name__}: {error} (after {outcome.record.attempts} "
                    "attempt(s)). Completed streams are in .partial_results; use retries= or "
                    "on_error='continue' to go on past failing streams.",
                    batch_number=num,
                    total_batches=total,
                    original_error=error,
                    partial_results=partial,
                ) from error

        merged = merge_outputs(base, field, outputs, cutter.schema, where)
        if not config.incremental and outputs:
            total = cutter.total
            call_hook(
                trigger.name,
                "on_stream_complete",
                callables.on_complete,
                total,
                total,
                merged[field],
            )
        self.execution_stats = recorder.as_dict()
        return merged

    def _run_stream(
        self,
        agents: list[Agent],
        context: Fields,
        field: str,
        key: str | None,
        config: StreamingConfig,
        callables: _Callables,
    ) -> _Outcome:
        """One stream with its retries; failures are returned, not raised."""
        rows_in = context[field].num_rows
        started = time.perf_counter()
        attempts = 0
        while True:
            attempts += 1
            try:
                fields, skipped, loaded = self._attempt(agents, context, field, key, callables)
            except _StepFailed as failed:
                error = failed.error
                if attempts <= config.retries and isinstance(error, config.retry_on):
                    time.sleep(_backoff_delay(config.backoff, attempts))
                    continue
                record = StreamRecord(
                    context["_batch_metadata"]["batch_number"],
                    rows_in,
                    0,
                    0,
                    0,
                    time.perf_counter() - started,
                    attempts,
                    "failed",
                    f"{type(error).__name__}: {error}",
                )
                return _Outcome(record, error=error, step=failed.step)
            record = StreamRecord(
                context["_batch_metadata"]["batch_number"],
                rows_in,
                fields[field].num_rows,
                skipped,
                loaded,
                time.perf_counter() - started,
                attempts,
                "ok",
            )
            return _Outcome(record, fields=fields)

    def _attempt(
        self,
        agents: list[Agent],
        context: Fields,
        field: str,
        key: str | None,
        callables: _Callables,
    ) -> tuple[Fields, int, int]:
        """Skip, load, run the agents on the rest, persist, and order the stream's rows."""
        piece: pa.Table = context[field]
        todo, loaded = piece, None
        if callables.skip_if is not None:
            mask = _as_mask(_step("skip_if", callables.skip_if, piece, Context(context)), piece)
            skipped = piece.filter(mask)
            todo = piece.filter(pc.invert(mask))
            if callables.load_existing is not None and skipped.num_rows:
                loaded = to_table(
                    _step("load_existing", callables.load_existing, skipped, Context(context))
                )
        written: Fields = {}
        processed = todo
        if todo.num_rows:
            current = {**context, field: todo}
            for agent in agents:
                fields = _step(agent.name, invoke_agent, agent, current)
                if field in fields:
                    where = f"stream {context['_batch_metadata']['batch_number']}"
                    fields[field] = _step(agent.name, _as_table, agent, fields[field], field, where)
                current = {**current, **fields}
                written.update(fields)
            processed = current[field]
            if callables.persist is not None:
                _step(
                    "persist_each_stream",
                    callables.persist,
                    processed,
                    Context({**current, field: todo}),
                )
        results = processed if loaded is None else _combine(loaded, processed)
        if callables.skip_if is not None and key is not None:
            results = _step("ordering by key", _order_by_key, results, piece, key)
        written[field] = results
        skipped_rows = piece.num_rows - todo.num_rows
        return written, skipped_rows, 0 if loaded is None else loaded.num_rows


def _as_mask(mask: Any, piece: pa.Table) -> pa.Array[Any]:
    """A boolean Arrow array from ``skip_if``'s result (Arrow or numpy); nulls mean keep."""
    array = pa.array(mask) if not isinstance(mask, pa.Array | pa.ChunkedArray) else mask
    if not pa.types.is_boolean(array.type) or len(array) != piece.num_rows:
        raise ExecutionError(
            f"skip_if must return a boolean mask of {piece.num_rows} values, got "
            f"{len(array)} values of type {array.type}."
        )
    return pc.fill_null(array, pa.scalar(False))


def _combine(loaded: pa.Table, processed: pa.Table) -> pa.Table:
    return concat_in_order([(1, loaded), (2, processed)], processed.schema, "loaded + processed")


def _order_by_key(results: pa.Table, piece: pa.Table, key: str) -> pa.Table:
    """Rows in the input order of their keys; keys not in the input keep their order, last."""
    if key not in results.column_names:
        raise ExecutionError(
            f"key column '{key}' is missing from the stream's results; keep it in the output "
            "of the scope's agents."
        )
    positions = pc.index_in(results[key], value_set=piece[key])
    order = pc.sort_indices(positions, null_placement="at_end")
    return results.take(order)


def _backoff_delay(base: float, attempt: int) -> float:
    """Exponential backoff with jitter: ``base * 2**(attempt-1)``, scaled by 0.5 to 1.5."""
    if base == 0:
        return 0.0
    return float(base * 2 ** (attempt - 1) * (0.5 + random.random()))
