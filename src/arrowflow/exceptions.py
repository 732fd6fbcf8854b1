"""The exceptions arrowflow raises.

The hierarchy::

    ArrowflowError
    ├── ConfigurationError (also a ValueError): a flow, a declaration or an agent that cannot
    │   work as written (found before any agent runs, or when an agent returns the wrong type)
    └── ExecutionError: something went wrong while a flow ran
        └── BatchExecutionError: one stream of a streaming scope failed

A ``KeyboardInterrupt`` (Ctrl-C) is never wrapped: it propagates as itself, with a note saying
which streams were kept.

Messages name the agent, the stream and the field involved and say what to do next.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "ArrowflowError",
    "BatchExecutionError",
    "ConfigurationError",
    "ExecutionError",
    "WorkerLostError",
]


class ArrowflowError(Exception):
    """Base class of every error raised by arrowflow."""


class ConfigurationError(ArrowflowError, ValueError):
    """A declaration, a flow, an option or an agent that cannot work as written.

    Found before any agent runs where it can be (options, scopes, hook signatures), else when
    an agent breaks its contract (``call`` returning a list, say). Never retried: the run
    fails at once, and the message says what to write instead.
    """


class ExecutionError(ArrowflowError):
    """A flow failed while running: bad data, a missing field, a failing agent."""


class BatchExecutionError(ExecutionError):
    """Stream ``batch_number`` of ``total_batches`` failed after its retries.

    Attributes:
        batch_number: the failed stream, 1-indexed.
        total_batches: the number of streams, or ``None`` when the input's length was unknown.
        original_error: the last exception raised by the stream (also ``__cause__``).
        partial_results: the merged context of every stream that completed, in stream order.
    """

    def __init__(
        self,
        message: str,
        *,
        batch_number: int,
        total_batches: int | None,
        original_error: BaseException,
        partial_results: Mapping[str, Any],
    ) -> None:
        super().__init__(message)
        self.batch_number = batch_number
        self.total_batches = total_batches
        self.original_error = original_error
        self.partial_results = partial_results


class WorkerLostError(ExecutionError):
    """The worker process running a stream died (``engine="ray"``): the attempt failed.

    Retried under ``retries=`` like any failed attempt of the stream.
    """
