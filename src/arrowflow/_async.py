"""Running ``async def call`` agents from the synchronous executor.

Each scope run (and each agent outside a scope) gets an :class:`EventLoop` of its own: a loop
on a daemon thread, started when the first coroutine arrives and closed when the run ends. A
stream's thread waits for its coroutine there, so up to ``max_concurrency`` streams are in
flight on the one loop. Keeping loops per run means an agent that blocks its loop (a
``time.sleep`` in an ``async def``) can only slow its own run, never a later one; and a loop of
our own also works where the caller's thread already runs one (a notebook), which
``asyncio.run`` refuses.

A coroutine given a deadline runs under ``asyncio.timeout``: when the deadline passes it is
cancelled (it sees ``CancelledError``) and the caller gets the builtin ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from arrowflow._workers import result_of

__all__ = ["EventLoop", "is_awaitable"]

# How long closing a loop waits for its coroutines to handle their cancellation.
_CLOSE_WAIT = 0.25


def is_awaitable(value: Any) -> bool:
    """Whether an agent returned something to await; answers dicts and ``None`` at once."""
    return value is not None and type(value) is not dict and inspect.isawaitable(value)


async def _bounded(awaitable: Awaitable[Any], timeout: float | None) -> Any:
    if timeout is None:
        return await awaitable
    async with asyncio.timeout(timeout):
        return await awaitable


class EventLoop:
    """An event loop on a daemon thread, started on first use, for one run.

    Example:
        >>> async def answer():
        ...     return 42
        >>> loop = EventLoop()
        >>> loop.run(answer())
        42
        >>> loop.close()
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()

    def _started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise RuntimeError("the run has ended: its event loop is closed")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=_serve, args=(loop,), name="arrowflow-event-loop", daemon=True
                )
                self._thread.start()
                self._loop = loop
            return self._loop

    def run(
        self,
        awaitable: Awaitable[Any],
        deadline: float | None = None,
        on_submit: Callable[[concurrent.futures.Future[Any]], None] | None = None,
    ) -> Any:
        """Wait for ``awaitable`` on this loop; cancel it at ``deadline`` (``time.monotonic``).

        ``on_submit`` receives the pending future, so a caller giving up on it can cancel it.
        """
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        future = asyncio.run_coroutine_threadsafe(_bounded(awaitable, timeout), self._started())
        if on_submit is not None:
            on_submit(future)
        return result_of(future)

    def cancel_all(self) -> None:
        """Cancel every coroutine running on the loop (they see ``CancelledError``)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(_cancel_tasks, loop)

    def close(self) -> None:
        """Cancel what still runs, stop the loop and close it.

        Waits briefly for the coroutines to handle their cancellation; a loop blocked by an
        agent is left to close itself on its daemon thread once the agent lets go.
        """
        with self._lock:
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:  # already closed
            return
        thread.join(_CLOSE_WAIT)


def _cancel_tasks(loop: asyncio.AbstractEventLoop) -> None:
    for task in asyncio.all_tasks(loop):
        task.cancel()


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    """Run ``loop`` until stopped, then let cancelled coroutines finish and close it."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
