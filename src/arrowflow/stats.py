"""Execution statistics of a streaming scope: totals and one row per stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

__all__ = ["STREAMS_SCHEMA", "StatsRecorder", "StreamRecord"]

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


@dataclass(slots=True)
class StreamRecord:
    """What happened to one stream: ``status`` is ``"ok"``, ``"failed"`` (``rows_out`` 0,
    ``error`` set) or ``"interrupted"`` (running when the run was interrupted)."""

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


@dataclass
class StatsRecorder:
    """Collects stream records during a run and renders ``execution_stats``."""

    start_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    records: list[StreamRecord] = field(default_factory=list)

    def add(self, record: StreamRecord) -> None:
        self.records.append(record)

    def as_dict(self, *, finished: bool = True) -> dict[str, Any]:
        """The ``execution_stats`` mapping; ``end_time`` is ``None`` while running."""
        ok = [r for r in self.records if r.is_ok]
        failed = sum(r.status == "failed" for r in self.records)
        # In stream order: an interrupted run records the streams it kept before those it cut.
        records = sorted(self.records, key=lambda r: r.stream_num)
        columns = [[getattr(r, name) for r in records] for name in STREAMS_SCHEMA.names]
        return {
            "total_batches": len(self.records),
            "successful_batches": len(ok),
            "failed_batches": failed,
            "total_items": sum(r.rows_in for r in self.records),
            "processed_items": sum(r.rows_in - r.skipped for r in ok),
            "skipped_items": sum(r.skipped for r in ok),
            "loaded_items": sum(r.loaded for r in ok),
            "start_time": self.start_time,
            "end_time": datetime.now(UTC) if finished else None,
            "streams": pa.Table.from_arrays(
                [pa.array(c, f.type) for c, f in zip(columns, STREAMS_SCHEMA, strict=True)],
                schema=STREAMS_SCHEMA,
            ),
        }
