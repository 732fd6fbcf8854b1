"""The one place where streams are cut, run, retried and merged.

:class:`PipelineBatchExecutor` runs a :class:`~arrowflow.BatchingScope`: it cuts the streamed
field into zero-copy slices, runs the scope's agents on each (:mod:`arrowflow._stream`), then,
in stream order, persists the stream, calls the hooks, records statistics and delivers the
result; at the end it merges the streams' results in order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa

from arrowflow._config import StreamingConfig
from arrowflow._merge import merge_outputs
from arrowflow._slicing import StreamCutter
from arrowflow._stream import (
    Callables,
    Fields,
    StreamOutcome,
    StreamPlan,
    instantiate,
    invoke_agent,
    persist_stream,
    run_stream,
)
from arrowflow.agent import Agent, agent_class
from arrowflow.context import Context
from arrowflow.exceptions import BatchExecutionError, ConfigurationError, ExecutionError
from arrowflow.hooks import call_hook
from arrowflow.progress import ProgressBar, open_progress
from arrowflow.results import StreamResult
from arrowflow.state.base import ScopeInfo
from arrowflow.stats import StatsRecorder, StreamRecord

if TYPE_CHECKING:
    from collections.abc import Iterator

    from arrowflow.io import Sink
    from arrowflow.scope import BatchingScope

__all__ = ["PipelineBatchExecutor", "drain", "instantiate", "invoke_agent"]

_R = TypeVar("_R")
_HOOK_ATTRIBUTES = {
    "on_stream_start": "on_start",
    "on_stream_complete": "on_complete",
    "on_stream_error": "on_error",
}


def drain(generator: Generator[Any, None, _R]) -> _R:
    """Run a generator to its end and return its return value."""
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


class PipelineBatchExecutor:
    """Runs a scope's agents once per stream of its field and merges the results in order.

    Attributes:
        scope: the scope it runs.
        accumulated_results: per stream that completed, in order, the fields it wrote (its
            streamed field always present, as a ``pa.Table``); reset by each call.
        execution_stats: totals and the per-stream ``"streams"`` table of the last call
            (DESIGN §6).

    Example:
        >>> import pyarrow as pa
        >>> import arrowflow as af
        >>> @af.intelligent_streaming(stream_size=10)
        ... class Tag(af.Agent):
        ...     def call(self, context):
        ...         rows = context["rows"]
        ...         return {"rows": rows.append_column("tag", pa.array(["x"] * rows.num_rows))}
        >>> executor = af.PipelineBatchExecutor(af.BatchingScope(Tag))
        >>> merged = executor.execute_in_batches({"rows": pa.table({"n": range(25)})})
        >>> merged["rows"].num_rows, executor.execution_stats["total_batches"]
        (25, 3)
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
        self,
        context: Mapping[str, Any],
        agent_results: Mapping[str, Any] | None = None,
        *,
        progress: bool | None = False,
        sink: Sink | None = None,
    ) -> Generator[StreamResult, None, dict[str, Any]]:
        """Yield each completed stream's result in order; return the merged context.

        Everything that can be checked before an agent runs is checked when this is called;
        closing the generator early stops the run after the current stream. ``progress`` and
        ``sink`` are the run options of :meth:`Flow.run`: with a sink, each stream's rows are
        written to it as they complete, and the merged field is read back from it lazily.
        """
        run = _ScopeRun(self, {**context, **(agent_results or {})}, progress, sink)
        return run.execute()


class _ScopeRun:
    """One execution of a scope: its plan, its streams, and what they produced."""

    def __init__(
        self,
        executor: PipelineBatchExecutor,
        context: Fields,
        progress: bool | None,
        sink: Sink | None,
    ) -> None:
        scope = executor.scope
        size = scope.chunk_size
        if not scope.is_valid() or size is None:
            raise ConfigurationError(
                f"Scope of agent '{scope.trigger_name}' cannot run: it needs a stream size > 0 "
                "and no other trigger or terminator inside it."
            )
        context.pop("_batch_metadata", None)
        agents = [instantiate(member) for member in scope.agents]
        trigger = agents[0]
        config = agent_class(trigger)._streaming or StreamingConfig(stream_size=size)
        field = scope.detect_array_field(context)
        source = scope.get_source(context, field)
        key = config.key or getattr(config.state, "key", None)
        if key is not None and key not in source.schema.names:
            raise ExecutionError(
                f"Agent '{trigger.name}': key column '{key}' is not in field '{field}' "
                f"(columns: {', '.join(source.schema.names)}). Fix key= or the input."
            )
        self.executor = executor
        self.base = context
        self.trigger = trigger
        self.plan = StreamPlan(agents, field, key, config, Callables.of(trigger))
        self.cutter = StreamCutter(source, size, f"Agent '{trigger.name}', field '{field}'")
        self.recorder = StatsRecorder()
        self.outputs: list[tuple[int, Fields]] = []
        self.scope_id = f"{trigger.name}:{id(self):x}"
        self.state = config.state
        self.scope_info = self._scope_info(agents, source.schema)
        self.whole_input = source if isinstance(source, pa.Table) else None
        self.progress_option = progress
        self.progress: ProgressBar | None = None
        self.sink = sink
        self.failure: BatchExecutionError | None = None
        executor.accumulated_results = []

    def _scope_info(self, agents: list[Agent], schema: pa.Schema) -> ScopeInfo:
        names = tuple(f"{type(agent).__module__}.{type(agent).__qualname__}" for agent in agents)
        return ScopeInfo(names, self.plan.field, self.plan.key, schema, self.trigger.name)

    def _call_state(self, method: str, *args: Any) -> None:
        function = getattr(self.state, method, None)
        if function is not None:
            function(*args)

    def execute(self) -> Generator[StreamResult, None, dict[str, Any]]:
        """Run the streams, up to ``max_concurrency`` at once, completing them in order.

        Memory stays bounded: a stream is cut from the input only when a slot is free, so at
        most ``max_concurrency`` streams are in flight plus the one being delivered and the
        cutter's look-ahead.
        """
        status = "failed"
        limit = self.plan.config.max_concurrency
        pool = (
            ThreadPoolExecutor(limit, thread_name_prefix="arrowflow-stream") if limit > 1 else None
        )
        in_flight: deque[tuple[Fields, Future[StreamOutcome] | _Ran]] = deque()
        contexts = self._stream_contexts()
        try:
            self._call_state("begin_run", self.scope_info, self.whole_input)
            self.progress = open_progress(
                self.progress_option, self.trigger.name, self.cutter.total
            )
            while True:
                while len(in_flight) < limit and not self._is_failing(in_flight):
                    context = next(contexts, None)
                    if context is None:
                        break
                    in_flight.append((context, _start(pool, self.plan, context)))
                if not in_flight:
                    break
                context, future = in_flight.popleft()
                result = self._complete(future.result(), context)
                if result is not None and self.failure is None:
                    yield result
            if self.failure is not None:
                self.failure.partial_results = self._merge()
                raise self.failure from self.failure.original_error
            merged = self._finish()
            status = "ok"
            return merged
        except GeneratorExit:
            status = "stopped"
            raise
        finally:
            if pool is not None:
                # Streams still running are abandoned, not awaited: stopping means stopping.
                pool.shutdown(wait=False, cancel_futures=True)
            if self.progress is not None:
                self.progress.close()
            if self.sink is not None:
                self.sink.close()
            self.executor.execution_stats = self.recorder.as_dict()
            self._call_state("end_run", self.executor.execution_stats, status)

    def _is_failing(self, in_flight: deque[tuple[Fields, Future[StreamOutcome] | _Ran]]) -> bool:
        """Whether no new stream should start: a failure under ``on_error="raise"`` is known,
        or a stream still waiting for its turn to complete has already failed."""
        if self.failure is not None:
            return True
        if len(in_flight) < 2 or self.plan.config.on_error != "raise":
            return False
        return any(
            future.done() and future.result().fields is None
            for _, future in in_flight
            if isinstance(future, Future)
        )

    def _stream_contexts(self) -> Iterator[Fields]:
        """Each stream's context, its hook ``on_stream_start`` called just before."""
        field = self.plan.field
        for num, piece in enumerate(self.cutter, 1):
            context = {
                **self.base,
                field: piece,
                "_batch_metadata": {
                    "batch_number": num,
                    "total_batches": self.cutter.total,
                    "batch_size": piece.num_rows,
                    "scope_id": self.scope_id,
                    "array_field": field,
                },
            }
            if self.plan.callables.on_start is not None:
                self._hook("on_stream_start", num, self.cutter.total, Context(context))
            yield context

    def _hook(self, name: str, *args: Any) -> None:
        hook = getattr(self.plan.callables, _HOOK_ATTRIBUTES[name])
        call_hook(self.trigger.name, name, hook, *args)

    def _complete(self, outcome: StreamOutcome, context: Fields) -> StreamResult | None:
        """In stream order: persist, record, call hooks, then deliver or note the failure.

        The first failure under ``on_error="raise"`` stops the scheduling of new streams;
        the streams already in flight still complete (and persist) before it is raised.
        """
        if self.plan.callables.persist is not None:
            persist_stream(self.plan, outcome, context)
        num, total = outcome.stream_num, self.cutter.total
        fields = outcome.fields
        record = _record(outcome, self.plan.field)
        self.recorder.add(record)
        if self.progress is not None:
            self.progress.update(record, total)
        if fields is not None:
            results = fields[self.plan.field]
            if self.sink is not None:
                self.sink.write(results)
                # The sink holds the rows now; keeping them here would grow without bound.
                fields = {name: value for name, value in fields.items() if name != self.plan.field}
            self.outputs.append((num, fields))
            self.executor.accumulated_results.append(fields)
            if self.plan.config.incremental:
                self._hook("on_stream_complete", num, total, results)
            return StreamResult(num, total, results)
        error = outcome.error
        assert error is not None
        self._call_state("record_failure", num, context[self.plan.field], error)
        self._hook("on_stream_error", num, total, error, Context(context))
        if self.plan.config.on_error == "raise" and self.failure is None:
            shown = f"{num}/{total}" if total is not None else str(num)
            agent_names = {agent.name for agent in self.plan.agents}
            where = (
                f"Agent '{outcome.step}'"
                if outcome.step in agent_names
                else f"Scope of agent '{self.trigger.name}', {outcome.step}"
            )
            failure = BatchExecutionError(
                f"{where}, stream {shown}, field '{self.plan.field}': "
                f"{type(error).__name__}: {error} (after {outcome.attempts} attempt(s)). "
                "Completed streams are in .partial_results; use retries= or "
                "on_error='continue' to go on past failing streams.",
                batch_number=num,
                total_batches=total,
                original_error=error,
                partial_results={},
            )
            self.failure = failure
        return None

    def _merge(self) -> dict[str, Any]:
        where = f"Agent '{self.trigger.name}'"
        field = self.plan.field
        if self.sink is None:
            return merge_outputs(self.base, field, self.outputs, self.cutter.schema, where)
        empty = self.cutter.schema.empty_table()
        outputs = [(num, {**fields, field: empty}) for num, fields in self.outputs]
        merged = merge_outputs(self.base, field, outputs, self.cutter.schema, where)
        merged[field] = self.sink.read_back(self.cutter.schema)
        return merged

    def _finish(self) -> dict[str, Any]:
        merged = self._merge()
        if not self.plan.config.incremental and self.outputs:
            total = self.cutter.total
            self._hook("on_stream_complete", total, total, merged[self.plan.field])
        return merged


class _Ran:
    """The outcome of a stream run right here, shaped like a ``Future`` of it."""

    __slots__ = ("_outcome",)

    def __init__(self, outcome: StreamOutcome) -> None:
        self._outcome = outcome

    def result(self) -> StreamOutcome:
        return self._outcome


def _start(
    pool: ThreadPoolExecutor | None, plan: StreamPlan, context: Fields
) -> Future[StreamOutcome] | _Ran:
    """Run a stream on the pool, or right here when streams run one at a time."""
    if pool is None:
        return _Ran(run_stream(plan, context))
    return pool.submit(run_stream, plan, context)


def _record(outcome: StreamOutcome, field: str) -> StreamRecord:
    fields, error = outcome.fields, outcome.error
    if fields is not None:
        return StreamRecord(
            outcome.stream_num,
            outcome.rows_in,
            fields[field].num_rows,
            outcome.skipped,
            outcome.loaded,
            outcome.seconds,
            outcome.attempts,
            "ok",
        )
    return StreamRecord(
        outcome.stream_num,
        outcome.rows_in,
        0,
        0,
        0,
        outcome.seconds,
        outcome.attempts,
        "failed",
        f"{type(error).__name__}: {error}",
    )
