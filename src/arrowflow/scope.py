"""Streaming scopes: which agents run once per stream, and over which field.

A scope starts at a trigger agent (one declaring ``intelligent_streaming``) and holds it and
the agents after it, up to (not including) the first ``ends_batching`` agent, or to the end of
the flow. Scopes do not nest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from arrowflow._tabular import describe, is_tabular, to_table, to_table_or_reader
from arrowflow.agent import Agent, AgentLike, agent_class
from arrowflow.exceptions import ConfigurationError, ExecutionError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from arrowflow._config import StreamingConfig
    from arrowflow.flow import Flow

__all__ = ["BatchingScope", "BatchingScopeManager", "same_agent"]


def _is_agent(value: object) -> bool:
    return isinstance(value, Agent) or (isinstance(value, type) and issubclass(value, Agent))


def same_agent(a: AgentLike, b: AgentLike) -> bool:
    """Whether two agents given as classes or instances are the same step.

    Two instances match by identity, two classes too; a class matches its direct instances.
    """
    if isinstance(a, type) == isinstance(b, type):
        return a is b
    return agent_class(a) is agent_class(b)


class BatchingScope:
    """The agents that run once per stream, from a trigger to its terminator.

    Built without validating (``is_valid()`` says whether it can run), so that tools can
    describe partial flows; a scope without a trigger agent (``BatchingScope(None)``) is not
    valid, and running it is a ``ConfigurationError``.

    Args:
        trigger_agent: the agent starting the scope.
        ending_agent: the ``ends_batching`` agent closing it, if any (not part of the scope).
        chunk_size: the stream size; wins over the trigger's ``stream_size`` when given.
        array_field: the streamed field; wins over the trigger's ``over`` when given.
        options: options of ``intelligent_streaming`` replacing the trigger's declared ones
            for this scope only, and its ``engine`` (what ``Flow.with_options`` sets, already
            validated); the agent's class is left as declared.
    """

    def __init__(
        self,
        trigger_agent: AgentLike | None,
        ending_agent: AgentLike | None = None,
        chunk_size: int | None = None,
        array_field: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.trigger_agent = trigger_agent
        self.ending_agent = ending_agent
        self._chunk_size = chunk_size
        self._array_field = array_field
        self.options: Mapping[str, Any] = options or {}
        self.agents: list[AgentLike] = [] if trigger_agent is None else [trigger_agent]

    @property
    def trigger_name(self) -> str:
        """The trigger agent's name, used in every message about this scope."""
        return "None" if self.trigger_agent is None else self.trigger_agent.name

    def streaming_config(self) -> StreamingConfig | None:
        """The trigger's declaration with this scope's ``options`` laid over it."""
        trigger = self.trigger_agent
        if not _is_agent(trigger):
            return None
        config: StreamingConfig | None = agent_class(trigger)._streaming  # type: ignore[arg-type]
        update = {name: value for name, value in self.options.items() if name != "engine"}
        if config is None or not update:
            return config
        return config.model_copy(update=update)

    @property
    def engine(self) -> Any:
        """The engine this scope runs on whatever the run's (``Flow.with_options(engine=)``),
        if one was given."""
        return self.options.get("engine")

    @property
    def chunk_size(self) -> int | None:
        """Rows per stream: the constructor's value, else the trigger's ``stream_size``."""
        if self._chunk_size is not None:
            return self._chunk_size
        config = self.streaming_config()
        return None if config is None else config.stream_size

    @property
    def array_field(self) -> str | None:
        """The streamed field if fixed: the constructor's value, else the trigger's ``over``."""
        if self._array_field is not None:
            return self._array_field
        config = self.streaming_config()
        return None if config is None else config.over

    def add_agent(self, agent: AgentLike) -> None:
        """Append an agent to the scope (it will run once per stream)."""
        self.agents.append(agent)

    def includes_agent(self, agent: AgentLike) -> bool:
        """Whether ``agent`` (class or instance) runs inside this scope."""
        return any(same_agent(member, agent) for member in self.agents)

    def should_end(self, agent: AgentLike) -> bool:
        """Whether the scope ends before ``agent``: it ends batching or is the ending agent."""
        if self.ending_agent is not None and same_agent(agent, self.ending_agent):
            return True
        return agent_class(agent).is_batching_terminator()

    def detect_array_field(self, context: Mapping[str, Any]) -> str:
        """The field to stream over: ``array_field`` if set, else the only tabular field."""
        if self.array_field is not None:
            return self.array_field
        candidates = [name for name, value in context.items() if is_tabular(value)]
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            fields = ", ".join(context) or "none"
            raise ConfigurationError(
                f"Agent '{self.trigger_name}': no tabular field in the context to stream over "
                f"(fields: {fields}). Set one before the scope, or name it with over='field'."
            )
        raise ConfigurationError(
            f"Agent '{self.trigger_name}': several tabular fields could be streamed "
            f"({', '.join(candidates)}); choose one with over='{candidates[0]}'."
        )

    def get_source(
        self, context: Mapping[str, Any], field: str | None = None
    ) -> pa.Table | pa.RecordBatchReader:
        """The streamed field (``field``, else detected) as a table, or a reader left lazy;
        ``ExecutionError`` if absent or not tabular."""
        field = field or self.detect_array_field(context)
        if field not in context:
            fields = ", ".join(context) or "none"
            raise ExecutionError(
                f"Agent '{self.trigger_name}': field '{field}' to stream over is not in the "
                f"context (fields: {fields}). Set it before the scope or fix over=."
            )
        value = context[field]
        if not is_tabular(value, allow_records=True):
            raise ExecutionError(
                f"Agent '{self.trigger_name}': field '{field}' holds {describe(value)}, not a "
                "table. Give it a pyarrow Table, RecordBatch, RecordBatchReader, an "
                "Arrow-exporting data frame or a list of dicts."
            )
        try:
            # A lazy input (a DuckDB relation, a polars LazyFrame, a dataset) is read in
            # batches of about one stream.
            return to_table_or_reader(value, self.chunk_size)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
            raise ExecutionError(
                f"Agent '{self.trigger_name}': field '{field}' cannot be read as a table: {exc}"
            ) from exc

    def get_array_from_context(self, context: Mapping[str, Any]) -> pa.Table:
        """The streamed field as a ``pa.Table`` (a reader is read to its end)."""
        return to_table(self.get_source(context))

    def is_valid(self) -> bool:
        """Whether the scope can run: a trigger agent, a positive stream size and no trigger or
        terminator among its members other than the trigger itself."""
        if not _is_agent(self.trigger_agent):
            return False
        size = self.chunk_size
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            return False
        members = self.agents[1:]
        return not any(
            agent_class(member).is_batching_trigger()
            or agent_class(member).is_batching_terminator()
            for member in members
        )

    def __repr__(self) -> str:
        names = " >> ".join(agent.name for agent in self.agents)
        return f"<BatchingScope [{names}] size={self.chunk_size} over={self.array_field!r}>"


class BatchingScopeManager:
    """Finds the scopes of a flow and answers which agents belong to them."""

    def __init__(self) -> None:
        self.scopes: list[BatchingScope] = []

    def detect_scopes(
        self,
        flow: Flow | Iterable[AgentLike],
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> list[BatchingScope]:
        """The flow's scopes in order; ``ConfigurationError`` for a nested or unpaired one.

        ``options`` maps a trigger's name to the options its scope runs with
        (``Flow.with_options``); a flow's own overrides are used when not given.
        """
        if options is None:
            options = getattr(flow, "options", None) or {}
        scopes: list[BatchingScope] = []
        current: BatchingScope | None = None
        for agent in flow:
            cls = agent_class(agent)
            if cls.is_batching_trigger():
                if current is not None:
                    raise ConfigurationError(
                        "Nested batching scopes not yet supported: agent "
                        f"'{agent.name}' starts a scope inside the scope of "
                        f"'{current.trigger_name}'. Put an @af.ends_batching agent before "
                        f"'{agent.name}'."
                    )
                current = BatchingScope(agent, options=options.get(agent.name))
                scopes.append(current)
            elif cls.is_batching_terminator():
                if current is None:
                    raise ConfigurationError(
                        f"Agent '{agent.name}' ends batching but no streaming scope is open "
                        "before it. Declare intelligent_streaming on an earlier agent, or "
                        "remove ends_batching."
                    )
                current.ending_agent = agent
                current = None
            elif current is not None:
                current.add_agent(agent)
        self.scopes = scopes
        return scopes

    def find_scope_for_agent(self, agent: AgentLike) -> BatchingScope | None:
        """The scope ``agent`` triggers, else ``None``."""
        return next(
            (
                scope
                for scope in self.scopes
                if scope.trigger_agent is not None and same_agent(scope.trigger_agent, agent)
            ),
            None,
        )

    def in_batching_scope(self, agent: AgentLike) -> bool:
        """Whether ``agent`` triggers a scope or runs inside one."""
        return any(scope.includes_agent(agent) for scope in self.scopes)

    def agents_to_skip(self) -> list[AgentLike]:
        """Members of scopes other than their triggers: the executor runs them, not the loop."""
        return [agent for scope in self.scopes for agent in scope.agents[1:]]
