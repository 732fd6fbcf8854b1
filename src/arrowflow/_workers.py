"""The threads that run a scope's streams when several run at once, and waiting for them.

The run's own thread never blocks on a lock without a timeout: a SIGINT that the kernel hands
to another thread, or that lands just before the wait starts, sets Python's flag without waking
it, and Ctrl-C would then go unnoticed until the stream ends. Waiting in short slices lets
Python check for the signal between them.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["POLL", "DaemonPool", "result_of"]

#: Seconds between two looks at pending signals while the run's thread waits.
POLL = 0.05

_T = TypeVar("_T")
_Job = tuple[Future[Any], "Callable[..., Any]", tuple[Any, ...]]


class DaemonPool:
    """Up to ``size`` daemon threads running submitted calls, in order of submission.

    Unlike ``ThreadPoolExecutor``, whose threads the interpreter joins at exit, these are never
    waited for: a run interrupted while an agent is stuck returns control, and the process can
    exit, without them. Threads start as work arrives.

    Example:
        >>> pool = DaemonPool(2, "doc")
        >>> pool.submit(sum, [1, 2, 3]).result()
        6
        >>> pool.shutdown()
    """

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def submit(self, function: Callable[..., _T], *args: Any) -> Future[_T]:
        """Run ``function(*args)`` on a pool thread; its future holds the outcome."""
        future: Future[_T] = Future()
        self._jobs.put((future, function, args))
        if len(self._threads) < self._size:
            thread = threading.Thread(
                target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
            )
            # Listed before it starts: a Ctrl-C landing in start() must not hide it from
            # shutdown().
            self._threads.append(thread)
            thread.start()
        return future

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            _run(*job)
            del job  # hold no stream's data while waiting for the next

    def shutdown(self) -> None:
        """Let the threads end once their current call returns; wait for none of them."""
        for _ in self._threads:
            self._jobs.put(None)
        self._threads = []


def _run(future: Future[Any], function: Callable[..., Any], args: tuple[Any, ...]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = function(*args)
    except BaseException as exc:
        future.set_exception(exc)
    else:
        future.set_result(result)


def result_of(future: Future[_T]) -> _T:
    """``future.result()``, waited for in slices of :data:`POLL` seconds (module docstring)."""
    while True:
        try:
            return future.result(timeout=POLL)
        except TimeoutError:
            if future.done():  # the outcome itself is a TimeoutError
                raise
