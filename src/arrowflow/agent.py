"""Agents: the steps of a flow, and the declarations that make one stream its input.

An agent is a class with ``call(self, context)`` returning the fields it sets (a mapping) or
``None``. Classes and instances compose with ``>>`` into a :class:`~arrowflow.Flow`.

Declarations are classmethods, each also offered as a decorator in ``arrowflow``:

- :meth:`Agent.intelligent_streaming` starts a streaming scope (seed aliases
  :meth:`Agent.intelligent_batching` and :meth:`Agent.triggers_batching`);
- :meth:`Agent.ends_batching` closes it: this agent and the ones after it see the merged result;
- :meth:`Agent.in_chunks_of` runs one agent's ``call`` once per chunk of its tabular input.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, Unpack, overload

from arrowflow._config import (
    HOOK_ALIASES,
    ChunkConfig,
    StreamingConfig,
    StreamingOptions,
    build,
    option_default,
)
from arrowflow.exceptions import ConfigurationError, ExecutionError

if TYPE_CHECKING:
    from arrowflow.context import Context
    from arrowflow.flow import Flow

__all__ = [
    "Agent",
    "AgentLike",
    "agent",
    "agent_class",
    "ends_batching",
    "in_chunks_of",
    "intelligent_batching",
    "intelligent_streaming",
    "triggers_batching",
]

_A = TypeVar("_A", bound="type[Agent]")
_F = TypeVar("_F", bound=Callable[..., Any])


def _options_in_signature(function: _F) -> _F:
    """Spell out ``**options`` in the signature that ``help()`` and notebooks show.

    Type checkers read the options from ``Unpack[StreamingOptions]``; ``inspect.signature``
    shows them as keyword-only parameters with their defaults. The function itself still
    takes any keyword, so that an unknown option is reported as a ``ConfigurationError``.
    """
    signature = inspect.signature(function)
    *named, _ = signature.parameters.values()
    options = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=option_default(name),
            annotation=getattr(annotation, "__forward_arg__", annotation),
        )
        for name, annotation in StreamingOptions.__annotations__.items()
    ]
    spelled_out = signature.replace(parameters=[*named, *options])
    function.__signature__ = spelled_out  # type: ignore[attr-defined]
    return function


class _AgentMeta(type):
    """Lets agent classes compose with ``>>`` before they are instantiated."""

    def __rshift__(cls, other: AgentLike | Flow) -> Flow:
        from arrowflow.flow import Flow

        return Flow(cls, other)  # type: ignore[arg-type]

    def __rrshift__(cls, other: AgentLike | Flow) -> Flow:
        from arrowflow.flow import Flow

        return Flow(other, cls)  # type: ignore[arg-type]


class Agent(metaclass=_AgentMeta):
    """A step of a flow.

    Subclasses implement :meth:`call`. Hooks (``on_stream_start``, ``on_stream_complete``,
    ``on_stream_error``) and state callables (``skip_if``, ``load_existing``,
    ``persist_each_stream``) may be defined as methods of the streaming agent; options given to
    the declaration win over methods of the same name.

    Example:
        >>> import arrowflow as af
        >>> class Greet(af.Agent):
        ...     def call(self, context):
        ...         return {"greeting": f"hello {context['who']}"}
        >>> Greet().name
        'Greet'
        >>> af.Flow(Greet).run(who="arrow")["greeting"]
        'hello arrow'
    """

    #: The agent's name in messages and statistics: its class name unless set.
    name: ClassVar[str] = "Agent"
    _streaming: ClassVar[StreamingConfig | None] = None
    _ends_batching: ClassVar[bool] = False
    _chunks: ClassVar[ChunkConfig | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__

    def call(self, context: Context) -> Mapping[str, Any] | None:
        """Return the fields this agent sets (merged into the context), or ``None``."""
        raise NotImplementedError(f"Agent '{self.name}' must define call(self, context).")

    def __rshift__(self, other: AgentLike | Flow) -> Flow:
        from arrowflow.flow import Flow

        return Flow(self, other)

    def __rrshift__(self, other: AgentLike | Flow) -> Flow:
        from arrowflow.flow import Flow

        return Flow(other, self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} agent {self.name!r}>"

    # -- declarations ---------------------------------------------------------------------

    @classmethod
    @_options_in_signature
    def intelligent_streaming(
        cls,
        stream_size: int,
        over: str | None = None,
        incremental: bool = False,
        *,
        override: bool = False,
        **options: Unpack[StreamingOptions],
    ) -> type[Agent]:
        """Make this agent start a streaming scope over the tabular field ``over``.

        The field is cut into slices of ``stream_size`` rows; each flows through this agent and
        the ones after it, up to an ``ends_batching`` agent, and the results are merged back in
        order. Hooks and state callables may instead be methods of the agent with the same
        names (or their seed aliases); an option given here wins over a method.

        Args:
            stream_size: rows per stream, an ``int`` > 0.
            over: the field to stream. Default ``None``: the only tabular field of the context
                when this agent runs.
            incremental: ``True`` calls ``on_stream_complete`` after each stream; the default
                ``False`` calls it once at the end with every stream's results.
            override: ``True`` replaces an earlier declaration on this class. Default
                ``False``: a second declaration is an error.
            state: a state store, such as ``af.DuckDBState``, that skips rows already done,
                loads their stored results and persists new ones. Default ``None``.
            key: the key column identifying rows: loaded and processed rows come back in the
                input order of their keys. Default ``None``: the state store's key, if any.
            skip_if: ``skip_if(batch, context)`` returns a boolean mask of the stream's rows
                already done. Default ``None``.
            load_existing: ``load_existing(skipped, context)`` returns the stored results of
                the skipped rows as a table. Default ``None``.
            persist_each_stream: ``persist_each_stream(results, context)`` stores a stream's
                new results. Default ``None``. Seed alias: ``persist_each_batch``.
            on_stream_start: ``on_stream_start(stream_num, total, context)`` runs before each
                stream. Default ``None``. Seed alias: ``on_batch_start``.
            on_stream_complete: ``on_stream_complete(stream_num, total, results)`` runs when
                streams complete (see ``incremental``). Default ``None``. Seed alias:
                ``on_batch_complete``.
            on_stream_error: ``on_stream_error(stream_num, total, error, context)`` runs when
                a stream fails after its retries. Default ``None``. Seed alias:
                ``on_batch_error``.
            max_concurrency: streams run at once, at most, in threads (``async def`` agents on
                an event loop); results stay in stream order. Streams that take under 5 ms
                each, and whose threads mostly take turns on the GIL, run one at a time on the
                run's own thread when that proves faster (see the README). Default ``1``.
            retries: further attempts of a failing stream. Default ``0``.
            retry_on: the exception type, or tuple of types, worth a retry; others fail at
                once. Default ``(Exception,)``.
            backoff: seconds before the first retry, doubled at each attempt, with jitter;
                ``0`` retries at once. Default ``1.0``.
            timeout: seconds allowed per stream attempt; an overrun is a ``TimeoutError``.
                An ``async def`` agent is cancelled at the deadline; a plain one cannot be
                killed, so its thread is abandoned: it stops before its next step and never
                writes to the state store or the sink. Default ``None``: no limit.
            on_error: ``"raise"`` (default) raises ``BatchExecutionError`` once a stream has
                failed; ``"continue"`` records the failure and goes on with the next streams.

        Returns:
            The class, so that the decorator form can return it.

        Raises:
            ConfigurationError: an invalid value or an unknown option, naming the agent.

        Example:
            >>> import arrowflow as af
            >>> class Fit(af.Agent):
            ...     def call(self, context):
            ...         return None
            >>> Fit.intelligent_streaming(100, over="companies", retries=2).is_batching_trigger()
            True
        """
        if "_streaming" in cls.__dict__ and not override:
            raise ConfigurationError(
                f"Agent '{cls.name}': streaming is already configured; pass override=True "
                "to replace the first declaration."
            )
        if cls._ends_batching:
            raise ConfigurationError(
                f"Agent '{cls.name}' cannot both trigger and end batching; put "
                "ends_batching on the agent after the scope."
            )
        cls._streaming = build(
            StreamingConfig,
            cls.name,
            stream_size=stream_size,
            over=over,
            incremental=incremental,
            **options,
        )
        return cls

    @classmethod
    @_options_in_signature
    def intelligent_batching(
        cls,
        batch_size: int,
        over: str | None = None,
        streaming: bool = False,
        *,
        override: bool = False,
        **options: Unpack[StreamingOptions],
    ) -> type[Agent]:
        """Seed name of :meth:`intelligent_streaming` (``streaming`` means ``incremental``)."""
        return cls.intelligent_streaming(batch_size, over, streaming, override=override, **options)

    @classmethod
    @_options_in_signature
    def triggers_batching(
        cls,
        chunk_size: int,
        over: str | None = None,
        *,
        override: bool = False,
        **options: Unpack[StreamingOptions],
    ) -> type[Agent]:
        """Seed name of :meth:`intelligent_streaming` with ``stream_size=chunk_size``."""
        return cls.intelligent_streaming(chunk_size, over, override=override, **options)

    @classmethod
    def ends_batching(cls) -> type[Agent]:
        """Make this agent close the open streaming scope: it sees the merged result."""
        if cls._streaming is not None:
            raise ConfigurationError(
                f"Agent '{cls.name}' cannot both trigger and end batching; put "
                "ends_batching on the agent after the scope."
            )
        cls._ends_batching = True
        return cls

    @classmethod
    def in_chunks_of(cls, n: int, over: str | None = None) -> type[Agent]:
        """Run this agent's ``call`` once per chunk of ``n`` rows of its tabular input.

        ``over`` names the field (default: the only tabular field of the context). The
        outputs of the chunks are merged in order, like streams. On a streaming agent, each of
        its streams is chunked.
        """
        cls._chunks = build(ChunkConfig, cls.name, size=n, over=over)
        return cls

    @classmethod
    def batching_config(cls) -> dict[str, Any] | None:
        """The seed's view of the declarations, or ``None`` for a plain agent.

        ``{"triggers": {"chunk_size", "field", "hooks": {...}} or None, "ends": bool}``; only
        hooks that are registered (as option or method) appear, under ``on_start``,
        ``on_complete`` and ``on_error``.
        """
        config = cls._streaming
        if config is None and not cls._ends_batching:
            return None
        triggers: dict[str, Any] | None = None
        if config is not None:
            hooks = {}
            for short, full in (
                ("on_start", "on_stream_start"),
                ("on_complete", "on_stream_complete"),
                ("on_error", "on_stream_error"),
            ):
                hook = getattr(config, full) or _method(cls, full)
                if hook is not None:
                    hooks[short] = hook
            triggers = {"chunk_size": config.stream_size, "field": config.over, "hooks": hooks}
        return {"triggers": triggers, "ends": cls._ends_batching}

    @classmethod
    def is_batching_trigger(cls) -> bool:
        """Whether this agent starts a streaming scope."""
        return cls._streaming is not None

    @classmethod
    def is_batching_terminator(cls) -> bool:
        """Whether this agent ends a streaming scope."""
        return cls._ends_batching


AgentLike = Agent | type[Agent]


def _method(owner: type[Agent] | Agent, name: str) -> Callable[..., Any] | None:
    """The method defining hook or state callable ``name`` (or a seed alias) on ``owner``."""
    aliases = (alias for alias, full in HOOK_ALIASES.items() if full == name)
    for candidate in (name, *aliases):
        found = getattr(owner, candidate, None)
        if callable(found):
            return found  # type: ignore[no-any-return]
    return None


def bound_callable(
    agent: Agent, name: str, config: StreamingConfig | None = None
) -> Callable[..., Any] | None:
    """The hook or state callable ``name`` of a streaming agent.

    An option of the declaration (``config``, by default the class's own) wins, then the
    ``state=`` store's method, then a method of the agent (under its name or its seed alias).
    """
    if config is None:
        config = type(agent)._streaming
    if config is not None:
        option = getattr(config, name)
        if option is not None:
            return option  # type: ignore[no-any-return]
        store_method = getattr(config.state, name, None)
        if callable(store_method):
            return store_method  # type: ignore[no-any-return]
    return _method(agent, name)


def agent_class(agent: AgentLike) -> type[Agent]:
    """The class of an agent given as a class or an instance."""
    return agent if isinstance(agent, type) else type(agent)


def _check_agent_class(target: Any, decorator: str) -> type[Agent]:
    if not (isinstance(target, type) and issubclass(target, Agent)):
        raise ConfigurationError(
            f"@af.{decorator} decorates an af.Agent subclass, got {target!r}; subclass "
            "af.Agent or wrap a function with @af.agent first."
        )
    return target


# -- decorators --------------------------------------------------------------------------


@_options_in_signature
def intelligent_streaming(
    stream_size: int,
    over: str | None = None,
    incremental: bool = False,
    *,
    override: bool = False,
    **options: Unpack[StreamingOptions],
) -> Callable[[_A], _A]:
    """Decorator form of :meth:`Agent.intelligent_streaming`, which documents the arguments.

    Example:
        >>> import arrowflow as af
        >>> @af.intelligent_streaming(stream_size=2, over="rows")
        ... class Double(af.Agent):
        ...     def call(self, context):
        ...         rows = context["rows"]
        ...         return {"rows": rows.append_column("y", [[2] * rows.num_rows])}
        >>> Double.batching_config()["triggers"]["chunk_size"]
        2
    """

    def decorate(cls: _A) -> _A:
        _check_agent_class(cls, "intelligent_streaming").intelligent_streaming(
            stream_size, over, incremental, override=override, **options
        )
        return cls

    return decorate


@_options_in_signature
def intelligent_batching(
    batch_size: int,
    over: str | None = None,
    streaming: bool = False,
    *,
    override: bool = False,
    **options: Unpack[StreamingOptions],
) -> Callable[[_A], _A]:
    """Decorator form of :meth:`Agent.intelligent_batching`."""
    return intelligent_streaming(batch_size, over, streaming, override=override, **options)


@_options_in_signature
def triggers_batching(
    chunk_size: int,
    over: str | None = None,
    *,
    override: bool = False,
    **options: Unpack[StreamingOptions],
) -> Callable[[_A], _A]:
    """Decorator form of :meth:`Agent.triggers_batching`."""
    return intelligent_streaming(chunk_size, over, override=override, **options)


@overload
def ends_batching(cls: _A, /) -> _A: ...
@overload
def ends_batching() -> Callable[[_A], _A]: ...
def ends_batching(cls: _A | None = None, /) -> _A | Callable[[_A], _A]:
    """Decorator form of :meth:`Agent.ends_batching`; ``@af.ends_batching`` or with ``()``."""

    def decorate(target: _A) -> _A:
        _check_agent_class(target, "ends_batching").ends_batching()
        return target

    return decorate if cls is None else decorate(cls)


def in_chunks_of(n: int, over: str | None = None) -> Callable[[_A], _A]:
    """Decorator form of :meth:`Agent.in_chunks_of`."""

    def decorate(cls: _A) -> _A:
        _check_agent_class(cls, "in_chunks_of").in_chunks_of(n, over)
        return cls

    return decorate


# -- functional agents -------------------------------------------------------------------


class _FunctionAgent(Agent):
    """An agent whose ``call`` reads a function's parameters from the context by name."""

    _function: ClassVar[Callable[..., Any]]
    _writes: ClassVar[str | tuple[str, ...] | None]

    def call(self, context: Context) -> Mapping[str, Any] | None:
        function = type(self)._function
        arguments: dict[str, Any] = {}
        for parameter in inspect.signature(function).parameters.values():
            if parameter.name == "context":
                arguments["context"] = context
            elif parameter.name in context:
                arguments[parameter.name] = context[parameter.name]
            elif parameter.default is inspect.Parameter.empty:
                raise ExecutionError(
                    f"Agent '{self.name}': parameter '{parameter.name}' is not a field of the "
                    f"context (fields: {', '.join(context) or 'none'}). Set it before this "
                    "agent or give the parameter a default."
                )
        return self._to_fields(function(**arguments))

    def _to_fields(self, value: Any) -> Mapping[str, Any] | None:
        writes = type(self)._writes
        if value is None or (writes is None and isinstance(value, Mapping)):
            return value
        if isinstance(writes, str):
            return {writes: value}
        if isinstance(writes, tuple) and isinstance(value, tuple) and len(value) == len(writes):
            return dict(zip(writes, value, strict=True))
        raise ConfigurationError(
            f"Agent '{self.name}' returned {type(value).__name__}: return a mapping of fields, "
            "or declare the fields it writes with @af.agent(writes='field') (a tuple of names "
            "for a returned tuple)."
        )


@overload
def agent(function: Callable[..., Any], /) -> type[Agent]: ...
@overload
def agent(
    *, writes: str | tuple[str, ...] | None = None, name: str | None = None
) -> Callable[[Callable[..., Any]], type[Agent]]: ...
def agent(
    function: Callable[..., Any] | None = None,
    /,
    *,
    writes: str | tuple[str, ...] | None = None,
    name: str | None = None,
) -> type[Agent] | Callable[[Callable[..., Any]], type[Agent]]:
    """Turn a plain function into an agent class.

    The function's parameters are read from the context by name (a parameter named
    ``context`` receives the whole read-only context; parameters with defaults are optional).
    It returns a mapping of fields, ``None``, or a value stored in ``writes`` (a tuple of
    names unpacks a returned tuple). The result is an :class:`Agent` subclass named after the
    function, so it composes with ``>>`` and takes the streaming decorators.

    Example:
        >>> import pyarrow as pa, pyarrow.compute as pc
        >>> import arrowflow as af
        >>> @af.agent(writes="rows")
        ... def big(rows):
        ...     return rows.filter(pc.field("n") > 1)
        >>> af.Flow(big).run(rows=pa.table({"n": [1, 2, 3]}))["rows"].num_rows
        2
    """

    def wrap(target: Callable[..., Any]) -> type[Agent]:
        namespace = {
            "name": name or target.__name__,
            "_function": staticmethod(target),
            "_writes": writes,
            "__doc__": target.__doc__,
            "__module__": target.__module__,
            "__qualname__": target.__qualname__,
        }
        return type(target.__name__, (_FunctionAgent,), namespace)

    return wrap if function is None else wrap(function)
