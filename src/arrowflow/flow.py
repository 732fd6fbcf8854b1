"""Flows (``A >> B >> C``), pipelines, and running them.

A :class:`Flow` is a flat sequence of agents; ``>>`` never validates, so partial flows compose
freely. Scopes are checked when a :class:`Pipeline` subclass is defined or constructed and when
a run starts, before any agent runs.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from arrowflow.agent import Agent, AgentLike
from arrowflow.exceptions import ConfigurationError
from arrowflow.executor import PipelineBatchExecutor, drain, instantiate, invoke_agent
from arrowflow.io import as_sink
from arrowflow.results import PipelineResult, StreamResult
from arrowflow.scope import BatchingScope, BatchingScopeManager

if TYPE_CHECKING:
    import os

    from arrowflow.io import Sink

__all__ = ["Flow", "FlowStream", "Pipeline"]

ENGINES = ("local",)


@dataclass(frozen=True, slots=True)
class _RunOptions:
    """The reserved keyword options of ``run`` and ``stream``."""

    engine: str
    progress: bool | None
    sink: Sink | None


def _is_agent(step: object) -> bool:
    return isinstance(step, Agent) or (isinstance(step, type) and issubclass(step, Agent))


class Flow:
    """Agents in the order they run; ``(A >> B) >> (C >> D)`` is ``A, B, C, D``.

    Example:
        >>> import arrowflow as af
        >>> class A(af.Agent):
        ...     def call(self, context):
        ...         return {"n": context["n"] + 1}
        >>> class B(A): ...
        >>> flow = A >> B
        >>> [agent.name for agent in flow], flow.run(n=0)["n"]
        (['A', 'B'], 2)
    """

    __slots__ = ("agents",)

    def __init__(self, *steps: AgentLike | Flow) -> None:
        agents: list[AgentLike] = []
        for step in steps:
            if isinstance(step, Flow):
                agents.extend(step.agents)
            elif _is_agent(step):
                agents.append(step)
            else:
                raise TypeError(
                    f"a flow is made of af.Agent classes or instances, got {step!r}; wrap a "
                    "function with @af.agent."
                )
        self.agents: tuple[AgentLike, ...] = tuple(agents)

    def __rshift__(self, other: AgentLike | Flow) -> Flow:
        return Flow(self, other)

    def __rrshift__(self, other: AgentLike | Flow) -> Flow:
        return Flow(other, self)

    def __iter__(self) -> Iterator[AgentLike]:
        return iter(self.agents)

    def __len__(self) -> int:
        return len(self.agents)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Flow) and self.agents == other.agents

    def __hash__(self) -> int:
        return hash(self.agents)

    def __repr__(self) -> str:
        return f"Flow({' >> '.join(agent.name for agent in self.agents)})"

    def scopes(self) -> list[BatchingScope]:
        """The flow's streaming scopes; ``ConfigurationError`` if they nest or do not pair."""
        return BatchingScopeManager().detect_scopes(self)

    def run(
        self,
        context: Mapping[str, Any] | None = None,
        /,
        *,
        engine: str = "local",
        progress: bool | None = None,
        sink: Sink | str | os.PathLike[str] | None = None,
        **fields: Any,
    ) -> PipelineResult:
        """Run the flow on ``context`` and ``fields``; return the final context and stats.

        Args:
            context: initial fields; use it for fields whose names are reserved run options.
            engine: ``"local"`` runs in this process.
            progress: a progress bar per scope; ``None`` shows one only in a notebook or a
                terminal (when tqdm is installed), ``True`` always, ``False`` never.
            sink: where the first scope writes each stream as it completes, in order: a
                Parquet path or an :class:`~arrowflow.ParquetSink`. The scope's field is then
                not kept in memory: after the scope it is a ``RecordBatchReader`` over the sink.
            **fields: more initial fields.
        """
        options = _RunOptions(engine, progress, as_sink(sink))
        return drain(self._execute({**(context or {}), **fields}, options))

    def stream(
        self,
        context: Mapping[str, Any] | None = None,
        /,
        *,
        engine: str = "local",
        progress: bool | None = None,
        sink: Sink | str | os.PathLike[str] | None = None,
        **fields: Any,
    ) -> FlowStream:
        """Iterate the results of the first scope's streams, in order, as they complete.

        Takes the arguments of :meth:`run`. The agents after the scope run when the iterator
        is exhausted; its ``.result`` is then the :class:`PipelineResult`. Stopping early
        (``break``, ``close()``) stops the run: no later agent runs.
        """
        options = _RunOptions(engine, progress, as_sink(sink))
        return FlowStream(self._execute({**(context or {}), **fields}, options))

    def _execute(
        self, context: dict[str, Any], options: _RunOptions
    ) -> Generator[StreamResult, None, PipelineResult]:
        """Check the options and the scopes now, then return the run as a generator."""
        if options.engine not in ENGINES:
            raise ConfigurationError(
                f"Unknown engine {options.engine!r}; available: {', '.join(ENGINES)}."
            )
        agents = [instantiate(agent) for agent in self.agents]
        manager = BatchingScopeManager()
        manager.detect_scopes(agents)
        return self._run(agents, manager, context, options)

    @staticmethod
    def _run(
        agents: list[Agent],
        manager: BatchingScopeManager,
        context: dict[str, Any],
        options: _RunOptions,
    ) -> Generator[StreamResult, None, PipelineResult]:
        scopes = manager.scopes
        starts = {id(scope.trigger_agent): scope for scope in scopes}
        skip = {id(agent) for agent in manager.agents_to_skip()}
        stats: list[dict[str, Any]] = []
        first = True
        for agent in agents:
            scope = starts.get(id(agent))
            if scope is not None:
                executor = PipelineBatchExecutor(scope)
                batches = executor.iter_batches(
                    context, progress=options.progress, sink=options.sink if first else None
                )
                context = (yield from batches) if first else drain(batches)
                first = False
                stats.append(executor.execution_stats)
            elif id(agent) not in skip:
                try:
                    fields = invoke_agent(agent, context)
                except Exception as exc:
                    # Keep the agent's own exception type; say where it came from.
                    exc.add_note(f"raised by agent '{agent.name}'")
                    raise
                context = {**context, **fields}
        return PipelineResult(context, stats)


class FlowStream(Iterator[StreamResult]):
    """The iterator returned by ``stream()``; ``.result`` is set once it is exhausted."""

    def __init__(self, run: Generator[StreamResult, None, PipelineResult]) -> None:
        self._run = run
        self.result: PipelineResult | None = None

    def __iter__(self) -> FlowStream:
        return self

    def __next__(self) -> StreamResult:
        try:
            return next(self._run)
        except StopIteration as stop:
            self.result = stop.value
            raise

    def close(self) -> None:
        """Stop the run: no later stream and no later agent runs."""
        self._run.close()

    def __enter__(self) -> FlowStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Pipeline:
    """A named flow with its initial context.

    Subclasses set ``flow``; the constructor takes the initial context as keyword arguments.
    The flow's scopes are checked when the subclass is defined and when it is constructed.

    Example:
        >>> import arrowflow as af
        >>> class Add(af.Agent):
        ...     def call(self, context):
        ...         return {"total": context["a"] + context["b"]}
        >>> class Sum(af.Pipeline):
        ...     flow = Add
        >>> Sum(a=1, b=2).run()["total"]
        3
    """

    flow: ClassVar[Flow | AgentLike]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "flow" in cls.__dict__:
            cls._flow().scopes()

    @classmethod
    def _flow(cls) -> Flow:
        flow = getattr(cls, "flow", None)
        if flow is None:
            raise ConfigurationError(
                f"Pipeline '{cls.__name__}' has no flow; set flow = AgentA >> AgentB in its body."
            )
        return flow if isinstance(flow, Flow) else Flow(flow)

    def __init__(self, **context: Any) -> None:
        self._flow().scopes()
        self.context: dict[str, Any] = context

    def run(
        self,
        context: Mapping[str, Any] | None = None,
        /,
        *,
        engine: str = "local",
        progress: bool | None = None,
        sink: Sink | str | os.PathLike[str] | None = None,
        **fields: Any,
    ) -> PipelineResult:
        """Like :meth:`Flow.run`, on the constructor's context updated with the arguments."""
        merged = {**self.context, **(context or {}), **fields}
        return self._flow().run(merged, engine=engine, progress=progress, sink=sink)

    def stream(
        self,
        context: Mapping[str, Any] | None = None,
        /,
        *,
        engine: str = "local",
        progress: bool | None = None,
        sink: Sink | str | os.PathLike[str] | None = None,
        **fields: Any,
    ) -> FlowStream:
        """Like :meth:`Flow.stream`, on the constructor's context updated with the arguments."""
        merged = {**self.context, **(context or {}), **fields}
        return self._flow().stream(merged, engine=engine, progress=progress, sink=sink)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._flow()!r})"
