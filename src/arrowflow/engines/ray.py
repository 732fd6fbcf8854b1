"""Streaming scopes on a Ray runtime: ``run(engine="ray")``, or ``engine=af.RayEngine(...)``.

What runs where. The driver (the process that called ``run``) keeps everything a stream shares
with the others or with the state store, exactly as the local engine does: it cuts the streams
(a lazy input is read only as streams are dispatched, at most ``max_concurrency`` in flight),
calls ``on_stream_start``, asks the state store which rows are done and loads their results
(done rows are never shipped), and then, in stream order as streams return, persists the new
results, records the statistics, calls ``on_stream_complete`` / ``on_stream_error``, writes
the sink and delivers the stream. The workers run only the scope's agents on a stream's
remaining rows, with the declaration's retries and timeout: the local engine's own step,
:func:`arrowflow._stream.run_agents`. They never open the state store, which is not sent to
them. Agents outside scopes run on the driver.

Why actors fed stream by stream rather than Ray Data's ``map_batches``. Everything the driver
does above happens per stream, in order, as streams return: ``map_batches`` owns the loop (its
own batching, back-pressure and output iterator), so state skip/load before dispatch, hooks,
partial results and resume would each need a second implementation around it. Ray tasks were
the other candidate: a task holds a CPU (or a fraction of one, so a worker process per
concurrent stream), while I/O-bound agents (model calls, APIs) want many streams in flight per
CPU. So each stream is a call on one of a pool of threaded actors:

- ``actors`` worker actors (default: the runtime's CPUs, at most ``max_concurrency``), each
  with ``ceil(max_concurrency / actors)`` threads; the driver sends a stream to the actor with
  the fewest in flight, and keeps :data:`QUEUED` streams more than ``max_concurrency`` in
  flight (when it is above 1) so that no actor idles while the driver takes a result.
  CPU-bound Python agents then run in parallel processes, free of the GIL, and waiting agents
  overlap on threads. The actors reserve no CPU and are spread over the nodes: a pool kept
  warm never holds the CPUs that other work of the runtime waits for.
- The scope's agents are instantiated once per actor and run: set-up in ``__init__`` (a
  model, a client) happens once per actor, not per stream. ``async def`` agents run on an
  event loop of the actor.
- The rest of the context (every field but the streamed one) is put in the object store once
  per run; a stream ships only its remaining rows.

``benchmarks/test_engines.py`` measures this against the local engine and against a bare
``map_batches`` pipeline (``docs/scaling.md`` gives the figures): on 2 cores, 200 streams
waiting 50 ms at ``max_concurrency=16`` ran at 0.87 of the ideal time, and a CPU-bound Python
agent 2.3x faster than on local threads. ``map_batches`` ran vectorised steps 4x faster than
this design, because it runs many batches of a block in one task without returning to the
driver: a streaming scope's state store, hooks, sink and ``stream()`` must see each stream as
it completes, so the driver handles each one (about 1 ms).

Failures. An agent's failure is retried on the worker as locally. A worker that dies (its
process killed, out of memory) is restarted by Ray; the attempt of each stream it was running
fails with :class:`~arrowflow.exceptions.WorkerLostError` and is retried under ``retries=``
like any failed attempt, never waited for. An error that fails a run locally (an agent
returning the wrong type, an agent that cannot be instantiated) fails it the same way.

Runtime. The runtime is, in order: the one this process already joined (``ray.init``), the
cluster at ``address`` or ``RAY_ADDRESS``, else a new local one with this machine's CPUs, whose
workers import modules from the driver's ``sys.path``. What the engine started (the runtime,
or the connection to a cluster, and its actors) is stopped when the run ends, unless
``keep_running=True``: then a notebook's later runs with the same engine reuse the warm
runtime and actors until :meth:`RayEngine.shutdown`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import sys
import threading
import time
import uuid
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from arrowflow._async import EventLoop
from arrowflow._invoke import Callables, Fields, instantiate
from arrowflow._retry import Attempt, Tries, backoff_delay
from arrowflow._stream import (
    Split,
    StreamOutcome,
    StreamPlan,
    merge_done,
    run_agents,
    split_done,
)
from arrowflow.exceptions import ConfigurationError, ExecutionError, WorkerLostError
from arrowflow.state.base import StreamInfo

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from arrowflow._config import StreamingConfig
    from arrowflow.agent import AgentLike

__all__ = ["RayEngine"]

# The declaration's callables run on the driver only: they are not sent to the workers.
_DRIVER_ONLY = (
    "state",
    "skip_if",
    "load_existing",
    "persist_each_stream",
    "on_stream_start",
    "on_stream_complete",
    "on_stream_error",
)
_NO_CALLABLES = Callables(None, None, None, None, None, None)
_NEVER = threading.Event()
_CONTROL = "control"  # the actors' concurrency group for all but streams
#: Streams in flight beyond ``max_concurrency`` (when it is above 1): one waiting at each of two
#: actors, so that an actor starts its next stream while the driver takes the last one's
#: results.
QUEUED = 2
#: Seconds the driver waits for Ray to restart a worker actor whose process died.
RESTART_SECONDS = 60.0


class RayEngine:
    """Run streaming scopes on Ray (module docstring: what runs where, and why).

    Args:
        address: the cluster to join (``"auto"``, ``"host:6379"``, ``"ray://host:10001"``);
            default ``RAY_ADDRESS``, else a new local runtime. A runtime this process has
            already joined is used as it is.
        actors: how many worker actors run streams; default the runtime's CPUs, at most the
            scope's ``max_concurrency``.
        keep_running: keep the runtime and actors this engine started after a run, for the
            next runs with this engine; stop them with :meth:`shutdown`.

    Example:
        >>> import arrowflow as af
        >>> af.RayEngine(actors=2)
        RayEngine(address=None, actors=2, keep_running=False)
    """

    def __init__(
        self, address: str | None = None, *, actors: int | None = None, keep_running: bool = False
    ) -> None:
        if actors is not None and (type(actors) is not int or actors < 1):
            raise ConfigurationError(f"RayEngine(actors={actors!r}): give a whole number >= 1.")
        if importlib.util.find_spec("ray") is None:
            raise ConfigurationError(
                "engine='ray' needs Ray, which is not installed: pip install 'arrowflow[ray]'."
            )
        self.address = address
        self.actors = actors
        self.keep_running = keep_running
        self._started = False  # whether this engine started the runtime (or joined a cluster)
        self._pool: _Pool | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"RayEngine(address={self.address!r}, actors={self.actors!r}, "
            f"keep_running={self.keep_running!r})"
        )

    def shutdown(self) -> None:
        """Stop the actors this engine started, and the runtime if it started it (or leave
        the cluster it joined). Does nothing when there is nothing to stop."""
        with self._lock:
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.kill()
            if self._started:
                self._started = False
                _ray().shutdown()

    def release(self) -> None:
        """End of a run: stop what the engine started unless it keeps running."""
        if not self.keep_running:
            self.shutdown()

    def streams(
        self, plan: StreamPlan, members: Sequence[AgentLike], base: Mapping[str, Any]
    ) -> RayStreams:
        """Start a scope's run: the runtime and actors ready, its agents and context sent."""
        with self._lock:
            self._connect()
            pool = self._pool_for(plan.config.max_concurrency)
        return RayStreams(pool, plan, members, base)

    def _connect(self) -> None:
        ray = _ray()
        if ray.is_initialized():
            return
        options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        address = self.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, **options)
        else:
            # Workers import the agents' modules as the driver does.
            path = os.pathsep.join(entry for entry in sys.path if entry and os.path.isdir(entry))
            env = {"env_vars": {"PYTHONPATH": path}}
            ray.init(num_cpus=os.cpu_count(), runtime_env=env, **options)
        self._started = True

    def _pool_for(self, concurrency: int) -> _Pool:
        cpus = max(int(_ray().cluster_resources().get("CPU", 1)), 1)
        actors = self.actors or min(concurrency, cpus)
        threads = math.ceil(concurrency / actors)
        pool = self._pool
        if pool is not None and pool.shape == (actors, threads) and pool.alive:
            return pool
        if pool is not None:
            pool.kill()
        self._pool = _Pool(actors, threads)
        return self._pool


class _Pool:
    """The worker actors, and how many streams each is running."""

    def __init__(self, actors: int, threads: int) -> None:
        worker = _worker_class()
        self.shape = (actors, threads)
        # No CPU reserved, spread over the nodes: a pool kept warm between runs never holds
        # the CPUs that other work of the runtime (a Ray Data job, say) waits for; the number
        # of actors is what bounds the CPUs the streams use. Streams run ``threads`` at a time;
        # prepare, cancel and forget have threads of their own (:data:`_CONTROL`), so they never
        # wait behind a stream. Restarted by Ray when their process dies (module docstring).
        options = {
            "num_cpus": 0,
            "scheduling_strategy": "SPREAD",
            "max_concurrency": threads,
            "max_restarts": -1,
        }
        self.handles = [worker.options(**options).remote() for _ in range(actors)]
        self.running = [0] * actors
        self.down: set[int] = set()  # actors that lost a stream and are not known back yet
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()

    @property
    def alive(self) -> bool:
        return not self.stopped.is_set()

    def take(self) -> int:
        """The actor with the fewest streams in flight, counted as running one more; one that
        is down only when all are."""
        with self._lock:
            up = [index for index in range(len(self.handles)) if index not in self.down]
            index = min(up or range(len(self.handles)), key=self.running.__getitem__)
            self.running[index] += 1
        return index

    def mark_down(self, index: int) -> None:
        """Actor ``index`` lost a stream: send it none while another is up."""
        with self._lock:
            self.down.add(index)

    def recover(self, index: int) -> None:
        """Wait until actor ``index`` answers again (Ray restarts it), for at most
        :data:`RESTART_SECONDS`; a call sent to it meanwhile would be lost too."""
        ray = _ray()
        deadline = time.monotonic() + RESTART_SECONDS
        while self.alive and time.monotonic() < deadline:
            try:
                ray.get(self.control(index, "pid"), timeout=RESTART_SECONDS)
            except ray.exceptions.RayError:
                continue
            break
        with self._lock:
            self.down.discard(index)

    def give_back(self, index: int) -> None:
        with self._lock:
            self.running[index] -= 1

    def control(self, index: int, method: str, *args: Any) -> Any:
        """Call ``method`` of actor ``index`` on its control threads; its result's reference."""
        call = getattr(self.handles[index], method).options(concurrency_group=_CONTROL)
        return call.remote(*args)

    def each(self, method: str, *args: Any) -> None:
        for index in range(len(self.handles)):
            self.control(index, method, *args)

    def in_background(self, target: Callable[..., None], *args: Any) -> bool:
        """Call ``target`` on a thread of its own, unless the pool is stopped (then ``False``).

        Such a thread may call Ray until :meth:`kill` has joined it: a call after the runtime
        shut down would start a new one from that thread (Ray connects on first use), and a
        connection opened while the old one closes aborts the process.
        """

        def run() -> None:
            try:
                target(*args)
            finally:
                with self._lock:
                    self._threads.discard(thread)

        with self._lock:
            if not self.alive:
                return False
            thread = threading.Thread(target=run, daemon=True)
            self._threads.add(thread)
            thread.start()
        return True

    def kill(self) -> None:
        """Stop the actors, and wait for the background threads, which then end at once."""
        with self._lock:
            self.stopped.set()
            threads = list(self._threads)
        ray = _ray()
        for handle in self.handles:
            ray.kill(handle)  # a call waiting on one fails now
        for thread in threads:
            thread.join(RESTART_SECONDS)


@dataclass(slots=True)
class _Job:
    """A stream sent to the workers, and what the driver keeps of it meanwhile."""

    stream: StreamInfo
    piece: pa.Table
    split: Split | None
    todo: pa.Table
    outcome: StreamOutcome
    future: Future[StreamOutcome]


class RayStreams:
    """One scope run's streams on the pool: :meth:`start` each, :meth:`close` at the end."""

    def __init__(
        self, pool: _Pool, plan: StreamPlan, members: Sequence[AgentLike], base: Mapping[str, Any]
    ) -> None:
        self.pool = pool
        self.plan = plan
        self.id = uuid.uuid4().hex
        config = plan.config.model_copy(update=dict.fromkeys(_DRIVER_ONLY))
        context = {name: value for name, value in base.items() if name != plan.field}
        shipped = (list(members), plan.field, plan.key, config, context)
        # In a list: the workers receive the reference, not its value, and fetch it once each
        # when told to prepare the run; the streams' calls then carry the run's id only.
        self.holder = [_put(shipped, plan, context)]
        for index in range(len(pool.handles)):
            self._prepare(index)

    def start(self, stream: StreamInfo) -> Future[StreamOutcome] | StreamOutcome:
        """Skip and load done rows here, send the rest to a worker; a stream with nothing
        left to run (or whose state store failed) is done at once."""
        plan = self.plan
        piece: pa.Table = stream.context[plan.field]
        outcome = StreamOutcome(stream.num, piece.num_rows)
        split = None
        if plan.store is not None:
            split = plan.retry(outcome.tries, split_done, plan, stream, piece)
            if split is None:
                return outcome
        todo = piece if split is None else split.todo
        job = _Job(stream, piece, split, todo, outcome, Future())
        if not todo.num_rows:
            return self._finish(job, {}, todo)
        # The attempt that split the stream goes on on the worker: it counts once.
        outcome.tries.count = max(outcome.tries.count - 1, 0)
        self._send(job)
        return job.future

    def cancel(self) -> None:
        """The run stops: streams running on the workers stop at their next step."""
        self.pool.each("cancel", self.id)

    def close(self) -> None:
        """Let the workers drop this run's agents and context."""
        if self.pool.alive:
            self.pool.each("forget", self.id)

    def _send(self, job: _Job) -> None:
        index = self.pool.take()
        stream = job.stream
        metadata = stream.context.get("_batch_metadata")
        # One argument: Ray serialises each argument of a call apart, at a cost per argument.
        payload = (
            stream.num, stream.offset, stream.rows, stream.scope_id, metadata,
            to_ipc(job.todo), job.outcome.tries,
        )  # fmt: skip
        call = self.pool.handles[index].run.remote(self.id, payload)
        call.future().add_done_callback(lambda done: self._returned(job, index, done))

    def _prepare(self, index: int) -> None:
        self.pool.control(index, "prepare", self.id, self.holder)

    def _returned(self, job: _Job, index: int, done: Future[Any]) -> None:
        self.pool.give_back(index)
        try:
            written, processed, tries = done.result()
        except BaseException as error:
            self._failed_remotely(job, index, error)
            return
        job.outcome.tries = tries
        if written is None:
            _settle(job.future, job.outcome)
        else:
            _settle(job.future, self._finish(job, written, from_ipc(processed)))

    def _finish(self, job: _Job, written: Fields, processed: pa.Table) -> StreamOutcome:
        """The loaded and processed rows merged, as the local engine merges them."""
        outcome = job.outcome
        attempt = Attempt(_NEVER, None)
        try:
            done = merge_done(attempt, self.plan, job.piece, job.split, written, processed)
        except Exception as error:  # deterministic: running the agents again would not help
            outcome.tries.step, outcome.tries.error = attempt.step, error
            return outcome
        outcome.fields, outcome.processed, outcome.produced, outcome.skipped, outcome.loaded = done
        return outcome

    def _failed_remotely(self, job: _Job, index: int, error: BaseException) -> None:
        """A worker raised what fails the run, or died: then the attempt failed."""
        if isinstance(error, _ray().exceptions.RayTaskError):
            cause = error.cause if isinstance(error.cause, BaseException) else error
            _settle(job.future, None, cause)
            return
        # Waited for on a thread of its own: this callback runs on one of Ray's.
        self.pool.mark_down(index)
        job.outcome.tries.count += 1
        if not self.pool.in_background(self._lost, job, index, error):
            self._give_up(job, error)  # the engine is stopping: nothing will be sent again

    def _lost(self, job: _Job, index: int, error: BaseException) -> None:
        """Once the actor is back, fail the attempt; send the stream again if it may retry."""
        pool, tries, config = self.pool, job.outcome.tries, self.plan.config
        pool.recover(index)
        if not pool.alive:
            self._give_up(job, error)
            return
        self._prepare(index)  # a restarted actor knows no run
        retryable = tries.count <= config.retries and issubclass(WorkerLostError, config.retry_on)
        if not retryable or self.plan.cancelled.is_set():
            self._give_up(job, error)
            return
        # Waits out the backoff unless the engine stops meanwhile.
        stopped = pool.stopped.wait(backoff_delay(config.backoff, tries.count))
        if stopped or self.plan.cancelled.is_set():
            _settle(job.future, None, ExecutionError("the run stopped"))
        else:
            try:
                self._send(job)
            except BaseException as failure:  # the runtime went away: the run ends with it
                _settle(job.future, None, failure)

    def _give_up(self, job: _Job, error: BaseException) -> None:
        """The stream's attempt failed with its worker: a :class:`WorkerLostError`."""
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        lost = f"the Ray worker running the stream was lost ({type(error).__name__}: {first_line})"
        tries = job.outcome.tries
        tries.step, tries.error = "worker", WorkerLostError(lost)
        _settle(job.future, job.outcome)


def to_ipc(table: pa.Table) -> pa.Buffer:
    """``table`` as an Arrow IPC stream: the streams' rows travel so, both ways.

    Ray pickles a table through a path of its own that costs about 1 ms per small table, where
    an IPC stream costs 20 µs to write and read and travels as one buffer, without a copy out
    of the object store; a slice is written alone, not with the buffers it is cut from.
    """
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def from_ipc(buffer: pa.Buffer) -> pa.Table:
    """The table :func:`to_ipc` wrote."""
    return pa.ipc.open_stream(buffer).read_all()


def _settle(
    future: Future[StreamOutcome], outcome: StreamOutcome | None, error: BaseException | None = None
) -> None:
    """Complete ``future``, unless the run gave it up already (cancelled it)."""
    try:
        if error is None:
            assert outcome is not None
            future.set_result(outcome)
        else:
            future.set_exception(error)
    except InvalidStateError:
        pass


def _put(shipped: Any, plan: StreamPlan, context: Mapping[str, Any]) -> Any:
    """``ray.put(shipped)``; a ``ConfigurationError`` naming what cannot be sent to workers."""
    ray = _ray()
    try:
        return ray.put(shipped)
    except Exception as exc:
        error: Exception = exc
    # Ray's message holds the whole value: say instead which part fails, and why.
    where = "the scope's agents"
    for name, value in [*context.items(), ("", shipped[0])]:
        try:
            ray.cloudpickle.dumps(value)
        except Exception as exc:
            where, error = (f"field '{name}'" if name else where), exc
            break
    lines = str(error).strip().splitlines()
    problem = f"{type(error).__name__}: {lines[0] if lines else ''}"
    raise ConfigurationError(
        f"Agent '{plan.agents[0].name}': {where} cannot be sent to Ray workers ({problem}). "
        "Give the workers what they can rebuild (a path, a URL) and open it in the agent, or "
        "run with engine='local'."
    )


def _ray() -> Any:
    import ray  # only by runs that use it

    return ray


_WORKER: Any = None


def _worker_class() -> Any:
    """:class:`_StreamWorker` as a Ray actor class, made on first use."""
    global _WORKER
    if _WORKER is None:
        _WORKER = _ray().remote(concurrency_groups={_CONTROL: 2})(_StreamWorker)
    return _WORKER


class _StreamWorker:
    """A worker actor: runs streams' agents for the runs that send them."""

    def __init__(self) -> None:
        # Per run: set once prepare() has set it up (its plan and context, or why it failed).
        self._ready: dict[str, threading.Event] = {}
        self._runs: dict[str, tuple[StreamPlan, dict[str, Any]] | BaseException] = {}
        self._lock = threading.Lock()

    def pid(self) -> int:
        return os.getpid()

    def run(self, run_id: str, payload: tuple[Any, ...]) -> tuple[Fields | None, Any, Tries]:
        """One stream's agents (:meth:`RayStreams._send` packs the ``payload``)."""
        num, offset, rows, scope_id, metadata, rows_in, tries = payload
        plan, base = self._run_of(run_id)
        todo = from_ipc(rows_in)
        context = {**base, plan.field: todo, "_batch_metadata": metadata}
        stream = StreamInfo(num, offset, rows, scope_id, context)
        done = plan.retry(tries, run_agents, plan, stream, todo, timeout=plan.config.timeout)
        if done is None:
            _make_portable(tries)
            return None, None, tries
        written, processed = done
        written.pop(plan.field, None)  # it is ``processed``, sent apart
        return written, to_ipc(processed), tries

    def prepare(self, run_id: str, holder: list[Any]) -> None:
        """Set a run up: its agents instantiated (once per actor and run), its context."""
        ready = self._event(run_id)
        if ready.is_set():
            return
        try:
            members, field, key, config, base = _ray().get(holder[0])
            agents = [instantiate(member) for member in members]
            found: tuple[StreamPlan, dict[str, Any]] | BaseException = (
                _remote_plan(agents, field, key, config),
                base,
            )
        except BaseException as error:  # raised by each of the run's streams
            found = error
        with self._lock:
            self._runs[run_id] = found
        ready.set()

    def cancel(self, run_id: str) -> None:
        with self._lock:
            found = self._runs.get(run_id)
        if isinstance(found, tuple):
            found[0].cancelled.set()
            found[0].loop.cancel_all()

    def forget(self, run_id: str) -> None:
        with self._lock:
            found = self._runs.pop(run_id, None)
            self._ready.pop(run_id, None)
        if isinstance(found, tuple):
            found[0].loop.close()

    def _event(self, run_id: str) -> threading.Event:
        with self._lock:
            return self._ready.setdefault(run_id, threading.Event())

    def _run_of(self, run_id: str) -> tuple[StreamPlan, dict[str, Any]]:
        # A stream's call may start before the run's prepare() (an actor's calls run on
        # several threads), or on an actor restarted since (the driver prepares it again).
        if not self._event(run_id).wait(RESTART_SECONDS):
            raise ExecutionError(f"this worker was never given run {run_id}")
        found = self._runs[run_id]
        if isinstance(found, BaseException):
            raise found
        return found


def _remote_plan(
    agents: list[Any], field: str, key: str | None, config: StreamingConfig
) -> StreamPlan:
    return StreamPlan(
        agents, field, key, config, _NO_CALLABLES, None, EventLoop(), threading.Event()
    )


def _make_portable(tries: Tries) -> None:
    """Replace an error that cannot be sent back to the driver by one that can."""
    error = tries.error
    try:
        _ray().cloudpickle.dumps(error)
    except Exception:
        tries.error = ExecutionError(f"{type(error).__name__}: {error}")
