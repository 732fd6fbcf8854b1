"""Running ``async def call`` agents from the synchronous executor.

Coroutines run on one event loop in a daemon thread of their own, shared by every run of the
process: a stream's thread waits for its coroutine there, so up to ``max_concurrency`` streams
are in flight on the one loop. A loop of our own also works where the caller's thread already
runs one (a notebook), which ``asyncio.run`` refuses.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable
from typing import Any

__all__ = ["resolve"]

_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def _background_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=loop.run_forever, name="arrowflow-event-loop", daemon=True
            )
            thread.start()
            _loop = loop
        return _loop


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def resolve(value: Any) -> Any:
    """``value`` itself, or, when it is awaitable, what it resolves to on the shared loop."""
    # Most agents return a dict or None: answer those without the slower protocol check.
    if value is None or type(value) is dict or not inspect.isawaitable(value):
        return value
    future = asyncio.run_coroutine_threadsafe(_await(value), _background_loop())
    return future.result()
