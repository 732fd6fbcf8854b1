"""arrowflow: dataflow pipelines over Apache Arrow.

Compose agents with ``>>``; let one of them stream a large table through the agents of its
scope in zero-copy slices, merged back in order.

Example:
    >>> import pyarrow as pa, pyarrow.compute as pc
    >>> import arrowflow as af
    >>> @af.intelligent_streaming(stream_size=2, over="rows")
    ... class KeepBig(af.Agent):
    ...     def call(self, context):
    ...         return {"rows": context["rows"].filter(pc.field("n") >= 3)}
    >>> af.Flow(KeepBig).run(rows=pa.table({"n": range(6)}))["rows"]["n"].to_pylist()
    [3, 4, 5]
"""

from __future__ import annotations

from arrowflow.agent import (
    Agent,
    agent,
    ends_batching,
    in_chunks_of,
    intelligent_batching,
    intelligent_streaming,
    triggers_batching,
)
from arrowflow.bench import StreamSizeReport, benchmark_stream_sizes
from arrowflow.context import Context
from arrowflow.display import plot_streams
from arrowflow.duckdb_sink import DuckDBSink
from arrowflow.engines import RayEngine
from arrowflow.exceptions import (
    ArrowflowError,
    BatchExecutionError,
    ConfigurationError,
    ExecutionError,
    WorkerLostError,
)
from arrowflow.executor import PipelineBatchExecutor
from arrowflow.flow import Flow, FlowStream, Pipeline
from arrowflow.interop import polars_agent, sql_agent
from arrowflow.io import ParquetSink, read_parquet, scan_parquet
from arrowflow.results import PipelineResult, StreamResult
from arrowflow.scope import BatchingScope, BatchingScopeManager
from arrowflow.state import DuckDBState, MemoryState

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "ArrowflowError",
    "BatchExecutionError",
    "BatchingScope",
    "BatchingScopeManager",
    "ConfigurationError",
    "Context",
    "DuckDBSink",
    "DuckDBState",
    "ExecutionError",
    "Flow",
    "FlowStream",
    "MemoryState",
    "ParquetSink",
    "Pipeline",
    "PipelineBatchExecutor",
    "PipelineResult",
    "RayEngine",
    "StreamResult",
    "StreamSizeReport",
    "WorkerLostError",
    "agent",
    "benchmark_stream_sizes",
    "ends_batching",
    "in_chunks_of",
    "intelligent_batching",
    "intelligent_streaming",
    "plot_streams",
    "polars_agent",
    "read_parquet",
    "scan_parquet",
    "sql_agent",
    "triggers_batching",
]
