"""Attempts of a stream's work: retries with backoff, timeouts, interrupts and cancellation.

Rules:

- An ``Exception`` of a ``retry_on`` type is retried up to ``retries`` times, after a backoff;
  another type fails the stream at once.
- A :class:`~arrowflow.ConfigurationError` is a programming error (an agent returning the
  wrong type, say): never retried, it fails the run.
- An interrupt — ``KeyboardInterrupt``, ``SystemExit``, or DuckDB's "query interrupted", which is
  how SIGINT surfaces inside a statement — is never retried nor counted as a failure: it
  propagates as ``KeyboardInterrupt``.
- A ``timeout`` bounds each attempt. A coroutine is cancelled at the deadline; a thread cannot
  be killed in Python, so a timed-out attempt on a thread is *abandoned*: it may go on in the
  background, but it stops at its next step (it never calls another agent or state callable)
  and its result is ignored.
- Once the run is cancelled (interrupted, stopped, failed), no new attempt starts and running
  ones stop at their next step.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from arrowflow._workers import POLL
from arrowflow.exceptions import ConfigurationError

if TYPE_CHECKING:
    import concurrent.futures
    from collections.abc import Callable

    from arrowflow._config import StreamingConfig

__all__ = [
    "Attempt",
    "Cancelled",
    "Tries",
    "as_interrupt",
    "backoff_delay",
    "is_interrupt",
    "with_retries",
]

_T = TypeVar("_T")


class Cancelled(BaseException):
    """Raised inside a stream that its run (or its timed-out attempt) gave up on.

    A ``BaseException``, so that no ``except Exception`` on the way turns it into a failure to
    retry; nobody waits for it.
    """


def is_interrupt(error: BaseException) -> bool:
    """Whether ``error`` means someone asked the process to stop.

    DuckDB turns SIGINT during a statement into ``RuntimeError("Query interrupted")`` or
    ``duckdb.InterruptException``; both are recognised without importing duckdb.
    """
    if isinstance(error, KeyboardInterrupt | SystemExit):
        return True
    kind = type(error)
    if kind.__name__ == "InterruptException" and kind.__module__.lstrip("_") == "duckdb":
        return True
    return kind is RuntimeError and str(error) == "Query interrupted"


def as_interrupt(error: BaseException) -> BaseException:
    """An interrupt as the process expects it: ``KeyboardInterrupt`` and ``SystemExit`` as they
    are, DuckDB's "query interrupted" as a ``KeyboardInterrupt`` chained to it."""
    if isinstance(error, KeyboardInterrupt | SystemExit):
        return error
    interrupt = KeyboardInterrupt(str(error))
    interrupt.__cause__ = error
    return interrupt


class Attempt:
    """One attempt of a stream's work: the step it is at, its deadline, whether it was given up.

    The step names what a failure or a timeout is blamed on.
    """

    __slots__ = ("_is_cancelled", "_pending", "abandoned", "deadline", "step")

    def __init__(self, cancelled: threading.Event, timeout: float | None) -> None:
        self.step = "skip_if"
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.abandoned = False
        self._is_cancelled = cancelled.is_set  # asked at every step: bound once
        self._pending: concurrent.futures.Future[Any] | None = None

    def enter(self, step: str) -> None:
        """Start ``step``, unless the attempt or its run was given up."""
        if self.abandoned or self._is_cancelled():
            raise Cancelled(f"stopped before {step}")
        self.step = step

    def track(self, future: concurrent.futures.Future[Any]) -> None:
        """Remember the coroutine the attempt waits for, to cancel it if abandoned."""
        self._pending = future
        if self.abandoned:
            future.cancel()

    def abandon(self) -> None:
        """Give the attempt up: it stops at its next step; its coroutine is cancelled."""
        self.abandoned = True
        pending = self._pending
        if pending is not None:
            pending.cancel()


@dataclass(slots=True)
class Tries:
    """The attempts of one piece of work, and how the last one failed."""

    count: int = 0
    seconds: float = 0.0
    step: str | None = None
    error: Exception | None = None


def with_retries(
    tries: Tries,
    options: StreamingConfig,
    timeout: float | None,
    cancelled: threading.Event,
    work: Callable[..., _T],
    args: tuple[Any, ...],
) -> _T | None:
    """``work(attempt, *args)`` until it succeeds or retries run out (see the module rules).

    ``options`` gives ``retries``, ``retry_on`` and ``backoff``. A failure is recorded in
    ``tries`` and gives ``None``.
    """
    started = time.perf_counter()
    try:
        while True:
            tries.count += 1
            attempt = Attempt(cancelled, timeout)
            try:
                if timeout is None:
                    return work(attempt, *args)
                return _call_with_timeout(attempt, work, args, timeout)
            except ConfigurationError:
                raise
            except Exception as error:
                if is_interrupt(error):
                    raise as_interrupt(error) from error
                retryable = isinstance(error, options.retry_on) and tries.count <= options.retries
                if not retryable or cancelled.wait(backoff_delay(options.backoff, tries.count)):
                    tries.step, tries.error = attempt.step, error
                    return None
    finally:
        tries.seconds += time.perf_counter() - started


def _call_with_timeout(
    attempt: Attempt, work: Callable[..., _T], args: tuple[Any, ...], timeout: float
) -> _T:
    """``work(attempt, *args)`` on a daemon thread, abandoned after ``timeout`` seconds."""
    finished = threading.Event()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = work(attempt, *args)
        except BaseException as exc:
            box["error"] = exc
        finally:
            finished.set()

    threading.Thread(target=target, name="arrowflow-attempt", daemon=True).start()
    deadline = time.monotonic() + timeout
    try:
        # In slices, so that a Ctrl-C is seen at once (see arrowflow._workers).
        while not (timely := finished.wait(min(POLL, max(deadline - time.monotonic(), 0)))):
            if time.monotonic() >= deadline:
                break
    except BaseException:
        attempt.abandon()
        raise
    if not timely:
        attempt.abandon()
        raise TimeoutError(f"stream attempt exceeded timeout={timeout}s (during {attempt.step})")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def backoff_delay(base: float, attempt: int) -> float:
    """Exponential backoff with jitter: ``base * 2**(attempt-1)``, scaled by 0.5 to 1.5."""
    if base == 0:
        return 0.0
    return float(base * 2 ** (attempt - 1) * (0.5 + random.random()))
