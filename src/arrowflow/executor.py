"""The one place where streams are cut, run, retried and merged.

:class:`PipelineBatchExecutor` runs a :class:`~arrowflow.BatchingScope`: it cuts the streamed
field into zero-copy slices, runs the scope's agents on each (:mod:`arrowflow._stream`), then,
in stream order, persists the stream, calls the hooks, records statistics and delivers the
result; at the end it merges the streams' results in order.

Stopping. A run stops when a stream fails under ``on_error="raise"``, when a programming error
surfaces, when ``stream()``'s iterator is closed, and when it is interrupted (``Ctrl-C``:
``KeyboardInterrupt``, ``SystemExit``, or DuckDB's "query interrupted"). It then starts no
new stream, tells running ones to stop at their next step (coroutines are cancelled), and
keeps — persists and counts — every stream that had completed, even one still waiting for an
earlier stream to complete. An interrupt then gives the running streams
:data:`INTERRUPT_GRACE` seconds to let go, and returns control even if an agent is stuck (its
thread is abandoned: a daemon that can never write to the state store or the sink). Last, the
pool, the event loop, the progress bar, the sink and the state store are released, each
whatever happened to the others; the store records the run as ``ok``, ``failed``,
``stopped`` or ``interrupted``. The interrupt is then raised again — a DuckDB one as a
``KeyboardInterrupt`` — with a note saying which streams were kept, and the scope's statistics
as its ``execution_stats`` attribute (streams cut off have the status ``"interrupted"``).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Generator, Mapping
from concurrent.futures import Future, wait
from contextlib import suppress
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa

from arrowflow._async import EventLoop
from arrowflow._config import StreamingConfig
from arrowflow._invoke import Callables, Fields, check_agents, instantiate
from arrowflow._merge import merge_outputs
from arrowflow._pace import Pace
from arrowflow._retry import as_interrupt, is_interrupt
from arrowflow._slicing import StreamCutter
from arrowflow._store import store_for
from arrowflow._stream import StreamOutcome, StreamPlan, persist_stream, run_stream
from arrowflow._workers import DaemonPool, result_of
from arrowflow.context import Context
from arrowflow.engines.ray import QUEUED
from arrowflow.exceptions import (
    BatchExecutionError,
    ConfigurationError,
    ExecutionError,
)
from arrowflow.hooks import call_hook
from arrowflow.progress import ProgressBar, open_progress
from arrowflow.results import StreamResult
from arrowflow.state.base import ScopeInfo, StreamInfo
from arrowflow.stats import StatsRecorder, StreamRow

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from arrowflow.agent import Agent
    from arrowflow.engines.ray import RayEngine, RayStreams
    from arrowflow.io import Sink
    from arrowflow.scope import BatchingScope

__all__ = ["INTERRUPT_GRACE", "PipelineBatchExecutor", "drain"]

#: Seconds an interrupted run waits for its running streams to stop before returning anyway.
INTERRUPT_GRACE = 1.0

_R = TypeVar("_R")
# Numbers scope runs in this process: a scope_id is never reused, so a store can tell the
# streams of a run that ended from those of the current one.
_RUN_NUMBERS = itertools.count(1)
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
        execution_stats: the last call's totals (``total_batches``, ``successful_batches``,
            ``failed_batches``, ``total_items``, ``processed_items``, ``skipped_items``,
            ``loaded_items``, ``start_time``, ``end_time``) and its ``"streams"`` table, a row
            per stream (``stream_num``, ``rows_in``, ``rows_out``, ``skipped``, ``loaded``,
            ``seconds``, ``attempts``, ``status``, ``error``).

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
        engine: RayEngine | None = None,
    ) -> Generator[StreamResult, None, dict[str, Any]]:
        """Yield each completed stream's result in order; return the merged context.

        Everything that can be checked before an agent runs is checked when this is called;
        closing the generator early stops the run after the current stream. ``progress`` and
        ``sink`` are the run options of :meth:`Flow.run`: with a sink, each stream's rows are
        written to it as they complete, and the merged field is read back from it lazily.
        With an ``engine``, the streams' agents run on its workers (see
        :mod:`arrowflow.engines.ray`); the engine is not stopped at the end.
        """
        run = _ScopeRun(self, {**context, **(agent_results or {})}, progress, sink, engine)
        return run.execute()


class _ScopeRun:
    """One execution of a scope: its plan, its streams, and what they produced."""

    def __init__(
        self,
        executor: PipelineBatchExecutor,
        context: Fields,
        progress: bool | None,
        sink: Sink | None,
        engine: RayEngine | None = None,
    ) -> None:
        scope = executor.scope
        size = scope.chunk_size
        if scope.trigger_agent is None:
            raise ConfigurationError(
                "BatchingScope(None) cannot run: give it the agent that declares "
                "intelligent_streaming, e.g. BatchingScope(QuickFit)."
            )
        if not scope.is_valid() or size is None:
            raise ConfigurationError(
                f"Scope of agent '{scope.trigger_name}' cannot run: it needs a trigger agent "
                "with a stream size > 0 and no other trigger or terminator inside it."
            )
        context.pop("_batch_metadata", None)
        agents = [instantiate(member) for member in scope.agents]
        check_agents(agents)
        trigger = agents[0]
        config = scope.streaming_config() or StreamingConfig(stream_size=size)
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
        self.cancelled = threading.Event()
        callables = Callables.of(trigger, config)
        store = store_for(config.state, callables, field)
        self.plan = StreamPlan(
            agents, field, key, config, callables, store, EventLoop(), self.cancelled
        )
        self.cutter = StreamCutter(source, size, f"Agent '{trigger.name}', field '{field}'")
        self.recorder = StatsRecorder()
        self.outputs: dict[int, Fields] = {}  # by stream number, in stream order
        self.scope_id = f"{trigger.name}:{next(_RUN_NUMBERS)}"
        self.store = store
        self.scope_info = self._scope_info(agents, source.schema)
        self.source = source
        self.progress_option = progress
        self.progress: ProgressBar | None = None
        self.sink = sink
        self.failure: BatchExecutionError | None = None
        self.status = "failed"
        self.began = False  # whether the store's begin_run returned: only then is end_run due
        limit = config.max_concurrency
        # Locally, streams run on a pool of threads (or one at a time, see Pace); with an
        # engine, on its workers, ``max_concurrency`` of them in flight.
        self.engine = engine
        self.remote: RayStreams | None = None
        local = engine is None and limit > 1
        self.pool = DaemonPool(limit, "arrowflow-stream") if local else None
        self.pace = Pace(limit + _queued(engine, limit, source), adaptive=engine is None)
        self.in_flight: deque[tuple[StreamInfo, _Running]] = deque()
        executor.accumulated_results = []

    def _scope_info(self, agents: list[Agent], schema: pa.Schema) -> ScopeInfo:
        names = tuple(f"{type(agent).__module__}.{type(agent).__qualname__}" for agent in agents)
        return ScopeInfo(
            names, self.plan.field, self.plan.key, schema, self.trigger.name, self.scope_id
        )

    def execute(self) -> Generator[StreamResult, None, dict[str, Any]]:
        """Run the streams, then release everything, whatever happened (module docstring)."""
        error: BaseException | None = None
        merged: dict[str, Any] = {}
        try:
            if self.store is not None:
                self.store.begin_run(self.scope_info, self.source)
            self.began = True
            if self.engine is not None:
                members = self.executor.scope.agents
                self.remote = self.engine.streams(self.plan, members, self.base)
            self.progress = open_progress(
                self.progress_option, self.trigger.name, self.cutter.total
            )
            yield from self._run_streams()
            if self.failure is not None:
                self._gather_partial_results(self.failure)
                raise self.failure from self.failure.original_error
            merged = self._finish()
            self.status = "ok"
        except BaseException as exc:
            error = self._stop(exc)
        self._release(error)
        if error is not None:
            raise error
        return merged

    def _run_streams(self) -> Generator[StreamResult, None, None]:
        """Up to ``max_concurrency`` streams at once, completed in stream order.

        Memory stays bounded: a stream is cut from the input only when a slot is free, so at
        most ``max_concurrency`` streams are in flight plus the one being delivered and the
        cutter's look-ahead (a slice of a table in memory, which costs nothing, may wait for a
        thread beyond them: :func:`_queued`).
        """
        pace = self.pace
        in_flight = self.in_flight
        streams = self._streams()
        while True:
            while len(in_flight) < pace.width and not self._is_failing():
                stream = next(streams, None)
                if stream is None:
                    break
                # In flight before it starts: a Ctrl-C landing while it starts still finds it.
                in_flight.append((stream, _STARTING))
                in_flight[-1] = (stream, self._start(stream))
            if not in_flight:
                return
            stream, running = in_flight[0]
            on_thread = isinstance(running, Future)
            outcome = result_of(running) if isinstance(running, Future) else _ran(running)
            in_flight.popleft()
            if pace.watching:
                pace.completed(outcome, on_thread=on_thread)
            result = self._complete(outcome, stream)
            if result is not None and self.failure is None:
                yield result

    def _start(self, stream: StreamInfo) -> Future[StreamOutcome] | StreamOutcome:
        """Run a stream on the engine's workers, on the pool, or right here (its outcome, then)
        when streams run one at a time."""
        if self.remote is not None:
            return self.remote.start(stream)
        if self.pool is None or self.pace.one_at_a_time:
            return run_stream(self.plan, stream)
        return self.pool.submit(run_stream, self.plan, stream)

    def _is_failing(self) -> bool:
        """Whether no new stream should start: a failure under ``on_error="raise"`` is known,
        or a stream still waiting for its turn to complete has already failed."""
        if self.failure is not None:
            return True
        if len(self.in_flight) < 2 or self.plan.config.on_error != "raise":
            return False
        return any(
            future.done() and future.exception() is None and future.result().fields is None
            for _, future in self.in_flight
            if isinstance(future, Future)
        )

    def _streams(self) -> Iterator[StreamInfo]:
        """Each stream with its context, its hook ``on_stream_start`` called just before."""
        field, base, scope_id, cutter = self.plan.field, self.base, self.scope_id, self.cutter
        on_start = self.plan.callables.on_start
        offset = 0
        for num, piece in enumerate(cutter, 1):
            rows = piece.num_rows
            context = {
                **base,
                field: piece,
                "_batch_metadata": {
                    "batch_number": num,
                    "total_batches": cutter.total,  # known once a reader is exhausted
                    "batch_size": rows,
                    "scope_id": scope_id,
                    "array_field": field,
                },
            }
            if on_start is not None:
                self._hook("on_stream_start", num, cutter.total, Context(context))
            yield StreamInfo(num, offset, rows, scope_id, context)
            offset += rows

    def _hook(self, name: str, *args: Any) -> None:
        hook = getattr(self.plan.callables, _HOOK_ATTRIBUTES[name])
        call_hook(self.trigger.name, name, hook, *args)

    def _complete(
        self, outcome: StreamOutcome, stream: StreamInfo, *, stopping: bool = False
    ) -> StreamResult | None:
        """In stream order: persist, record, call hooks, then deliver or note the failure.

        The first failure under ``on_error="raise"`` stops the scheduling of new streams;
        the streams already in flight still complete (and persist) before it is raised. While
        the run is ``stopping``, a stream is only persisted and recorded.
        """
        if self.store is not None:
            persist_stream(self.plan, outcome, stream)
        num, total = outcome.stream_num, self.cutter.total
        fields = outcome.fields
        self.recorder.add(_row(outcome, self.plan.field))
        if self.progress is not None:
            self.progress.update(outcome.rows_in, fields is None, total)
        if fields is not None:
            if stopping:
                return None
            results = fields[self.plan.field]
            if self.sink is not None:
                self.sink.write(results)
                # The sink holds the rows now; keeping them here would grow without bound.
                fields = {name: value for name, value in fields.items() if name != self.plan.field}
            self.outputs[num] = fields
            self.executor.accumulated_results.append(fields)
            if self.plan.config.incremental:
                self._hook("on_stream_complete", num, total, results)
            return StreamResult(num, total, results)
        failure = outcome.failure
        error = failure.error if failure is not None else None
        assert error is not None
        if self.store is not None:
            self.store.record_failure(stream, stream.context[self.plan.field], error)
        if stopping:
            return None
        self._hook("on_stream_error", num, total, error, Context(stream.context))
        if self.plan.config.on_error == "raise" and self.failure is None:
            self.failure = self._failure(outcome, error)
        return None

    def _failure(self, outcome: StreamOutcome, error: Exception) -> BatchExecutionError:
        num, total = outcome.stream_num, self.cutter.total
        shown = f"{num}/{total}" if total is not None else str(num)
        failure = outcome.failure
        assert failure is not None
        step = failure.step
        agent_names = {agent.name for agent in self.plan.agents}
        where = (
            f"Agent '{step}'"
            if step in agent_names
            else f"Scope of agent '{self.trigger.name}', {step}"
        )
        attempts = f"{failure.count} attempt(s)"
        if failure is outcome.persisted:
            attempts += " to persist"
        return BatchExecutionError(
            f"{where}, stream {shown}, field '{self.plan.field}': "
            f"{type(error).__name__}: {error} (after {attempts}). "
            "Completed streams are in .partial_results; use retries= or "
            "on_error='continue' to go on past failing streams.",
            batch_number=num,
            total_batches=total,
            original_error=error,
            partial_results={},
        )

    def _merge(self, *, final: bool) -> dict[str, Any]:
        """The merged context; with a sink, the sink is finished first (published when
        ``final``, kept as partial output otherwise) and the field reads it back."""
        where = f"Agent '{self.trigger.name}'"
        field = self.plan.field
        if self.sink is None:
            return merge_outputs(self.base, field, self.outputs, self.cutter.schema, where)
        if final:
            self.sink.close()
        else:
            self.sink.abort()
        empty = self.cutter.schema.empty_table()
        outputs = {num: {**fields, field: empty} for num, fields in self.outputs.items()}
        merged = merge_outputs(self.base, field, outputs, self.cutter.schema, where)
        merged[field] = self.sink.read_back(self.cutter.schema)
        return merged

    def _gather_partial_results(self, failure: BatchExecutionError) -> None:
        try:
            failure.partial_results = self._merge(final=False)
        except Exception as exc:  # the stream's failure is what the run raises
            failure.add_note(
                f"Its partial results could not be gathered: {type(exc).__name__}: {exc}"
            )

    def _finish(self) -> dict[str, Any]:
        merged = self._merge(final=True)
        if not self.plan.config.incremental and len(self.recorder):
            # Called once the streams ran, even when every one failed (then with no rows).
            total = self.cutter.total
            field = self.plan.field
            # With a sink, the hook reads a reader of its own: the result's stays unread.
            results = (
                merged[field] if self.sink is None else self.sink.read_back(self.cutter.schema)
            )
            self._hook("on_stream_complete", total, total, results)
        return merged

    # -- stopping ---------------------------------------------------------------------------

    def _stop(self, error: BaseException) -> BaseException:
        """Stop the streams still running, keep those completed; return what to raise."""
        completed = [(stream, ran) for stream, ran in self.in_flight if _is_done(ran)]
        running = [(stream, ran) for stream, ran in self.in_flight if not _is_done(ran)]
        self.in_flight.clear()
        self.cancelled.set()
        self.plan.loop.cancel_all()
        if self.remote is not None:
            with suppress(Exception):  # a runtime already gone: its streams are gone too
                self.remote.cancel()
        for _, future in running:
            if isinstance(future, Future):
                future.cancel()
        interrupted = is_interrupt(error)
        if interrupted:
            self.status = "interrupted"
            error = as_interrupt(error)
        elif isinstance(error, GeneratorExit):
            self.status = "stopped"
        try:
            self._keep(completed)
        except BaseException as second:  # a second Ctrl-C while keeping: stop keeping
            error.add_note(f"Keeping the completed streams was cut short: {second!r}")
        if not interrupted:
            return error
        for stream, _ in running:
            self.recorder.add(_interrupted_row(stream))
        if running:
            with suppress(BaseException):  # a second Ctrl-C: stop waiting
                futures = [future for _, future in running if isinstance(future, Future)]
                wait(futures, timeout=INTERRUPT_GRACE)
        kept = [record.stream_num for record in self.recorder.records if record.is_ok]
        error.add_note(
            f"arrowflow: agent '{self.trigger.name}', field '{self.plan.field}' was interrupted; "
            f"{len(kept)} completed stream(s) kept{_listed(kept)}. Run again to resume (with a "
            "state store, done rows are skipped)."
        )
        # The exception itself, not a subclass: an uncaught KeyboardInterrupt then ends the
        # process as Ctrl-C does (exit status 130); its stats ride along as an attribute.
        setattr(error, "execution_stats", self.recorder.as_dict())  # noqa: B010
        return error

    def _keep(self, completed: Iterable[tuple[StreamInfo, _Running]]) -> None:
        """Persist and record, in stream order, the streams that completed before the stop."""
        for stream, ran in completed:
            if isinstance(ran, Future):
                if ran.cancelled() or ran.exception():
                    continue
                ran = ran.result()
            self._complete(_ran(ran), stream, stopping=True)

    def _release(self, error: BaseException | None) -> None:
        """Release the pool, the event loop, the progress bar, the sink and the state store.

        Each step runs whatever happened to the ones before. With the run's own ``error``, a
        failing step becomes a note on it; otherwise the first failure is raised once every
        step ran, and the store records the run as failed.
        """
        pool, progress, sink, remote = self.pool, self.progress, self.sink, self.remote
        steps: list[tuple[str, Callable[[], object]]] = [
            ("the stream threads", pool.shutdown if pool is not None else _nothing),
            ("the Ray workers", remote.close if remote is not None else _nothing),
            ("the event loop", self.plan.loop.close),
            ("the progress bar", progress.close if progress is not None else _nothing),
            ("the sink", sink.abort if sink is not None else _nothing),
            ("the state store", self._end_run),
        ]
        first: BaseException | None = None
        for name, step in steps:
            try:
                step()
            except BaseException as exc:
                note = f"Releasing {name} then failed too: {type(exc).__name__}: {exc}"
                if error is not None:
                    error.add_note(note)
                elif first is None:
                    first = exc
                    self.status = "failed"
                else:
                    first.add_note(note)
        if first is not None:
            raise first

    def _end_run(self) -> None:
        self.executor.execution_stats = self.recorder.as_dict()
        if self.began and self.store is not None:
            self.store.end_run(self.executor.execution_stats, self.status)


def _nothing() -> None:
    return None


def _listed(numbers: list[int], limit: int = 10) -> str:
    if not numbers:
        return ""
    shown = ", ".join(map(str, numbers[:limit]))
    return f" (streams {shown}{', ...' if len(numbers) > limit else ''})"


def _queued(engine: RayEngine | None, limit: int, source: pa.Table | pa.RecordBatchReader) -> int:
    """Streams kept in flight beyond ``max_concurrency`` (when it is above 1), waiting for a
    thread or a worker to take them.

    Streams complete in stream order: without one waiting, a thread that finishes before the
    stream ahead of it idles until the run's thread has taken that one and handed it the next
    (at 100,000 rows per stream of pyarrow work, two threads then ran 1.1x faster than one,
    instead of 1.6x). A slice of a table already in memory costs nothing while it waits, so the
    bound of ``max_concurrency + 2`` streams in memory still holds; a stream cut from a reader
    would be one more held, so a reader gets none. An engine keeps :data:`QUEUED` at its workers.
    With one stream at a time there is none: hooks may count on a stream starting only once
    the one before it completed.
    """
    if limit == 1:
        return 0
    if engine is not None:
        return QUEUED
    return 1 if isinstance(source, pa.Table) else 0


class _Starting:
    """A stream being handed to the pool: not done, nothing to wait for or cancel yet."""

    __slots__ = ()


_STARTING = _Starting()

#: A stream in flight: its future on the pool, its outcome when it ran on the run's thread
#: (nothing to wait for), or :data:`_STARTING` while it is handed to the pool.
_Running = Future[StreamOutcome] | StreamOutcome | _Starting


def _is_done(running: _Running) -> bool:
    return isinstance(running, StreamOutcome) or (isinstance(running, Future) and running.done())


def _ran(running: _Running) -> StreamOutcome:
    """The outcome of a stream known to be done."""
    assert isinstance(running, StreamOutcome), "a stream that was starting has no outcome"
    return running


def _row(outcome: StreamOutcome, field: str) -> StreamRow:
    """The stream's statistics (the fields of a ``StreamRecord``)."""
    fields, tries = outcome.fields, outcome.tries
    persisted = outcome.persisted
    seconds = tries.seconds + (0.0 if persisted is None else persisted.seconds)
    num, rows_in = outcome.stream_num, outcome.rows_in
    if fields is not None:
        rows_out = fields[field].num_rows
        return (
            num,
            rows_in,
            rows_out,
            outcome.skipped,
            outcome.loaded,
            seconds,
            tries.count,
            "ok",
            None,
        )
    failure = outcome.failure
    error = None if failure is None else failure.error
    return (
        num,
        rows_in,
        0,
        0,
        0,
        seconds,
        tries.count,
        "failed",
        f"{type(error).__name__}: {error}",
    )


def _interrupted_row(stream: StreamInfo) -> StreamRow:
    """A stream that was running when the run was interrupted: not completed, not failed."""
    return (stream.num, stream.rows, 0, 0, 0, 0.0, 0, "interrupted", "KeyboardInterrupt")
