"""Flows (``A >> B >> C``), pipelines, and running them.

A :class:`Flow` is a flat sequence of agents; ``>>`` never validates, so partial flows compose
freely. Scopes are checked when a :class:`Pipeline` subclass is defined or constructed and when
a run starts, before any agent runs.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping
from typing import Any, ClassVar

from arrowflow.agent import Agent, AgentLike
from arrowflow.exceptions import ConfigurationError
from arrowflow.executor import PipelineBatchExecutor, drain, instantiate, invoke_agent
from arrowflow.results import PipelineResult, StreamResult
from arrowflow.scope import BatchingScope, BatchingScopeManager

__all__ = ["Flow", "FlowStream", "Pipeline"]

ENGINES = ("local",)


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
        self, context: Mapping[str, Any] | None = None, /, *, engine: str = "local", **fields: Any
    ) -> PipelineResult:
        """Run the flow on ``context`` and ``fields``; return the final context and stats.

        Fields whose names are reserved run options (``engine``) go in the positional mapping.
        """
        return drain(self._execute({**(context or {}), **fields}, engine=engine))

    def stream(
        self, context: Mapping[str, Any] | None = None, /, *, engine: str = "local", **fields: Any
    ) -> FlowStream:
        """Iterate the results of the first scope's streams, in order, as they complete.

        The agents after the scope run when the iterator is exhausted; its ``.result`` is then
        the :class:`PipelineResult`. Stopping early (``break``, ``close()``) stops the run.
        """
        return FlowStream(self._execute({**(context or {}), **fields}, engine=engine))

    def _execute(
        self, context: dict[str, Any], *, engine: str
    ) -> Generator[StreamResult, None, PipelineResult]:
        """Check the options and the scopes now, then return the run as a generator."""
        if engine not in ENGINES:
            raise ConfigurationError(f"Unknown engine {engine!r}; available: {', '.join(ENGINES)}.")
        agents = [instantiate(agent) for agent in self.agents]
        manager = BatchingScopeManager()
        manager.detect_scopes(agents)
        return self._run(agents, manager, context)

    @staticmethod
    def _run(
        agents: list[Agent], manager: BatchingScopeManager, context: dict[str, Any]
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
                batches = executor.iter_batches(context)
                context = (yield from batches) if first else drain(batches)
                first = False
                stats.append(executor.execution_stats)
            elif id(agent) not in skip:
                context = {**context, **invoke_agent(agent, context)}
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
        self, context: Mapping[str, Any] | None = None, /, *, engine: str = "local", **fields: Any
    ) -> PipelineResult:
        """Run the flow on the constructor's context updated with ``context`` and ``fields``."""
        return self._flow().run({**self.context, **(context or {}), **fields}, engine=engine)

    def stream(
        self, context: Mapping[str, Any] | None = None, /, *, engine: str = "local", **fields: Any
    ) -> FlowStream:
        """Like :meth:`Flow.stream`, on the constructor's context."""
        return self._flow().stream({**self.context, **(context or {}), **fields}, engine=engine)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._flow()!r})"
