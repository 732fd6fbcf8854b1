"""What a run returns: the final context with statistics, and per-stream results."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import pyarrow as pa

from arrowflow._tabular import is_tabular, to_table
from arrowflow.display import result_html, result_text
from arrowflow.exceptions import ExecutionError
from arrowflow.stats import STREAMS_SCHEMA

if TYPE_CHECKING:
    import os

__all__ = ["SCOPE_STREAMS_SCHEMA", "PipelineResult", "StreamResult"]

#: Columns of :meth:`PipelineResult.streams`: the scope's trigger name, then the stream's stats.
SCOPE_STREAMS_SCHEMA = pa.schema([pa.field("scope", pa.string(), nullable=False), *STREAMS_SCHEMA])


class StreamResult(NamedTuple):
    """One stream delivered by ``stream()``: its number, the total (``None`` while unknown)
    and its rows as a ``pa.Table``. A named tuple: ``for num, total, rows in flow.stream()``."""

    stream_num: int
    total: int | None
    results: pa.Table


class PipelineResult(Mapping[str, Any]):
    """The final context of a run, read-only, with each scope's ``execution_stats``.

    Attributes:
        stats: one ``execution_stats`` mapping per streaming scope, in flow order.
        scopes: the name of each scope's trigger agent, in the order of ``stats``.
    """

    __slots__ = ("_fields", "scopes", "stats")

    def __init__(
        self,
        fields: Mapping[str, Any],
        stats: list[dict[str, Any]],
        scopes: Sequence[str] = (),
    ) -> None:
        self._fields = dict(fields)
        self.stats = stats
        self.scopes = tuple(scopes)

    def __getitem__(self, key: str) -> Any:
        return self._fields[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return result_text(self)

    def _repr_html_(self) -> str:
        return result_html(self)

    def streams(self) -> pa.Table:
        """Every scope's per-stream statistics as one table, scopes in flow order.

        A ``scope`` column (the trigger agent's name) comes first, then the columns of
        ``stats[i]["streams"]``: ``stream_num``, ``rows_in``, ``rows_out``, ``skipped``,
        ``loaded``, ``seconds``, ``attempts``, ``status`` and ``error``. A run without a
        scope gives an empty table with these columns.

        Example:
            >>> import pyarrow as pa
            >>> import arrowflow as af
            >>> @af.intelligent_streaming(stream_size=2, over="rows")
            ... class Tag(af.Agent):
            ...     def call(self, context):
            ...         return None
            >>> result = af.Flow(Tag).run(rows=pa.table({"n": range(5)}), progress=False)
            >>> streams = result.streams()
            >>> streams.column_names[:3], streams["scope"].to_pylist()
            (['scope', 'stream_num', 'rows_in'], ['Tag', 'Tag', 'Tag'])
            >>> streams["rows_in"].to_pylist()
            [2, 2, 1]
        """
        tables = []
        for name, stats in zip(self.scopes, self.stats, strict=True):
            streams: pa.Table = stats["streams"]
            scope = pa.repeat(pa.scalar(name, pa.string()), streams.num_rows)
            columns = [scope, *streams.select(STREAMS_SCHEMA.names).columns]
            tables.append(pa.Table.from_arrays(columns, schema=SCOPE_STREAMS_SCHEMA))
        return pa.concat_tables(tables) if tables else SCOPE_STREAMS_SCHEMA.empty_table()

    def to_parquet(self, path: str | os.PathLike[str], field: str | None = None) -> None:
        """Write a tabular field (default: the only one) to a Parquet file."""
        import pyarrow.parquet as pq

        if field is None:
            tabular = [name for name, value in self._fields.items() if is_tabular(value)]
            if len(tabular) != 1:
                raise ExecutionError(
                    f"to_parquet needs field= when the result holds {len(tabular)} tabular "
                    f"fields ({', '.join(tabular) or 'none'})."
                )
            field = tabular[0]
        pq.write_table(to_table(self._fields[field]), path)
