"""Validated configuration of streaming and chunking declarations.

The declarations on :class:`~arrowflow.Agent` build these models; pydantic checks types
strictly (``stream_size=True`` or ``"10"`` is refused, not coerced) and every failure is
re-raised as a :class:`~arrowflow.ConfigurationError` naming the agent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from pydantic import ValidationError as _PydanticValidationError

from arrowflow.exceptions import ConfigurationError

if TYPE_CHECKING:
    from arrowflow.state.base import StateStore

__all__ = [
    "HOOK_ALIASES",
    "HOOK_NAMES",
    "STATE_CALLABLE_NAMES",
    "STREAMING_KEYWORDS",
    "ChunkConfig",
    "StreamingConfig",
    "StreamingOptions",
    "build",
    "is_misspelling",
    "option_default",
]

HOOK_NAMES = ("on_stream_start", "on_stream_complete", "on_stream_error")
STATE_CALLABLE_NAMES = ("skip_if", "load_existing", "persist_each_stream")
# Seed names accepted for the same hooks and state callable, as keywords and as methods.
HOOK_ALIASES = {
    "on_batch_start": "on_stream_start",
    "on_batch_complete": "on_stream_complete",
    "on_batch_error": "on_stream_error",
    "persist_each_batch": "persist_each_stream",
}

_OptionalCallable = Callable[..., Any] | None
_Model = TypeVar("_Model", bound=BaseModel)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


class StreamingConfig(_Frozen):
    """What ``intelligent_streaming`` declared on an agent class."""

    stream_size: StrictInt = Field(gt=0)
    over: StrictStr | None = None
    incremental: StrictBool = False
    key: StrictStr | None = None
    state: Any = None
    skip_if: _OptionalCallable = None
    load_existing: _OptionalCallable = None
    persist_each_stream: _OptionalCallable = None
    on_stream_start: _OptionalCallable = None
    on_stream_complete: _OptionalCallable = None
    on_stream_error: _OptionalCallable = None
    retries: StrictInt = Field(default=0, ge=0)
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    backoff: float = Field(default=1.0, ge=0)
    on_error: Literal["raise", "continue"] = "raise"
    max_concurrency: StrictInt = Field(default=1, ge=1)
    timeout: float | None = Field(default=None, gt=0)


class StreamingOptions(TypedDict, total=False):
    """The keyword options of ``intelligent_streaming`` and its seed aliases, for type checkers.

    ``Agent.intelligent_streaming`` documents them; :class:`StreamingConfig` validates them and
    holds their defaults. Seed aliases come last, as in the signatures that ``help()`` shows.
    """

    state: StateStore | None
    key: str | None
    skip_if: Callable[..., Any] | None
    load_existing: Callable[..., Any] | None
    persist_each_stream: Callable[..., Any] | None
    on_stream_start: Callable[..., Any] | None
    on_stream_complete: Callable[..., Any] | None
    on_stream_error: Callable[..., Any] | None
    max_concurrency: int
    retries: int
    retry_on: type[BaseException] | tuple[type[BaseException], ...]
    backoff: float
    timeout: float | None
    on_error: Literal["raise", "continue"]
    on_batch_start: Callable[..., Any] | None
    on_batch_complete: Callable[..., Any] | None
    on_batch_error: Callable[..., Any] | None
    persist_each_batch: Callable[..., Any] | None


class ChunkConfig(_Frozen):
    """What ``in_chunks_of`` declared on an agent class."""

    size: StrictInt = Field(gt=0)
    over: StrictStr | None = None


_OPTION_NAMES = tuple(StreamingOptions.__annotations__)
#: Every keyword ``intelligent_streaming`` accepts, seed aliases included.
STREAMING_KEYWORDS = frozenset(StreamingConfig.model_fields) | HOOK_ALIASES.keys()


def option_default(name: str) -> Any:
    """The default of the keyword option ``name`` (a seed alias has its target's)."""
    return StreamingConfig.model_fields[HOOK_ALIASES.get(name, name)].default


def is_misspelling(word: str, name: str) -> bool:
    """Whether ``word`` is ``name`` with one slip of the keyboard.

    A slip is one letter added, dropped or replaced, two neighbouring letters swapped, or a
    change of case; the first letter must match (case aside), since a word that differs from
    ``name`` from its first letter on (``link`` and ``sink``) is usually another word.

    Example:
        >>> [is_misspelling(w, "progress") for w in ("progres", "porgress", "progress_log")]
        [True, True, False]
    """
    a, b = word.lower(), name.lower()
    if word == name or a[:1] != b[:1] or abs(len(a) - len(b)) > 1:
        return False
    if len(a) != len(b):
        shorter, longer = sorted((a, b), key=len)
        return any(longer[:i] + longer[i + 1 :] == shorter for i in range(len(longer)))
    differ = [i for i in range(len(a)) if a[i] != b[i]]
    if len(differ) == 2 and differ[1] == differ[0] + 1:
        i = differ[0]
        return a[i : i + 2] == b[i + 1] + b[i]
    return len(differ) <= 1


def build(model: type[_Model], agent_name: str, **values: Any) -> _Model:
    """Validate ``values`` into ``model``, raising ``ConfigurationError`` naming the agent."""
    if model is StreamingConfig:
        values = _canonical_options(agent_name, values)
    try:
        return model(**values)
    except _PydanticValidationError as exc:
        problems = "; ".join(_describe_error(error) for error in exc.errors())
        raise ConfigurationError(f"Agent '{agent_name}': {problems}.") from None


def _canonical_options(agent_name: str, values: dict[str, Any]) -> dict[str, Any]:
    canonical: dict[str, Any] = {}
    for name, value in values.items():
        target = HOOK_ALIASES.get(name, name)
        if target not in StreamingConfig.model_fields:
            meant = [option for option in _OPTION_NAMES if is_misspelling(name, option)]
            hint = f" Did you mean '{meant[0]}'?" if meant else ""
            valid = ", ".join(sorted(_OPTION_NAMES))
            raise ConfigurationError(
                f"Agent '{agent_name}': Unknown option '{name}'.{hint} Valid options: {valid}."
            )
        if target in canonical:
            raise ConfigurationError(
                f"Agent '{agent_name}': option '{name}' given twice (as '{target}' and its "
                "alias); keep one."
            )
        canonical[target] = value
    if "retry_on" in canonical and isinstance(canonical["retry_on"], type):
        canonical["retry_on"] = (canonical["retry_on"],)
    state = canonical.get("state")
    if state is not None:
        missing = [
            name for name in STATE_CALLABLE_NAMES if not callable(getattr(state, name, None))
        ]
        if missing:
            raise ConfigurationError(
                f"Agent '{agent_name}': state= must be a store providing skip_if, "
                f"load_existing and persist_each_stream; {type(state).__name__} lacks "
                f"{', '.join(missing)}. Use af.DuckDBState or implement them."
            )
    return canonical


def _describe_error(error: Any) -> str:
    location = ".".join(str(part) for part in error["loc"]) or "options"
    message = str(error["msg"])
    if error["type"] == "callable_type":
        message = "must be callable"
    return f"invalid {location}={error['input']!r} ({message})"
