"""What a ``MemoryState`` holds, in Arrow: one *piece* per stored stream, and the vectorised
operations over a list of them (they loop over pieces, that is over streams, never over rows).

A piece is what storing one stream left: the result table the agents returned (as it is: no
copy, exact schema) and the keys it marked done (its processed input keys, those the agents
filtered out included) under its fingerprint. Storing a stream first takes every row and done
mark of its keys out of the older pieces (:func:`replaced`), so a key is done under at most one
fingerprint and its rows are the last ones stored.

A row the agents *added*, under a key not in the stream's input, belongs to the stream: it is
loaded with the stream's last input key, its *anchor* (so it comes back in its stream, as the
first run returned it), and replaced when that key is stored again; a key added by two streams
of one fingerprint is refused (:func:`added_twice`). ``DuckDBState`` does the same.

Keys are compared as plain values of one type, the *kind* (see
:func:`arrowflow.state._schemas.comparable`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from arrowflow._tabular import decoded
from arrowflow.state._schemas import conformed

if TYPE_CHECKING:
    from arrowflow.state.base import StreamInfo

__all__ = [
    "Piece",
    "Resume",
    "added_twice",
    "done_keys",
    "is_in_stored",
    "plain",
    "replaced",
    "stored_rows",
]

_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)


@dataclass(frozen=True, slots=True)
class Piece:
    """What storing one stream left.

    Attributes:
        fp: the fingerprint its keys were done under.
        key: the key column.
        rows: the result rows (no columns when the results had no key column, nor rows).
        done: the keys it marked done, plain.
        owners: the key each row is loaded with, plain: its own, or the anchor for a row the
            agents added; ``None`` when every row has its own.
    """

    fp: str
    key: str
    rows: pa.Table
    done: pa.Array
    owners: pa.ChunkedArray | None = None


def plain(keys: pa.ChunkedArray, kind: pa.DataType) -> pa.ChunkedArray:
    """``keys`` as plain values of ``kind`` (dictionaries decoded; an Arrow error if they
    cannot be cast)."""
    values = decoded(keys)
    return values if values.type == kind else values.cast(kind)


def is_in_stored(keys: pa.ChunkedArray, stored: pa.ChunkedArray) -> pa.ChunkedArray:
    """``pc.is_in(keys, value_set=stored)``, hashing ``keys`` (a stream's, small) rather than
    what the store holds (large): the stored values found are the value set."""
    found = stored.filter(pc.is_in(stored, value_set=keys))
    return pc.is_in(keys, value_set=found)


def done_keys(pieces: list[Piece], fp: str, kind: pa.DataType) -> pa.ChunkedArray:
    """Every key done under ``fp``."""
    return pa.chunked_array([piece.done for piece in pieces if piece.fp == fp], kind)


def replaced(
    pieces: list[Piece], key: str, kind: pa.DataType, gone: pa.Array, keys: pa.Array
) -> list[Piece]:
    """``pieces`` without their rows and done marks of the keys ``gone``, nor the rows added
    by the streams whose anchor is in the input ``keys`` (emptied pieces dropped)."""
    if not pc.any(pc.is_in(_held_keys(pieces, key, kind), value_set=gone)).as_py():
        return list(pieces)
    kept = []
    for piece in pieces:
        rows, done, owners = piece.rows, piece.done, piece.owners
        stored = _keys_of(rows, key, kind)
        if stored is not None:
            drop = pc.is_in(stored, value_set=gone)
            if owners is not None:
                drop = pc.or_(drop, pc.is_in(owners, value_set=keys))
                owners = owners.filter(pc.invert(drop))
            rows = rows.filter(pc.invert(drop))
        if piece.key == key:
            done = done.filter(pc.invert(pc.is_in(done, value_set=gone)))
        if rows.num_rows or len(done):
            kept.append(Piece(piece.fp, piece.key, rows, done, owners))
    return kept


def added_twice(
    pieces: list[Piece], fp: str, kind: pa.DataType, added: pa.Array, keys: pa.Array
) -> pa.Array:
    """The keys among ``added`` (by a stream of input ``keys``) that another stream of ``fp``
    added too, and still holds (its anchor is done)."""
    value_chunks, owner_chunks = [], []
    for piece in pieces:
        stored = _keys_of(piece.rows, piece.key, kind)
        if piece.fp == fp and piece.owners is not None and stored is not None:
            value_chunks.extend(stored.chunks)
            owner_chunks.extend(piece.owners.chunks)
    if not value_chunks:
        return pa.array([], kind)
    values, owners = pa.chunked_array(value_chunks, kind), pa.chunked_array(owner_chunks, kind)
    taken = pc.and_(pc.not_equal(values, owners), pc.is_in(values, value_set=added))
    theirs = pc.and_(
        pc.invert(pc.is_in(owners, value_set=keys)),
        pc.is_in(owners, value_set=done_keys(pieces, fp, kind)),
    )
    return pc.unique(values.filter(pc.and_(taken, theirs)))


def stored_rows(
    pieces: list[Piece], fp: str, kind: pa.DataType, wanted: pa.ChunkedArray, schema: pa.Schema
) -> pa.Table | None:
    """The rows stored under ``fp`` of the done keys ``wanted`` (with the rows their streams
    added), in the order they were stored, as ``schema``; ``None`` when there are none."""
    mine = [piece for piece in pieces if piece.fp == fp and piece.rows.num_rows]
    if not mine or not len(wanted):
        return None
    stored = pa.concat_tables([conformed(piece.rows, schema) for piece in mine])
    owners = pa.chunked_array([c for piece in mine for c in _owners(piece, kind).chunks], kind)
    return stored.filter(pc.is_in(owners, value_set=wanted))


@dataclass(frozen=True, slots=True)
class Resume:
    """What is done in an input whose keys are known, learnt once when the run begins.

    Attributes:
        keys: the input's key column, as given (a stream's keys are compared with its slice).
        plain: the same keys as plain values.
        mask: ``True`` where the input's key is done under the run's fingerprint.
        touched: ``True`` where anything is stored for the input's key (under any fingerprint).
        rows: the stored rows of the done keys (and the rows their streams added), sorted by
            input position (stable: the rows of a position in the order they were stored), or
            ``None`` when there are none.
        positions: the input position of each of ``rows``.
    """

    keys: pa.ChunkedArray
    plain: pa.ChunkedArray
    mask: pa.Array
    touched: pa.Array
    rows: pa.Table | None
    positions: np.ndarray[Any, Any]

    @classmethod
    def of(
        cls,
        pieces: list[Piece],
        fp: str,
        key: str,
        kind: pa.DataType,
        keys: pa.ChunkedArray,
        schema: pa.Schema | None,
    ) -> Resume:
        """What ``pieces`` hold for the input whose column ``key`` is ``keys``, under ``fp``."""
        values = plain(keys, kind)
        mine = [piece for piece in pieces if piece.fp == fp]
        mask = is_in_stored(values, done_keys(mine, fp, kind)).combine_chunks()
        touched = is_in_stored(values, _held_keys(pieces, key, kind)).combine_chunks()
        mine = [piece for piece in mine if piece.rows.num_rows]
        if schema is None or not mine or not pc.any(mask).as_py():
            return cls(keys, values, mask, touched, None, np.empty(0, np.int64))
        stored = pa.concat_tables([conformed(piece.rows, schema) for piece in mine])
        owners = pa.chunked_array([c for piece in mine for c in _owners(piece, kind).chunks], kind)
        positions = pc.index_in(owners, value_set=values)  # an added row: where its anchor is
        done_at = pc.fill_null(pc.take(mask, positions), False)
        positions, stored = positions.filter(done_at), stored.filter(done_at)
        order = pc.sort_indices(positions)  # stable: as stored
        return cls(
            keys, values, mask, touched, stored.take(order), positions.take(order).to_numpy()
        )

    def covers(self, stream: StreamInfo, keys: pa.ChunkedArray) -> bool:
        """Whether ``keys`` are the input's keys at ``stream``'s rows (then this answers)."""
        offset = stream.offset
        return (
            offset is not None
            and offset + len(keys) <= len(self.keys)
            and self.keys.slice(offset, len(keys)).equals(keys)
        )

    def mask_of(self, stream: StreamInfo, rows: int) -> pa.Array:
        assert stream.offset is not None
        return self.mask.slice(stream.offset, rows)

    def rows_of(self, stream: StreamInfo, rows: int) -> pa.Table | None:
        if self.rows is None:
            return None
        assert stream.offset is not None
        low, high = np.searchsorted(self.positions, [stream.offset, stream.offset + rows])
        return self.rows.slice(int(low), int(high - low))

    def is_fresh(self, stream: StreamInfo, processed: pa.ChunkedArray) -> bool:
        """Whether ``processed`` are the stream's keys not done, none with anything stored."""
        offset = stream.offset
        if offset is None or offset + stream.rows > len(self.plain):
            return False
        todo = pc.invert(self.mask.slice(offset, stream.rows))
        if not self.plain.slice(offset, stream.rows).filter(todo).equals(processed):
            return False
        return not pc.any(pc.and_(self.touched.slice(offset, stream.rows), todo)).as_py()


def _keys_of(rows: pa.Table, key: str, kind: pa.DataType) -> pa.ChunkedArray | None:
    """The keys of stored ``rows``, plain; ``None`` when they have none (no row, no such
    column, or keys of another column that cannot be compared)."""
    if not rows.num_rows or key not in rows.column_names:
        return None
    try:
        return plain(rows[key], kind)
    except _ARROW_ERRORS:
        return None


def _owners(piece: Piece, kind: pa.DataType) -> pa.ChunkedArray:
    """The key each row of ``piece`` is loaded with."""
    if piece.owners is not None:
        return piece.owners
    keys = _keys_of(piece.rows, piece.key, kind)
    return keys if keys is not None else pa.chunked_array([], kind)


def _held_keys(pieces: list[Piece], key: str, kind: pa.DataType) -> pa.ChunkedArray:
    """Every key of column ``key`` the ``pieces`` hold anything for: rows or a done mark."""
    chunks = []
    for piece in pieces:
        for keys in (_keys_of(piece.rows, key, kind), piece.owners):
            if keys is not None:
                chunks.extend(keys.chunks)
        if piece.key == key:
            chunks.append(piece.done)
    return pa.chunked_array(chunks, kind)
