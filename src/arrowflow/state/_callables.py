"""The state callables of a store, on top of its typed :class:`~arrowflow.state.base.Store`
methods, for the stores' users who call them with a context (outside the executor, or through
a declaration that overrides one of them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from arrowflow.exceptions import ExecutionError
from arrowflow.state.base import StreamInfo

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["StoreCallables", "array_field", "ended", "stream_of"]


class StoreCallables:
    """``skip_if``, ``load_existing`` and ``persist_each_stream`` for a class with ``skip``,
    ``load``, ``persist`` and the streamed field of its current run (``_run_field``)."""

    def skip(self, stream: StreamInfo, batch: pa.Table) -> pa.Array:
        raise NotImplementedError

    def load(self, stream: StreamInfo, skipped: pa.Table) -> pa.Table:
        raise NotImplementedError

    def persist(self, stream: StreamInfo, results: pa.Table, processed: pa.Table) -> None:
        raise NotImplementedError

    def _run_field(self) -> str | None:
        raise NotImplementedError

    def skip_if(self, batch: pa.Table, context: Mapping[str, Any]) -> pa.Array:
        """``True`` for the rows of ``batch`` whose key is done under the scope's fingerprint."""
        return self.skip(stream_of(context, batch), batch)

    def load_existing(self, skipped: pa.Table, context: Mapping[str, Any]) -> pa.Table:
        """The stored result rows of the ``skipped`` keys (those done; none for the others)."""
        return self.load(stream_of(context, skipped), skipped)

    def persist_each_stream(self, results: pa.Table, context: Mapping[str, Any]) -> None:
        """Store ``results`` and mark the stream's processed input keys done.

        The keys marked done are those of ``context[field]`` (the rows that went through the
        agents), so keys the agents filtered out are remembered too; without that field, the
        keys of ``results``.
        """
        if isinstance(results, pa.RecordBatch):
            results = pa.Table.from_batches([results])
        stream = stream_of(context, results)
        field = self._run_field() or array_field(context)
        inputs = context.get(field) if field is not None else None
        processed = inputs if isinstance(inputs, pa.Table) else results
        self.persist(stream, results, processed)


def stream_of(context: Mapping[str, Any], rows: pa.Table) -> StreamInfo:
    """The stream a state callable was called for: the one the executor's context carries,
    or one read from ``_batch_metadata`` (its position in the input unknown: a store answers
    it without a whole-run join)."""
    stream = getattr(context, "stream", None)
    if isinstance(stream, StreamInfo):
        return stream
    meta = context.get("_batch_metadata")
    meta = meta if isinstance(meta, dict) else {}
    number = meta.get("batch_number")
    scope_id = meta.get("scope_id")
    return StreamInfo(
        number if isinstance(number, int) else 0,
        None,
        rows.num_rows,
        scope_id if isinstance(scope_id, str) else None,
        context,
    )


def array_field(context: Mapping[str, Any]) -> str | None:
    """The streamed field named by a context's ``_batch_metadata``, if any."""
    meta = context.get("_batch_metadata")
    field = meta.get("array_field") if isinstance(meta, dict) else None
    return field if isinstance(field, str) else None


def ended(where: str) -> ExecutionError:
    """The error for a call from a stream of a run that has ended."""
    return ExecutionError(
        f"{where}: the run this stream belongs to has ended (abandoned after a timeout or an "
        "interrupt); nothing of it is read or stored any more."
    )
