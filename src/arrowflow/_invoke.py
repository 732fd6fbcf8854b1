"""Calling agents, hooks and state callables: what they must accept and return.

What a user wrote wrong — an agent without ``call``, a ``call`` returning something other
than a mapping or ``None``, a table field set to a non-table, a hook or state callable that
cannot take its arguments — is a :class:`~arrowflow.ConfigurationError`: never retried, it
fails the run at once with a message that says what to write. Signatures are checked when a
scope's run starts, before any agent runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from arrowflow._async import EventLoop, is_awaitable
from arrowflow._merge import merge_outputs
from arrowflow._slicing import StreamCutter
from arrowflow._tabular import describe, is_tabular, to_table, to_table_or_reader
from arrowflow.agent import Agent, AgentLike, bound_callable
from arrowflow.context import Context
from arrowflow.exceptions import ConfigurationError, ExecutionError

if TYPE_CHECKING:
    import pyarrow as pa

    from arrowflow._config import StreamingConfig
    from arrowflow._retry import Attempt

__all__ = [
    "Callables",
    "Fields",
    "as_table",
    "check_agents",
    "in_stream",
    "instantiate",
    "invoke_agent",
]

Fields = dict[str, Any]

# Each hook and state callable, the parameters it is called with (for messages and checks).
_SIGNATURES = {
    "on_stream_start": ("stream_num", "total", "context"),
    "on_stream_complete": ("stream_num", "total", "results"),
    "on_stream_error": ("stream_num", "total", "error", "context"),
    "skip_if": ("batch", "context"),
    "load_existing": ("skipped", "context"),
    "persist_each_stream": ("results", "context"),
}


def instantiate(agent: AgentLike) -> Agent:
    """An agent instance: classes are instantiated with no arguments, instances kept."""
    return agent() if isinstance(agent, type) else agent


def check_agents(agents: list[Agent]) -> None:
    """Refuse agents that do not define ``call``."""
    for agent in agents:
        if type(agent).call is Agent.call:
            raise ConfigurationError(
                f"Agent '{agent.name}' has no call(): define "
                "def call(self, context): ... returning a mapping of the fields it sets, or None."
            )


def in_stream(context: Mapping[str, Any]) -> str:
    """``", stream 3/10"`` inside a streaming scope, else nothing: for messages."""
    meta = context.get("_batch_metadata")
    if not isinstance(meta, dict):
        return ""
    total = meta.get("total_batches")
    return f", stream {meta.get('batch_number')}" + ("" if total is None else f"/{total}")


def _to_fields(agent: Agent, returned: Any, context: Mapping[str, Any]) -> Fields:
    if returned is None:
        return {}
    if type(returned) is dict:
        return returned
    if isinstance(returned, Mapping):
        return dict(returned)
    meta = context.get("_batch_metadata")
    field = meta.get("array_field") if isinstance(meta, dict) else None
    example = f'{{"{field}": table}}' if field else '{"field": value}'
    raise ConfigurationError(
        f"Agent '{agent.name}'{in_stream(context)}: call() returned {describe(returned)}; return a "
        f"mapping of the fields to set, e.g. return {example}, or None to change nothing."
    )


def invoke_agent(
    agent: Agent,
    context: Mapping[str, Any],
    loop: EventLoop | None = None,
    attempt: Attempt | None = None,
) -> Fields:
    """Run ``agent`` on ``context`` and return the fields it set.

    An ``async def call`` runs on ``loop`` (a loop of its own, closed afterwards, when none is
    given), cancelled at ``attempt``'s deadline. An agent declared ``in_chunks_of(n)`` is
    called once per chunk of ``n`` rows of its tabular field; the chunks' outputs are merged in
    order like streams (tables concatenated, other values collected in a list).
    """
    chunks = type(agent)._chunks
    if chunks is None:
        returned = agent.call(Context(context))
        if type(returned) is dict:  # the usual answer, taken without the checks below
            return returned
        return _to_fields(agent, _resolve(returned, loop, attempt), context)
    field = chunks.over or _only_tabular_field(agent, context)
    if field not in context or not is_tabular(context[field], allow_records=True):
        found = describe(context[field]) if field in context else "nothing"
        raise ExecutionError(
            f"Agent '{agent.name}': in_chunks_of needs a table in field '{field}', found {found}."
        )
    cutter = StreamCutter(to_table_or_reader(context[field]), chunks.size)
    outputs: dict[int, Fields] = {}
    for num, piece in enumerate(cutter, 1):
        chunk = {**context, field: piece}
        fields = _to_fields(agent, _resolve(agent.call(Context(chunk)), loop, attempt), chunk)
        fields = {**fields, field: as_table(agent, fields.get(field, piece), field, f"chunk {num}")}
        outputs[num] = fields
    return merge_outputs({}, field, outputs, cutter.schema, f"Agent '{agent.name}'")


def _resolve(value: Any, loop: EventLoop | None, attempt: Attempt | None) -> Any:
    """``value``, or what it resolves to when it is awaitable."""
    if not is_awaitable(value):
        return value
    deadline = None if attempt is None else attempt.deadline
    track = None if attempt is None else attempt.track
    if loop is not None:
        return loop.run(value, deadline, track)
    own = EventLoop()
    try:
        return own.run(value, deadline, track)
    finally:
        own.close()


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
    """The value an agent wrote to a tabular field, as a table; ``ConfigurationError`` if not."""
    if not is_tabular(value, allow_records=True):
        raise ConfigurationError(
            f"Agent '{agent.name}', {where}: field '{field}' must stay a table, got "
            f'{describe(value)}. Return a pyarrow Table or RecordBatch for it: {{"{field}": '
            "table}."
        )
    return to_table(value)


@dataclass(frozen=True, slots=True)
class Callables:
    """The hooks and state callables of a scope, resolved and checked once per run."""

    on_start: Callable[..., Any] | None
    on_complete: Callable[..., Any] | None
    on_error: Callable[..., Any] | None
    skip_if: Callable[..., Any] | None
    load_existing: Callable[..., Any] | None
    persist: Callable[..., Any] | None

    @classmethod
    def of(cls, trigger: Agent, config: StreamingConfig | None = None) -> Callables:
        """The trigger's callables under ``config`` (by default its class's declaration);
        ``ConfigurationError`` for one that cannot take its arguments."""
        found = []
        for name, parameters in _SIGNATURES.items():
            function = bound_callable(trigger, name, config)
            if function is not None:
                _check_signature(trigger, name, function, parameters)
            found.append(function)
        return cls(*found)


def _check_signature(
    trigger: Agent, name: str, function: Callable[..., Any], parameters: tuple[str, ...]
) -> None:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin or extension callable: nothing to check
        return
    try:
        signature.bind(*parameters)
    except TypeError:
        wanted = ", ".join(parameters)
        raise ConfigurationError(
            f"Agent '{trigger.name}': {name} cannot be called as {name}({wanted}); its "
            f"signature is {getattr(function, '__name__', name)}{signature}. Define it as "
            f"def {name}(self, {wanted}) on the agent, or pass a callable taking ({wanted})."
        ) from None
