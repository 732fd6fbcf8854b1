"""Execution statistics of a streaming scope: totals and one row per stream."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["STREAMS_SCHEMA", "StatsRecorder", "StreamRecord", "StreamRow"]

#: Columns of ``execution_stats["streams"]``: one row per stream, in stream order.
STREAMS_SCHEMA = pa.schema(
    [
        pa.field("stream_num", pa.int64(), nullable=False),
        pa.field("rows_in", pa.int64(), nullable=False),
        pa.field("rows_out", pa.int64(), nullable=False),
        pa.field("skipped", pa.int64(), nullable=False),
        pa.field("loaded", pa.int64(), nullable=False),
        pa.field("seconds", pa.float64(), nullable=False),
        pa.field("attempts", pa.int64(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
)


class StreamRecord(NamedTuple):
    """What happened to one stream: ``status`` is ``"ok"``, ``"failed"`` (``rows_out`` 0,
    ``error`` set) or ``"interrupted"`` (running when the run was interrupted).

    The recorder keeps each as a plain :data:`StreamRow` and makes them named when asked.
    """

    stream_num: int
    rows_in: int
    rows_out: int
    skipped: int
    loaded: int
    seconds: float
    attempts: int
    status: str
    error: str | None = None

    @property
    def is_ok(self) -> bool:
        return self.status == "ok"


#: The values of a :class:`StreamRecord`, in its order, as a plain tuple: Python's garbage
#: collector stops tracking a tuple of plain values, never a named tuple. A run keeps one per
#: stream to its end; millions of tracked ones would make every full collection walk them all.
StreamRow = tuple[int, int, int, int, int, float, int, str, str | None]


@dataclass
class StatsRecorder:
    """Collects stream records during a run and renders ``execution_stats``."""

    start_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    _rows: list[StreamRow] = field(default_factory=list)

    def add(self, row: StreamRow) -> None:
        self._rows.append(row)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def records(self) -> list[StreamRecord]:
        """The records so far, in the order they were added."""
        return [StreamRecord._make(row) for row in self._rows]

    def as_dict(self, *, finished: bool = True) -> dict[str, Any]:
        """The ``execution_stats`` mapping; ``end_time`` is ``None`` while running."""
        # In stream order: an interrupted run records the streams it kept before those it cut.
        records = sorted(self._rows, key=_STREAM_NUM)
        # Converted in C, with no Python object per stream: a run may have millions of them.
        streams = pa.Table.from_struct_array(pa.array(records, _RECORD_TYPE))
        ok = pc.equal(streams["status"], "ok")
        return {
            "total_batches": len(records),
            "successful_batches": _sum(ok),
            "failed_batches": _sum(pc.equal(streams["status"], "failed")),
            "total_items": _sum(streams["rows_in"]),
            "processed_items": _sum(pc.subtract(streams["rows_in"], streams["skipped"]), ok),
            "skipped_items": _sum(streams["skipped"], ok),
            "loaded_items": _sum(streams["loaded"], ok),
            "start_time": self.start_time,
            "end_time": datetime.now(UTC) if finished else None,
            "streams": streams,
        }


_STREAM_NUM = operator.itemgetter(0)
_RECORD_TYPE = pa.struct(list(STREAMS_SCHEMA))


def _sum(values: pa.Array | pa.ChunkedArray, where: pa.Array | None = None) -> int:
    """The sum of ``values`` (booleans count as 1) where ``where`` holds, as an ``int``."""
    if where is not None:
        values = values.filter(where)
    if pa.types.is_boolean(values.type):
        values = pc.cast(values, pa.int64())
    return int(pc.sum(values).as_py() or 0)
