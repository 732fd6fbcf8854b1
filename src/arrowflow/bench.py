"""Choosing a stream size by measuring it: :func:`benchmark_stream_sizes`.

Small streams start work sooner, keep memory low and lose little when a run is killed; large
streams pay arrowflow's per-stream bookkeeping (contexts, hooks, statistics, state queries) less
often. Where the balance lies depends on the agents, so it is measured: the flow runs at each
stream size, rounds interleaved across sizes so that a machine that slows down or speeds up
during the benchmark affects every size alike.

How a benchmark leaves state alone: every scope that declares ``state=`` runs, in each round,
with a fresh in-memory store of the same kind instead (a :class:`~arrowflow.DuckDBState` on
``":memory:"`` with the same table, key and version for a DuckDB store, a
:class:`~arrowflow.MemoryState` otherwise). Each round therefore does the whole work, state
queries and writes included, as a first run would, and the declared store is never opened.
Callables given as ``skip_if=``, ``load_existing=`` or ``persist_each_stream=`` (or defined on the
agent) are the user's own code and still run.
"""

from __future__ import annotations

import html
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from arrowflow._compat import import_optional
from arrowflow.exceptions import ConfigurationError
from arrowflow.flow import Flow, Pipeline
from arrowflow.state import DuckDBState, MemoryState

if TYPE_CHECKING:
    from arrowflow.agent import Agent
    from arrowflow.scope import BatchingScope

__all__ = ["StreamSizeReport", "benchmark_stream_sizes"]

#: The columns of :attr:`StreamSizeReport.table`.
REPORT_SCHEMA = pa.schema(
    [
        pa.field("stream_size", pa.int64(), nullable=False),
        pa.field("streams", pa.int64(), nullable=False),
        pa.field("rounds", pa.int64(), nullable=False),
        pa.field("seconds_min", pa.float64(), nullable=False),
        pa.field("seconds_median", pa.float64(), nullable=False),
        pa.field("rows_per_s", pa.float64(), nullable=False),
        pa.field("overhead_per_stream_us", pa.float64()),
        pa.field("peak_arrow_mb", pa.float64(), nullable=False),
    ]
)

_MB = 1024 * 1024


@dataclass(frozen=True, repr=False)
class StreamSizeReport:
    """What :func:`benchmark_stream_sizes` measured.

    Attributes:
        table: one row per stream size, in the order given (columns in ``REPORT_SCHEMA``):
            ``streams`` of the benchmarked scope; ``rounds`` timed; ``seconds_min`` and
            ``seconds_median`` of a whole run of the flow; ``rows_per_s``, the input rows over
            the median; ``overhead_per_stream_us``, what a stream costs beyond the largest
            size's streams (the extra time of the run over its extra streams, from the best
            rounds; ``0`` for the largest size, null where the stream count is the same);
            ``peak_arrow_mb``, the most memory Arrow's default pool held beyond what it held
            before the run (sampled every millisecond; the highest round).
        best: the stream size with the highest median throughput.
        rows: the rows of the streamed field.
    """

    table: pa.Table
    best: int
    rows: int

    def __str__(self) -> str:
        """The table aligned for a terminal, the best size marked."""
        names = self.table.column_names
        lines = [names] + [[_format(row[name]) for name in names] for row in self.table.to_pylist()]
        widths = [max(len(line[i]) for line in lines) for i in range(len(names))]
        sizes = [None, *self.table["stream_size"].to_pylist()]
        return "\n".join(
            "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
            + ("  <- best" if size == self.best else "")
            for line, size in zip(lines, sizes, strict=True)
        )

    def __repr__(self) -> str:
        return f"StreamSizeReport(best={self.best}, rows={self.rows})\n{self}"

    def _repr_html_(self) -> str:
        header = "".join(f"<th>{html.escape(field.name)}</th>" for field in REPORT_SCHEMA)
        body = []
        for row in self.table.to_pylist():
            style = ' style="font-weight:bold"' if row["stream_size"] == self.best else ""
            cells = "".join(f"<td>{html.escape(_format(row[f.name]))}</td>" for f in REPORT_SCHEMA)
            body.append(f"<tr{style}>{cells}</tr>")
        return (
            f"<div><p>Stream sizes over {self.rows:,} rows; best: <b>{self.best:,}</b> "
            "(highest median throughput).</p>"
            f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
        )

    def plot(self, ax: Any = None) -> Any:
        """Throughput (left axis) and peak Arrow memory (right axis) against stream size, on
        a log x axis; needs matplotlib (the ``plot`` extra). Returns the throughput axes."""
        ticker = import_optional("matplotlib.ticker", extra="plot")
        if ax is None:
            pyplot = import_optional("matplotlib.pyplot", extra="plot")
            _, ax = pyplot.subplots(figsize=(7, 4))
        sizes = self.table["stream_size"].to_pylist()
        ax.plot(sizes, self.table["rows_per_s"].to_pylist(), "o-", label="rows/s (median)")
        ax.set_xscale("log")
        ax.set_xlabel("stream size (rows)")
        ax.set_ylabel("rows per second")
        ax.yaxis.set_major_formatter(ticker.EngFormatter())  # 17.5M rather than 1.75 x 1e7
        ax.axvline(self.best, linestyle=":", color="grey")
        memory = ax.twinx()
        memory.plot(
            sizes, self.table["peak_arrow_mb"].to_pylist(), "s--", color="tab:red", label="peak MB"
        )
        memory.set_ylabel("peak Arrow memory (MB)")
        ax.set_title(f"Stream sizes over {self.rows:,} rows (best {self.best:,})")
        handles = ax.get_legend_handles_labels()[0] + memory.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="best")
        return ax


def benchmark_stream_sizes(
    flow: Flow | Pipeline | type[Pipeline] | Agent | type[Agent],
    sizes: Sequence[int],
    *,
    repeat: int = 3,
    warmup: int = 1,
    context: Mapping[str, Any] | None = None,
    scope: str | None = None,
    **fields: Any,
) -> StreamSizeReport:
    """Run ``flow`` at each stream size in ``sizes`` and measure it.

    The flow's first scope (or the one whose trigger is named ``scope``) runs at each size
    through :meth:`Flow.with_options`; ``warmup`` untimed rounds, then ``repeat`` timed rounds,
    each round running every size once, in the order given. The inputs (``context`` and
    ``fields``, laid over a pipeline's own context) are the same in every round: a
    ``RecordBatchReader`` given as a field can be read only once, so it is read into a table
    first. No progress bar is shown and no state store is written (module docstring).

    Example:
        >>> import pyarrow as pa, pyarrow.compute as pc
        >>> import arrowflow as af
        >>> @af.intelligent_streaming(stream_size=1_000, over="rows")
        ... class Double(af.Agent):
        ...     def call(self, context):
        ...         rows = context["rows"]
        ...         return {"rows": rows.append_column("y", pc.multiply(rows["x"], 2))}
        >>> report = af.benchmark_stream_sizes(
        ...     Double, [100, 1_000], repeat=2, rows=pa.table({"x": range(5_000)})
        ... )
        >>> report.table.select(["stream_size", "streams", "rounds"]).to_pylist()[0]
        {'stream_size': 100, 'streams': 50, 'rounds': 2}
        >>> report.best in (100, 1_000)
        True
    """
    base, inputs = _flow_and_inputs(flow, context, fields)
    _check_numbers(sizes, repeat, warmup)
    scopes = base.scopes()
    index = _scope_index(base, scopes, scope)
    trigger = scopes[index].trigger_name
    rows = _streamed_rows(scopes[index], inputs)
    flows = {size: base.with_options(stream_size=size, scope=trigger) for size in sizes}
    seconds: dict[int, list[float]] = {size: [] for size in sizes}
    peaks: dict[int, int] = dict.fromkeys(sizes, 0)
    streams: dict[int, int] = {}
    for round_num in range(warmup + repeat):
        for size in sizes:
            timed = round_num >= warmup
            run = _with_fresh_stores(flows[size], scopes)
            elapsed, peak, stats = _measure(run, inputs)
            streams[size] = stats[index]["total_batches"]
            if timed:
                seconds[size].append(elapsed)
                peaks[size] = max(peaks[size], peak)
    return _report(sizes, repeat, rows, seconds, peaks, streams)


def _flow_and_inputs(
    flow: Flow | Pipeline | type[Pipeline] | Agent | type[Agent],
    context: Mapping[str, Any] | None,
    fields: Mapping[str, Any],
) -> tuple[Flow, dict[str, Any]]:
    """The flow to run and its inputs, readers read into tables."""
    own: Mapping[str, Any] = {}
    if isinstance(flow, Pipeline):
        own, flow = flow.context, type(flow)
    if isinstance(flow, type) and issubclass(flow, Pipeline):
        flow = flow._flow()
    if not isinstance(flow, Flow):
        flow = Flow(flow)
    inputs = {**own, **(context or {}), **fields}
    for name, value in inputs.items():
        if isinstance(value, pa.RecordBatchReader):
            inputs[name] = value.read_all()
    return flow, inputs


def _check_numbers(sizes: Sequence[int], repeat: int, warmup: int) -> None:
    if isinstance(sizes, str | bytes) or not sizes:
        raise ConfigurationError(
            f"benchmark_stream_sizes(): sizes must be a non-empty list of stream sizes, got "
            f"{sizes!r}; e.g. [1_000, 10_000, 100_000]."
        )
    if len(set(sizes)) != len(sizes):
        raise ConfigurationError(f"benchmark_stream_sizes(): sizes {list(sizes)} repeat a size.")
    for name, value, least in (("repeat", repeat, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigurationError(
                f"benchmark_stream_sizes(): {name}= must be an int >= {least}, got {value!r}."
            )


def _scope_index(flow: Flow, scopes: list[BatchingScope], scope: str | None) -> int:
    names = [found.trigger_name for found in scopes]
    if not names:
        raise ConfigurationError(
            f"benchmark_stream_sizes(): {flow!r} has no streaming scope; declare "
            "@af.intelligent_streaming on one of its agents."
        )
    if scope is None:
        return 0
    if scope not in names:
        raise ConfigurationError(
            f"benchmark_stream_sizes(scope={scope!r}): no scope is triggered by that agent; "
            f"the scopes are triggered by {', '.join(map(repr, names))}."
        )
    return names.index(scope)


def _streamed_rows(scope: BatchingScope, inputs: Mapping[str, Any]) -> int:
    """The rows of the scope's field when it is an input (else 0: computed by the flow)."""
    field = scope.array_field
    value = inputs.get(field) if field is not None else None
    rows = getattr(value, "num_rows", None)
    if rows is None and field is None:
        tables = [value for value in inputs.values() if isinstance(value, pa.Table)]
        rows = tables[0].num_rows if len(tables) == 1 else None
    return int(rows or 0)


def _with_fresh_stores(flow: Flow, scopes: list[BatchingScope]) -> Flow:
    """``flow`` with every declared store replaced by a fresh in-memory one of its kind."""
    for found in scopes:
        config = found.streaming_config()
        state = None if config is None else config.state
        if state is None:
            continue
        table = getattr(state, "table", "benchmark")
        key = getattr(state, "key", None) or (config.key if config is not None else None) or "id"
        version = getattr(state, "version", None)
        fresh: DuckDBState | MemoryState = (
            DuckDBState(table=table, key=key, version=version)
            if isinstance(state, DuckDBState)
            else MemoryState(table=table, key=key, version=version)
        )
        flow = flow.with_options(state=fresh, scope=found.trigger_name)
    return flow


def _measure(flow: Flow, inputs: Mapping[str, Any]) -> tuple[float, int, list[dict[str, Any]]]:
    """One run: its seconds, the peak of Arrow memory it added, its statistics."""
    with _MemorySampler() as memory:
        started = time.perf_counter()
        result = flow.run(dict(inputs), progress=False)
        elapsed = time.perf_counter() - started
    return elapsed, memory.peak, result.stats


class _MemorySampler:
    """The most bytes Arrow's default pool held beyond what it held at the start, sampled
    every millisecond by a thread of its own while the block runs.

    Sampled, not counted: a pool of the run's own would count exactly, but buffers it
    allocated outlive the run in its results and must be freed through it.
    """

    INTERVAL = 0.001

    def __init__(self) -> None:
        self.peak = 0
        self._start = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="arrowflow-bench", daemon=True)

    def __enter__(self) -> _MemorySampler:
        self._start = pa.total_allocated_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._note()

    def _sample(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            self._note()

    def _note(self) -> None:
        self.peak = max(self.peak, pa.total_allocated_bytes() - self._start)


def _report(
    sizes: Sequence[int],
    repeat: int,
    rows: int,
    seconds: Mapping[int, list[float]],
    peaks: Mapping[int, int],
    streams: Mapping[int, int],
) -> StreamSizeReport:
    largest = max(sizes)
    best_time = {size: min(seconds[size]) for size in sizes}
    medians = {size: statistics.median(seconds[size]) for size in sizes}
    columns: dict[str, list[Any]] = {field.name: [] for field in REPORT_SCHEMA}
    for size in sizes:
        extra_streams = streams[size] - streams[largest]
        if size == largest:
            overhead: float | None = 0.0
        elif extra_streams:
            overhead = (best_time[size] - best_time[largest]) / extra_streams * 1e6
        else:
            overhead = None
        values = (
            size,
            streams[size],
            repeat,
            best_time[size],
            medians[size],
            rows / medians[size] if medians[size] > 0 else 0.0,
            overhead,
            peaks[size] / _MB,
        )
        for field, value in zip(REPORT_SCHEMA, values, strict=True):
            columns[field.name].append(value)
    table = pa.table(columns, schema=REPORT_SCHEMA)
    # The same rows at every size: the highest throughput is the shortest median run.
    best = min(sizes, key=lambda size: medians[size])
    return StreamSizeReport(table, best, rows)


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,}"
