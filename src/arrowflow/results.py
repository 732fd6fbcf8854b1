"""What a run returns: the final context with statistics, and per-stream results."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from arrowflow._tabular import is_tabular, to_table
from arrowflow.exceptions import ExecutionError

if TYPE_CHECKING:
    import os

    import pyarrow as pa

__all__ = ["PipelineResult", "StreamResult"]


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
        return f"PipelineResult({', '.join(self._fields)})"

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
