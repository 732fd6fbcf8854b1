"""How a result column is kept in DuckDB when DuckDB cannot hold its Arrow type as it is.

DuckDB holds most Arrow types: read back, a cast gives the exact Arrow type again
(``large_string``, a time zone's name, a list's field name, a struct field's metadata ...).
The others are stored as a *carrier*, a type DuckDB holds, converted both ways without loss and
without a row going through Python:

===============================  ===================================================
Arrow type                       stored as
===============================  ===================================================
``float16``                      ``FLOAT`` (every half float is a float)
``duration[unit]``               ``BIGINT``, the count of units (DuckDB's INTERVAL
                                 has no unit and keeps microseconds)
``decimal256(p, s)``             ``DECIMAL(p, s)`` up to ``p = 38``, else ``VARCHAR``
``month_day_nano_interval``      ``BLOB`` of its 16 bytes (INTERVAL keeps microseconds)
sparse or dense union            ``STRUCT(type_code TINYINT, <one field per member>)``,
                                 the value under its member's field, the others null
extension type                   its storage type
run-end encoded                  its values
list view                        a list
===============================  ===================================================

A list, struct, map or dictionary whose values need a carrier is stored with theirs.
:func:`encode` gives the carrier of a column; :func:`decode` turns what DuckDB reads back
into the column's exact Arrow type.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["carrier_type", "decode", "encode", "needs_carrier"]

_TYPE_CODE = "type_code"
_MONTH_DAY_NANO = pa.month_day_nano_interval()
_DECIMAL_DIGITS = 38  # DuckDB's widest DECIMAL


def needs_carrier(kind: pa.DataType) -> bool:
    """Whether a column of ``kind`` is stored as another type (see the module docstring)."""
    if _is_own_carrier(kind):
        return True
    if pa.types.is_dictionary(kind):
        return needs_carrier(kind.value_type)
    return any(needs_carrier(kind.field(i).type) for i in range(kind.num_fields))


def carrier_type(kind: pa.DataType) -> pa.DataType:
    """The type a column of ``kind`` is stored as (``kind`` itself when DuckDB holds it)."""
    if not needs_carrier(kind):
        return kind
    if isinstance(kind, pa.BaseExtensionType):
        return carrier_type(kind.storage_type)
    if kind == pa.float16():
        return pa.float32()
    if pa.types.is_duration(kind):
        return pa.int64()
    if pa.types.is_decimal256(kind):
        if kind.precision <= _DECIMAL_DIGITS:
            return pa.decimal128(kind.precision, kind.scale)
        return pa.string()
    if kind == _MONTH_DAY_NANO:
        return pa.binary(16)
    if pa.types.is_run_end_encoded(kind) or pa.types.is_dictionary(kind):
        return carrier_type(kind.value_type)
    if pa.types.is_union(kind):
        members = [pa.field(_TYPE_CODE, pa.int8(), nullable=False)]
        for name, i in zip(_member_names(kind), range(kind.num_fields), strict=True):
            members.append(pa.field(name, carrier_type(kind.field(i).type)))
        return pa.struct(members)
    if pa.types.is_list_view(kind):
        return pa.list_(_carried(kind.value_field))
    if pa.types.is_large_list_view(kind):
        return pa.large_list(_carried(kind.value_field))
    if pa.types.is_list(kind):
        return pa.list_(_carried(kind.value_field))
    if pa.types.is_large_list(kind):
        return pa.large_list(_carried(kind.value_field))
    if pa.types.is_fixed_size_list(kind):
        return pa.list_(_carried(kind.value_field), kind.list_size)
    if pa.types.is_map(kind):
        return pa.map_(_carried(kind.key_field), _carried(kind.item_field), kind.keys_sorted)
    if pa.types.is_struct(kind):
        return pa.struct([_carried(kind.field(i)) for i in range(kind.num_fields)])
    raise TypeError(f"no carrier for {kind}")  # pragma: no cover - needs_carrier said there is


def encode(column: pa.ChunkedArray, kind: pa.DataType) -> pa.ChunkedArray:
    """``column`` (of ``kind``) as its carrier; ``column`` itself when it needs none."""
    if not needs_carrier(kind):
        return column
    return pa.chunked_array([_encode(chunk, kind) for chunk in column.chunks], carrier_type(kind))


def decode(column: pa.ChunkedArray, kind: pa.DataType) -> pa.ChunkedArray:
    """``column`` read from DuckDB as the exact Arrow type ``kind`` it was stored from."""
    return pa.chunked_array([_decode(chunk, kind) for chunk in column.chunks], kind)


# -- one chunk --------------------------------------------------------------------------------


def _is_own_carrier(kind: pa.DataType) -> bool:
    """Whether ``kind`` itself (not only its children) is stored as another type."""
    return (
        isinstance(kind, pa.BaseExtensionType)
        or kind == pa.float16()
        or pa.types.is_duration(kind)
        or pa.types.is_decimal256(kind)
        or kind == _MONTH_DAY_NANO
        or pa.types.is_union(kind)
        or pa.types.is_run_end_encoded(kind)
        or pa.types.is_list_view(kind)
        or pa.types.is_large_list_view(kind)
    )


def _carried(field: pa.Field) -> pa.Field:
    return field.with_type(carrier_type(field.type))


def _member_names(kind: pa.UnionType) -> list[str]:
    """The carrier's field of each union member: its name when DuckDB can tell them apart."""
    names = [kind.field(i).name for i in range(kind.num_fields)]
    lowered = [name.lower() for name in names]
    if all(lowered) and len(set(lowered)) == len(names) and _TYPE_CODE not in lowered:
        return names
    return [f"member_{i}" for i in range(len(names))]


def _mask(chunk: pa.Array) -> pa.Array | None:
    return chunk.is_null() if chunk.null_count else None


def _list_parts(chunk: pa.Array) -> tuple[pa.Array, pa.Array]:
    """The offsets (from 0) and the values of a list or map chunk, without its slice offset."""
    offsets = chunk.offsets
    start = offsets[0].as_py()
    values = chunk.values.slice(start, offsets[len(chunk)].as_py() - start)
    # A new array even from 0: a slice's offsets keep an offset of their own.
    return pc.subtract(offsets, offsets[0]), values


def _fixed_values(chunk: pa.Array) -> pa.Array:
    size = chunk.type.list_size
    return chunk.values.slice(chunk.offset * size, len(chunk) * size)


def _encode(chunk: pa.Array, kind: pa.DataType) -> pa.Array:
    if not needs_carrier(kind):
        return chunk
    target = carrier_type(kind)
    if isinstance(kind, pa.BaseExtensionType):
        return _encode(chunk.storage, kind.storage_type)
    if kind == _MONTH_DAY_NANO:
        # The same 16 bytes a value, seen as binary: no copy.
        return pa.Array.from_buffers(
            target, len(chunk), chunk.buffers()[:2], chunk.null_count, chunk.offset
        )
    if pa.types.is_run_end_encoded(kind):
        return _encode(pc.run_end_decode(chunk), kind.value_type)
    if pa.types.is_dictionary(kind):
        return _encode(chunk.dictionary_decode(), kind.value_type)
    if pa.types.is_union(kind):
        return _encode_union(chunk, kind, target)
    if pa.types.is_list_view(kind) or pa.types.is_large_list_view(kind):
        sizes = pc.fill_null(pc.list_value_length(chunk), 0)
        offsets = pa.concat_arrays(
            [pa.array([0], sizes.type), pc.cumulative_sum(sizes).cast(sizes.type)]
        )
        values = _encode(pc.list_flatten(chunk), kind.value_type)
        return _list_class(target).from_arrays(offsets, values, type=target, mask=_mask(chunk))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        offsets, values = _list_parts(chunk)
        values = _encode(values, kind.value_type)
        return _list_class(target).from_arrays(offsets, values, type=target, mask=_mask(chunk))
    if pa.types.is_fixed_size_list(kind):
        values = _encode(_fixed_values(chunk), kind.value_type)
        return pa.FixedSizeListArray.from_arrays(values, type=target, mask=_mask(chunk))
    if pa.types.is_map(kind):
        offsets, entries = _list_parts(chunk)
        keys = _encode(entries.field(0), kind.key_type)
        items = _encode(entries.field(1), kind.item_type)
        return pa.MapArray.from_arrays(offsets, keys, items, type=target, mask=_mask(chunk))
    if pa.types.is_struct(kind):
        children = [_encode(chunk.field(i), kind.field(i).type) for i in range(kind.num_fields)]
        return pa.StructArray.from_arrays(children, fields=list(target), mask=_mask(chunk))
    return chunk.cast(target)  # float16, duration, decimal256


def _encode_union(chunk: pa.Array, kind: pa.UnionType, target: pa.StructType) -> pa.Array:
    # From the buffers: ``type_codes`` and ``offsets`` ignore a slice's offset.
    buffers = chunk.buffers()
    codes = pa.Array.from_buffers(pa.int8(), len(chunk), [None, buffers[1]], 0, chunk.offset)
    dense = kind.mode == "dense"
    if dense:
        offsets = pa.Array.from_buffers(pa.int32(), len(chunk), [None, buffers[2]], 0, chunk.offset)
    members = []
    for i, code in enumerate(kind.type_codes):
        member = chunk.field(i)
        if dense:
            # The member's value where the row is of that member, null elsewhere.
            hit = pc.equal(codes, pa.scalar(code, pa.int8()))
            member = member.take(pc.if_else(hit, offsets, pa.scalar(None, pa.int32())))
        members.append(_encode(member, kind.field(i).type))
    return pa.StructArray.from_arrays([codes, *members], fields=list(target))


def _decode(chunk: pa.Array, kind: pa.DataType) -> pa.Array:
    if pa.types.is_null(kind):
        return pa.nulls(len(chunk))
    if not needs_carrier(kind):
        return chunk.cast(kind)
    if isinstance(kind, pa.BaseExtensionType):
        return kind.wrap_array(_decode(chunk, kind.storage_type))
    if kind == _MONTH_DAY_NANO:
        raw = chunk.cast(pa.binary(16))
        return pa.Array.from_buffers(kind, len(raw), raw.buffers()[:2], raw.null_count, raw.offset)
    if pa.types.is_run_end_encoded(kind):
        values = _decode(chunk, kind.value_type)
        return pc.run_end_encode(values, run_end_type=kind.run_end_type).cast(kind)
    if pa.types.is_dictionary(kind):
        values = _decode(chunk, kind.value_type)
        encoded = pc.dictionary_encode(values)
        indices = encoded.indices.cast(kind.index_type)
        return pa.DictionaryArray.from_arrays(indices, encoded.dictionary, ordered=kind.ordered)
    if pa.types.is_union(kind):
        return _decode_union(chunk, kind)
    if pa.types.is_list_view(kind) or pa.types.is_large_list_view(kind):
        offsets, values = _list_parts(chunk)
        offsets = offsets.cast(pa.int64() if pa.types.is_large_list_view(kind) else pa.int32())
        sizes = pc.subtract(offsets[1:], offsets[:-1])
        values = _decode(values, kind.value_type)
        array_class = (
            pa.LargeListViewArray if pa.types.is_large_list_view(kind) else pa.ListViewArray
        )
        return array_class.from_arrays(offsets[:-1], sizes, values, type=kind, mask=_mask(chunk))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        offsets, values = _list_parts(chunk)
        offsets = offsets.cast(pa.int64() if pa.types.is_large_list(kind) else pa.int32())
        values = _decode(values, kind.value_type)
        return _list_class(kind).from_arrays(offsets, values, type=kind, mask=_mask(chunk))
    if pa.types.is_fixed_size_list(kind):
        values = _decode(_fixed_values(chunk), kind.value_type)
        return pa.FixedSizeListArray.from_arrays(values, type=kind, mask=_mask(chunk))
    if pa.types.is_map(kind):
        offsets, entries = _list_parts(chunk)
        keys = _decode(entries.field(0), kind.key_type)
        items = _decode(entries.field(1), kind.item_type)
        return pa.MapArray.from_arrays(offsets, keys, items, type=kind, mask=_mask(chunk))
    if pa.types.is_struct(kind):
        children = [_decode(chunk.field(i), kind.field(i).type) for i in range(kind.num_fields)]
        return pa.StructArray.from_arrays(children, fields=list(kind), mask=_mask(chunk))
    return chunk.cast(kind)  # float16, duration, decimal256


def _decode_union(chunk: pa.Array, kind: pa.UnionType) -> pa.Array:
    # A null row (stored before the column existed) is a null of the first member, as Arrow
    # makes it (a union has no nulls of its own).
    parts = chunk.flatten()
    first = pa.scalar(kind.type_codes[0], pa.int8())
    # From offset 0: a union's offset applies to its members too.
    codes = pa.concat_arrays([pc.fill_null(parts[0].cast(pa.int8()), first)])
    members = [_decode(parts[i + 1], kind.field(i).type) for i in range(kind.num_fields)]
    names = [kind.field(i).name for i in range(kind.num_fields)]
    type_codes = list(kind.type_codes)
    if kind.mode == "sparse":
        union = pa.UnionArray.from_sparse(codes, members, names, type_codes)
    else:
        offsets = pa.nulls(len(codes), pa.int32())
        compact = []
        for member, code in zip(members, type_codes, strict=True):
            hit = pc.equal(codes, pa.scalar(code, pa.int8()))
            # The n-th row of a member is its n-th value.
            rank = pc.subtract(pc.cumulative_sum(hit.cast(pa.int32())), 1)
            offsets = pc.if_else(hit, rank, offsets)
            compact.append(member.filter(hit))
        union = pa.UnionArray.from_dense(
            codes, offsets.cast(pa.int32()), compact, names, type_codes
        )
    # The members' nullability and metadata: same layout, so a view.
    return union.view(kind)


def _list_class(kind: pa.DataType) -> type[pa.Array]:
    large = pa.types.is_large_list(kind) or pa.types.is_large_list_view(kind)
    array_class: type[pa.Array] = pa.LargeListArray if large else pa.ListArray
    return array_class
