"""The one place where streams are cut, run, retried and merged.

:class:`PipelineBatchExecutor` runs a :class:`~arrowflow.BatchingScope`: it cuts the streamed
field into zero-copy slices, runs the scope's agents on each (:mod:`arrowflow._stream`), then,
in stream order, persists the stream, calls the hooks, records statistics and delivers the
result; at the end it merges the streams' results in order.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
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
from arrowflow.agent import agent_class
from arrowflow.context import Context
from arrowflow.exceptions import BatchExecutionError, ConfigurationError, ExecutionError
from arrowflow.hooks import call_hook
from arrowflow.results import StreamResult
from arrowflow.state.base import ScopeInfo
from arrowflow.stats import StatsRecorder, StreamRecord

if TYPE_CHECKING:
    from collections.abc import Iterator

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
        self, context: Mapping[str, Any], agent_results: Mapping[str, Any] | None = None
    ) -> Generator[StreamResult, None, dict[str, Any]]:
        """Yield each completed stream's result in order; return the merged context.

        Everything that can be checked before an agent runs is checked when this is called;
        closing the generator early stops the run after the current stream.
        """
        run = _ScopeRun(self, {**context, **(agent_results or {})})
        return run.execute()


class _ScopeRun:
    """One execution of a scope: its plan, its streams, and what they produced."""

    def __init__(self, executor: PipelineBatchExecutor, context: Fields) -> None:
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
        source = scope.get_source(context)
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
        self.cutter = StreamCutter(source, size)
        self.recorder = StatsRecorder()
        self.outputs: list[tuple[int, Fields]] = []
        self.scope_id = f"{trigger.name}:{id(self):x}"
        self.state = config.state
        executor.accumulated_results = []
        whole_input = source if isinstance(source, pa.Table) else None
        self._call_state("begin_run", self._scope_info(agents, source.schema), whole_input)

    def _scope_info(self, agents: list[Any], schema: Any) -> ScopeInfo:
        names = tuple(
            f"{agent_class(agent).__module__}.{agent_class(agent).__qualname__}" for agent in agents
        )
        return ScopeInfo(names, self.plan.field, self.plan.key, schema, self.trigger.name)

    def _call_state(self, method: str, *args: Any) -> None:
        function = getattr(self.state, method, None)
        if function is not None:
            function(*args)

    def execute(self) -> Generator[StreamResult, None, dict[str, Any]]:
        status = "failed"
        try:
            for context in self._stream_contexts():
                outcome = run_stream(self.plan, context)
                result = self._complete(outcome, context)
                if result is not None:
                    yield result
            merged = self._finish()
            status = "ok"
            return merged
        except GeneratorExit:
            status = "stopped"
            raise
        finally:
            self.executor.execution_stats = self.recorder.as_dict()
            self._call_state("end_run", self.executor.execution_stats, status)

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
            self._hook("on_stream_start", num, self.cutter.total, Context(context))
            yield context

    def _hook(self, name: str, *args: Any) -> None:
        hook = getattr(self.plan.callables, _HOOK_ATTRIBUTES[name])
        call_hook(self.trigger.name, name, hook, *args)

    def _complete(self, outcome: StreamOutcome, context: Fields) -> StreamResult | None:
        """In stream order: persist, record, call hooks, deliver or fail."""
        persist_stream(self.plan, outcome, context)
        num, total = outcome.stream_num, self.cutter.total
        fields = outcome.fields
        self.recorder.add(_record(outcome, self.plan.field))
        if fields is not None:
            self.outputs.append((num, fields))
            self.executor.accumulated_results.append(fields)
            results = fields[self.plan.field]
            if self.plan.config.incremental:
                self._hook("on_stream_complete", num, total, results)
            return StreamResult(num, total, results)
        error = outcome.error
        assert error is not None
        self._call_state("record_failure", num, context[self.plan.field], error)
        self._hook("on_stream_error", num, total, error, Context(context))
        if self.plan.config.on_error == "continue":
            return None
        shown = f"{num}/{total}" if total is not None else str(num)
        raise BatchExecutionError(
            f"Agent '{outcome.step}', stream {shown}, field '{self.plan.field}': "
            f"{type(error).__name__}: {error} (after {outcome.attempts} attempt(s)). "
            "Completed streams are in .partial_results; use retries= or on_error='continue' to "
            "go on past failing streams.",
            batch_number=num,
            total_batches=total,
            original_error=error,
            partial_results=self._merge(),
        ) from error

    def _merge(self) -> dict[str, Any]:
        where = f"Agent '{self.trigger.name}'"
        return merge_outputs(self.base, self.plan.field, self.outputs, self.cutter.schema, where)

    def _finish(self) -> dict[str, Any]:
        merged = self._merge()
        if not self.plan.config.incremental and self.outputs:
            total = self.cutter.total
            self._hook("on_stream_complete", total, total, merged[self.plan.field])
        return merged


def _record(outcome: StreamOutcome, field: str) -> StreamRecord:
    fields, error = outcome.fields, outcome.error
    return StreamRecord(
        stream_num=outcome.stream_num,
        rows_in=outcome.rows_in,
        rows_out=0 if fields is None else fields[field].num_rows,
        skipped=outcome.skipped if fields is not None else 0,
        loaded=outcome.loaded if fields is not None else 0,
        seconds=outcome.seconds,
        attempts=outcome.attempts,
        status="ok" if fields is not None else "failed",
        error=None if error is None else f"{type(error).__name__}: {error}",
    )
