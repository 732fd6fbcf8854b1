"""How many streams run at once: up to ``max_concurrency``, or one at a time when that is faster.

Threads pay off when a stream's work waits (a model call, an API) or spends long in kernels that
release the GIL. When each stream takes a fraction of a millisecond of Python-bound work, they
cost instead: every stream is handed to a thread and back, and the threads take turns on the
GIL; measured on 2 cores, three pyarrow steps over 1,000-row streams ran 1.5x to 2.5x slower on
two threads than on the run's own.

So a run with ``max_concurrency > 1`` starts with its streams on threads and watches them:

1. After a window of streams (:data:`WINDOW_STREAMS` and :data:`WINDOW_SECONDS`), threads
   stay if a stream took :data:`SHORT_SECONDS` or more on average: the hand-offs are lost in
   the stream's own time, and any wait overlaps.
2. Otherwise the run tries a window of streams one at a time on its own thread, and keeps the
   way that completed more rows per second. Measured, not guessed: the threads' CPU time is no
   guide (two threads of 1,000-row pyarrow steps used the CPU 1.45 times the wall time while
   completing rows 3.5 times slower than one thread).
3. Streams running one at a time go back to threads for good as soon as
   :data:`LONG_IN_A_ROW` of them in a row take :data:`SHORT_SECONDS` or more: work that waits
   gets its concurrency, while one stream held up by a pause of the machine (a garbage
   collection, another process) does not count.

Streams complete in stream order whichever way they run; only the number in flight changes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from arrowflow._stream import StreamOutcome

__all__ = ["LONG_IN_A_ROW", "SHORT_SECONDS", "WINDOW_SECONDS", "WINDOW_STREAMS", "Pace"]

#: A stream shorter than this gains nothing from a thread of its own worth its hand-off.
SHORT_SECONDS = 0.005
#: Streams in a row, run one at a time, taking SHORT_SECONDS or more that send a run to threads.
LONG_IN_A_ROW = 2
#: A window spans at least this many completed streams ...
WINDOW_STREAMS = 8
#: ... and at least this many seconds. The window run the slower way costs a part of its
#: length, once per run; a shorter window is more easily misled by a pause of the machine:
#: when threads are ``s`` times slower, only a pause longer than ``(s - 1) * WINDOW_SECONDS``
#: in the window run one at a time makes threads look faster (15 ms at 1,000 rows per stream
#: of pyarrow steps, where ``s`` measured 2.5).
WINDOW_SECONDS = 0.01

_THREADS, _TRYING_ONE, _ONE, _SETTLED = "threads", "trying one at a time", "one at a time", "set"


class Pace:
    """The number of streams to keep in flight, updated as streams complete (module docstring).

    Attributes:
        width: how many streams to keep in flight now; ``1`` runs them on the run's thread.
        watching: whether completions still matter (the choice is not settled).
    """

    def __init__(
        self,
        limit: int,
        clock: Callable[[], float] = time.perf_counter,
        *,
        adaptive: bool = True,
    ) -> None:
        self.limit = limit
        self.width = limit
        self._clock = clock
        adapting = adaptive and limit > 1  # streams on other processes: always ``limit``
        self._phase = _THREADS if adapting else _SETTLED
        self.watching = adapting  # read once per stream: an attribute, not a property
        self._window = _Window(clock)
        self._threads_rate = 0.0
        self._long_in_a_row = 0

    @property
    def one_at_a_time(self) -> bool:
        """Whether streams run one at a time on the run's thread."""
        return self.width == 1

    def completed(self, outcome: StreamOutcome, *, on_thread: bool) -> None:
        """Note a completed (or failed) stream, in stream order, and whether it ran on a
        thread of the pool (rather than the run's own)."""
        phase = self._phase
        if phase == _SETTLED or on_thread != (phase == _THREADS):
            return  # settled, or one of the streams started before the last change
        seconds = outcome.tries.seconds
        if phase == _ONE:
            self._long_in_a_row = self._long_in_a_row + 1 if seconds >= SHORT_SECONDS else 0
            if self._long_in_a_row >= LONG_IN_A_ROW:
                self._settle(self.limit)
            return
        window = self._window
        window.add(outcome.rows_in, seconds)
        if not window.full():
            return
        if phase == _THREADS:
            if window.mean_seconds() >= SHORT_SECONDS:
                self._settle(self.limit)
                return
            self._threads_rate = window.rate()
            self._phase, self.width, self._window = _TRYING_ONE, 1, _Window(self._clock)
            return
        # Trying one at a time: long streams, or a slower rate, send the run back to threads.
        if window.mean_seconds() >= SHORT_SECONDS or window.rate() < self._threads_rate:
            self._settle(self.limit)
        else:
            self._phase = _ONE

    def _settle(self, width: int) -> None:
        self._phase, self.width, self.watching = _SETTLED, width, False


class _Window:
    """Streams completed since the window opened (at its first completion), with their rows
    and their own seconds."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.opened: float | None = None
        self.streams = 0
        self.rows = 0
        self.seconds = 0.0
        self.last = 0.0

    def add(self, rows: int, seconds: float) -> None:
        now = self._clock()
        if self.opened is None:  # the first completion opens it: what came before is start-up
            self.opened = now
        else:
            self.streams += 1
            self.rows += rows
            self.seconds += seconds
        self.last = now

    def full(self) -> bool:
        return (
            self.opened is not None
            and self.streams >= WINDOW_STREAMS
            and self.last - self.opened >= WINDOW_SECONDS
        )

    def mean_seconds(self) -> float:
        return self.seconds / max(self.streams, 1)

    def rate(self) -> float:
        """Rows completed per second of the window."""
        assert self.opened is not None
        return self.rows / max(self.last - self.opened, 1e-9)
