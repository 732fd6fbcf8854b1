"""Flows (``A >> B >> C``), pipelines, and running them.

A :class:`Flow` is a flat sequence of agents; ``>>`` never validates, so partial flows compose
freely. Scopes are checked when a :class:`Pipeline` subclass is defined or constructed and when
a run starts, before any agent runs.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Concatenate, ParamSpec, TypeVar

from arrowflow._config import STREAMING_KEYWORDS, StreamingConfig, build, is_misspelling
from arrowflow._invoke import check_agents, instantiate, invoke_agent
from arrowflow._retry import is_interrupt
from arrowflow._store import check_shared_tables
from arrowflow.agent import Agent, AgentLike
from arrowflow.display import flow_html, flow_text
from arrowflow.engines import ENGINES, RayEngine, engine_for
from arrowflow.exceptions import ConfigurationError
from arrowflow.executor import PipelineBatchExecutor, drain
from arrowflow.io import as_sink
from arrowflow.results import PipelineResult, StreamResult
from arrowflow.scope import BatchingScope, BatchingScopeManager

if TYPE_CHECKING:
    import os
    from types import TracebackType

    from arrowflow.io import Sink
    from arrowflow.state.base import StateStore

__all__ = ["ENGINES", "Flow", "FlowStream", "Pipeline"]

_P = ParamSpec("_P")
_S = TypeVar("_S")
_R = TypeVar("_R")


@dataclasses.dataclass(frozen=True, slots=True)
class _Run:
    """A run's initial context and its options, as :func:`_run_arguments` parsed them."""

    context: dict[str, Any]
    engine: str | RayEngine
    progress: bool | None
    sink: Sink | None


def _run_arguments(
    context: Mapping[str, Any] | None = None,
    /,
    *,
    engine: str | RayEngine = "local",
    progress: bool | None = None,
    sink: Sink | str | os.PathLike[str] | None = None,
    **fields: Any,
) -> _Run:
    """The arguments of ``run`` and ``stream``, on flows and pipelines, defined once.

    Its keyword-only parameters are the run options: a new option is added here (and to
    :class:`_Run`), and :meth:`Flow.run` documents it.
    """
    return _Run({**(context or {}), **fields}, engine, progress, as_sink(sink))


#: The run options, in the order of the signature of ``run``.
RUN_OPTIONS = tuple(
    name
    for name, parameter in inspect.signature(_run_arguments).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
)


def _check_field_names(names: Iterable[str], call: str, *, takes_run_options: bool) -> None:
    """Refuse keywords that look like options rather than fields; see :meth:`Flow.run`.

    ``call`` names the callable in the message; ``takes_run_options`` is false for a
    pipeline's constructor, where a run option's own name is a mistake too.
    """
    problems: dict[str, str] = {}
    for name in names:
        if name in RUN_OPTIONS:
            if not takes_run_options:
                problems[name] = f"'{name}' is an option of run() and stream(): pass it there"
        elif name in STREAMING_KEYWORDS:
            problems[name] = (
                f"'{name}' is an option of intelligent_streaming: declare it on the streaming "
                f"agent, @af.intelligent_streaming(..., {name}=...)"
            )
        else:
            meant = [option for option in RUN_OPTIONS if is_misspelling(name, option)]
            if meant:
                problems[name] = f"'{name}' looks like a misspelling of the run option '{meant[0]}'"
    if problems:
        fields = ", ".join(f"'{name}': ..." for name in problems)
        raise ConfigurationError(
            f"{call}(): {'; '.join(problems.values())}. A context field with such a name goes "
            f"in the mapping: {call}({{{fields}}})."
        )


def _takes_run_arguments(
    parse: Callable[_P, _Run],
) -> Callable[[Callable[[_S, _Run], _R]], Callable[Concatenate[_S, _P], _R]]:
    """Give a method of a parsed :class:`_Run` the public signature of ``parse``.

    Type checkers, ``help()`` and ``inspect.signature`` see ``parse``'s parameters, so the four
    methods share one definition of the run options. Keywords are checked before parsing,
    hence before any agent runs.
    """

    def decorate(method: Callable[[_S, _Run], _R]) -> Callable[Concatenate[_S, _P], _R]:
        @functools.wraps(method)
        def wrapper(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            _check_field_names(kwargs, method.__name__, takes_run_options=True)
            return method(self, parse(*args, **kwargs))

        this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        parameters = [this, *inspect.signature(parse).parameters.values()]
        signature = inspect.signature(method).replace(parameters=parameters)
        wrapper.__signature__ = signature  # type: ignore[attr-defined]
        return wrapper

    return decorate


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

    __slots__ = ("agents", "options")

    def __init__(self, *steps: AgentLike | Flow) -> None:
        agents: list[AgentLike] = []
        options: dict[str, Mapping[str, Any]] = {}
        for step in steps:
            if isinstance(step, Flow):
                agents.extend(step.agents)
                options.update(step.options)
            elif _is_agent(step):
                agents.append(step)
            else:
                raise TypeError(
                    f"a flow is made of af.Agent classes or instances, got {step!r}; wrap a "
                    "function with @af.agent."
                )
        self.agents: tuple[AgentLike, ...] = tuple(agents)
        #: Per trigger name, the options its scope runs with instead of the declared ones
        #: (:meth:`with_options`).
        self.options: Mapping[str, Mapping[str, Any]] = MappingProxyType(options)

    def __rshift__(self, other: AgentLike | Flow) -> Flow:
        return Flow(self, other)

    def __rrshift__(self, other: AgentLike | Flow) -> Flow:
        return Flow(other, self)

    def __iter__(self) -> Iterator[AgentLike]:
        return iter(self.agents)

    def __len__(self) -> int:
        return len(self.agents)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Flow)
            and self.agents == other.agents
            and self.options == other.options
        )

    def __hash__(self) -> int:
        return hash(self.agents)

    def __repr__(self) -> str:
        return flow_text(self)

    def _repr_html_(self) -> str:
        return flow_html(self)

    def scopes(self) -> list[BatchingScope]:
        """The flow's streaming scopes; ``ConfigurationError`` if they nest or do not pair."""
        return BatchingScopeManager().detect_scopes(self)

    def with_options(
        self,
        *,
        stream_size: int | None = None,
        max_concurrency: int | None = None,
        state: StateStore | None = None,
        engine: str | RayEngine | None = None,
        scope: str | None = None,
    ) -> Flow:
        """This flow, with one scope run at another stream size, concurrency, state store or
        engine.

        The scope is the first one, or the one whose trigger agent is named ``scope``. The
        options given replace the trigger's declared ones for this flow only; ``None`` keeps
        the declared value, and everything else of the declaration (hooks, retries, ``over``,
        ``key`` …) is kept. An ``engine`` (``"local"``, ``"ray"`` or an
        :class:`~arrowflow.RayEngine`) is the one the scope runs on, whatever the run's
        ``engine=``. The agents' classes are not touched, so the same agents keep
        their declaration in other flows. A state store fingerprints what a scope computes
        (its agents, field, key and input schema), not how it is cut: a run resumed with
        another ``stream_size`` or ``max_concurrency`` skips the rows already done.

        ``ConfigurationError`` (before anything runs) for a flow without a scope, an unknown
        or ambiguous ``scope``, or an invalid value.

        Example:
            >>> import pyarrow as pa
            >>> import arrowflow as af
            >>> @af.intelligent_streaming(stream_size=100, over="rows")
            ... class Tag(af.Agent):
            ...     def call(self, context):
            ...         return None
            >>> faster = af.Flow(Tag).with_options(stream_size=2)
            >>> faster.run(rows=pa.table({"n": range(5)})).stats[0]["total_batches"]
            3
            >>> Tag.batching_config()["triggers"]["chunk_size"]  # the class is unchanged
            100
        """
        scopes = self.scopes()
        if not scopes:
            raise ConfigurationError(
                f"{self!r}.with_options(): the flow has no streaming scope; declare "
                "@af.intelligent_streaming on one of its agents."
            )
        names = [found.trigger_name for found in scopes]
        name = names[0] if scope is None else scope
        if names.count(name) != 1:
            problem = "is in no scope" if name not in names else "triggers two scopes"
            raise ConfigurationError(
                f"{self!r}.with_options(scope={scope!r}): agent '{name}' {problem}; the "
                f"scopes are triggered by {', '.join(map(repr, names))}."
            )
        given = {"stream_size": stream_size, "max_concurrency": max_concurrency, "state": state}
        changed: dict[str, Any] = {
            option: value for option, value in given.items() if value is not None
        }
        chosen = scopes[names.index(name)]
        declared = chosen.streaming_config()
        assert declared is not None  # a scope's trigger declares streaming
        # Validated as a whole declaration, so a bad value is refused as in the decorator.
        build(StreamingConfig, name, **{**dict(declared), **changed})
        if engine is not None:
            engine_for(engine)
            changed["engine"] = engine
        flow = Flow(self)
        flow.options = MappingProxyType({**self.options, name: {**chosen.options, **changed}})
        return flow

    @_takes_run_arguments(_run_arguments)
    def run(self, run: _Run) -> PipelineResult:
        """Run the flow on ``context`` and ``fields``; return the final context and stats.

        Keywords other than the run options are context fields, except two mistakes, caught
        before any agent runs (``ConfigurationError``): a keyword one slip away from a run
        option (a letter added, dropped or replaced, two neighbouring letters swapped, or a
        change of case; the first letter matching), such as ``progres=``, and a keyword naming
        an option of ``intelligent_streaming``, such as ``max_concurrency=``. Fields with such
        names, or with a run option's name, go in the mapping: ``run({"progres": ...})``.

        Args:
            context: initial fields, never checked as options.
            engine: ``"local"`` runs in this process; ``"ray"`` runs the scopes' agents on a
                Ray runtime (:class:`~arrowflow.RayEngine`, which an ``af.RayEngine(...)``
                given here configures); agents outside scopes run here either way.
            progress: a progress bar per scope; ``None`` shows one only in a notebook or a
                terminal (when tqdm is installed), ``True`` always, ``False`` never.
            sink: where the first scope writes each stream as it completes, in order: a
                Parquet path or an :class:`~arrowflow.ParquetSink`. The scope's field is then
                not kept in memory: after the scope it is a ``RecordBatchReader`` over the sink.
            **fields: more initial fields.

        Example:
            >>> import arrowflow as af
            >>> class Echo(af.Agent):
            ...     def call(self, context):
            ...         return None
            >>> af.Flow(Echo).run(progres=True)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            arrowflow.exceptions.ConfigurationError: run(): 'progres' looks like a misspelling ...
            >>> af.Flow(Echo).run({"progres": True})["progres"]
            True
        """
        return drain(self._execute(run))

    @_takes_run_arguments(_run_arguments)
    def stream(self, run: _Run) -> FlowStream:
        """Iterate the results of the first scope's streams, in order, as they complete.

        Takes the arguments of :meth:`run`. The agents after the scope run when the iterator
        is exhausted; its ``.result`` is then the :class:`PipelineResult`. Stopping early
        (``break``, ``close()``) stops the run: no later agent runs.
        """
        return FlowStream(self._execute(run))

    def _execute(self, run: _Run) -> Generator[StreamResult, None, PipelineResult]:
        """Check the options and the scopes now, then return the run as a generator."""
        engine = engine_for(run.engine)
        agents = [instantiate(agent) for agent in self.agents]
        check_agents(agents)
        manager = BatchingScopeManager()
        manager.detect_scopes(agents, self.options)
        check_shared_tables((scope.trigger_name, _state_of(scope)) for scope in manager.scopes)
        engines = {id(scope): engine_for(scope.engine) for scope in manager.scopes if scope.engine}
        # On an engine, a scope runs from its members as the flow gives them: an agent given
        # as a class is instantiated by each worker, so its set-up happens there, once.
        given = BatchingScopeManager().detect_scopes(self.agents, self.options)
        members = dict(zip(map(id, manager.scopes), given, strict=True))
        return self._run(agents, manager, run, engine, engines, members)

    @staticmethod
    def _run(
        agents: list[Agent],
        manager: BatchingScopeManager,
        run: _Run,
        engine: RayEngine | None,
        engines: dict[int, RayEngine | None],
        members: dict[int, BatchingScope],
    ) -> Generator[StreamResult, None, PipelineResult]:
        """The agents in order, each scope on its engine; the engines are released at the
        end, whatever happened."""
        context = run.context
        scopes = manager.scopes
        starts = {id(scope.trigger_agent): scope for scope in scopes}
        skip = {id(agent) for agent in manager.agents_to_skip()}
        stats: list[dict[str, Any]] = []
        scope_names: list[str] = []
        first = True
        try:
            for agent in agents:
                scope = starts.get(id(agent))
                if scope is not None:
                    on = engines.get(id(scope), engine)
                    executor = PipelineBatchExecutor(scope if on is None else members[id(scope)])
                    batches = executor.iter_batches(
                        context, progress=run.progress, sink=run.sink if first else None, engine=on
                    )
                    context = (yield from batches) if first else drain(batches)
                    first = False
                    stats.append(executor.execution_stats)
                    scope_names.append(scope.trigger_name)
                elif id(agent) not in skip:
                    try:
                        fields = invoke_agent(agent, context)
                    except Exception as exc:
                        # Keep the agent's own exception type; say where it came from.
                        exc.add_note(f"raised by agent '{agent.name}'")
                        raise
                    context = {**context, **fields}
        finally:
            for used in {
                id(found): found for found in [engine, *engines.values()] if found
            }.values():
                used.release()
        return PipelineResult(context, stats, scope_names)


class FlowStream(Iterator[StreamResult]):
    """The iterator returned by ``stream()``; ``.result`` is set once it is exhausted.

    As a context manager it stops the run when the block ends; a Ctrl-C in the block stops it
    as an interrupt (the completed streams are kept, the run is recorded as ``interrupted``).
    """

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

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is None or not is_interrupt(error):
            self.close()
            return
        try:
            self._run.throw(error)
        except BaseException as raised:
            if raised is not error:
                raise


class _PipelineWithOptions:
    """``Pipeline.with_options``: :meth:`Flow.with_options` on the pipeline's flow.

    On the class it returns a subclass (same name) whose flow has the options; on an instance,
    an instance of that subclass with the same context. Neither the pipeline nor its agents
    are changed.

    Example:
        >>> import pyarrow as pa
        >>> import arrowflow as af
        >>> @af.intelligent_streaming(stream_size=100, over="rows")
        ... class Tag(af.Agent):
        ...     def call(self, context):
        ...         return None
        >>> class Tagging(af.Pipeline):
        ...     flow = Tag
        >>> small = Tagging(rows=pa.table({"n": range(5)})).with_options(stream_size=2)
        >>> small.run().stats[0]["total_batches"], Tagging.with_options(stream_size=4).__name__
        (3, 'Tagging')
    """

    def __get__(self, instance: Pipeline | None, owner: type[Pipeline]) -> Callable[..., Any]:
        def with_options(
            *,
            stream_size: int | None = None,
            max_concurrency: int | None = None,
            state: StateStore | None = None,
            engine: str | RayEngine | None = None,
            scope: str | None = None,
        ) -> Any:
            flow = owner._flow().with_options(
                stream_size=stream_size,
                max_concurrency=max_concurrency,
                state=state,
                engine=engine,
                scope=scope,
            )
            namespace = {"flow": flow, "__module__": owner.__module__, "__doc__": owner.__doc__}
            derived = type(owner.__name__, (owner,), namespace)
            derived.__qualname__ = owner.__qualname__
            return derived if instance is None else derived(instance.context)

        with_options.__doc__ = type(self).__doc__
        return with_options


class Pipeline:
    """A named flow with its initial context.

    Subclasses set ``flow``; the constructor takes the initial context, as a mapping and as
    keyword arguments. The keywords are checked like those of :meth:`Flow.run`, and a run
    option's own name is refused too (``Sum(progress=True)``: pass it to ``run()``); a field
    with such a name goes in the mapping, ``Sum({"progress": ...})``. The flow's scopes are
    checked when the subclass is defined and when it is constructed.

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

    def __init__(self, context: Mapping[str, Any] | None = None, /, **fields: Any) -> None:
        _check_field_names(fields, type(self).__name__, takes_run_options=False)
        self._flow().scopes()
        self.context: dict[str, Any] = {**(context or {}), **fields}

    @_takes_run_arguments(_run_arguments)
    def run(self, run: _Run) -> PipelineResult:
        """Like :meth:`Flow.run`, on the constructor's context updated with the arguments."""
        return drain(self._flow()._execute(self._updated(run)))

    @_takes_run_arguments(_run_arguments)
    def stream(self, run: _Run) -> FlowStream:
        """Like :meth:`Flow.stream`, on the constructor's context updated with the arguments."""
        return FlowStream(self._flow()._execute(self._updated(run)))

    def _updated(self, run: _Run) -> _Run:
        return dataclasses.replace(run, context={**self.context, **run.context})

    with_options = _PipelineWithOptions()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._flow()!r})"

    def _repr_html_(self) -> str:
        return flow_html(self._flow(), title=type(self).__name__, context=self.context)


def _state_of(scope: BatchingScope) -> Any:
    """The ``state=`` store a scope runs with, if any."""
    config = scope.streaming_config()
    return None if config is None else config.state
