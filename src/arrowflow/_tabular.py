"""What counts as a table, and how anything Arrow-shaped becomes one without a copy.

Rules:

- ``pa.Table`` is used as it is; ``pa.RecordBatch`` is wrapped (no copy); view types aside
  (below).
- ``pa.RecordBatchReader`` stays a reader: the executor pulls its batches lazily.
- Lazy inputs stay lazy (below): a DuckDB relation, a polars ``LazyFrame`` and a
  ``pyarrow.dataset.Dataset`` become a ``RecordBatchReader`` read batch by batch as streams are
  cut, never collected whole first; where a table is wanted whole (:func:`to_table`), each is
  converted by its library's own fastest way to a table.
- Objects exporting ``__arrow_c_stream__``: in-memory data frames (polars, pandas) are
  converted to a ``pa.Table`` (zero-copy where their buffers allow) so the number of rows, and
  therefore of streams, is known up front; any other exporter is read lazily as a
  ``RecordBatchReader``, since computing its length may run it.
- Objects exporting only ``__arrow_c_array__`` become a one-batch table.
- A list of dicts is tabular only where the caller says so (the field named by ``over=``); an
  empty list is a table with no rows and no columns.

Arrow view types, which polars exports and most Arrow kernels (filter, take, sort, ``is_in``)
and the Parquet writer do not handle yet, are normalised on the way in:

=====================================  ===================
view type                              becomes
=====================================  ===================
``string_view``                        ``large_string``
``binary_view``                        ``large_binary``
``list_view<T>``, ``large_list_view``  ``large_list<T>``
=====================================  ===================

Large types, because a view column's values may add up to more than 32-bit offsets address
(list views may even overlap). Views nested in a struct, a list, a map or a dictionary's values
are normalised too (a polars ``Categorical`` arrives as ``dictionary<values=string_view>``
and leaves as ``dictionary<values=large_string>``, its dictionary and indices kept). The layouts
differ, so a view column is copied once; every other column is kept as it is, and a table
without view types is returned unchanged (one look at its schema). A reader stays lazy: each
batch is converted as it is pulled. Run-end-encoded and union columns holding views are left as
they are, since Arrow cannot cast them. Dictionary-encoded columns are kept encoded; code that
compares values (keys) decodes them with :func:`decoded`.

String and binary views go through Arrow's cast. List views do not: Arrow's cast from a list
view to a list (pyarrow 26 at least) builds an offsets buffer one entry short, an invalid
array, so their values are gathered with ``list_flatten`` and the offsets rebuilt from the
lengths.

Lazy inputs, recognised by their type in the modules already imported (checking never imports
polars, DuckDB or ``pyarrow.dataset``), are read in batches of the scope's stream size, kept
between 8,192 and 65,536 rows: the stream cutter then holds one stream and one batch, and the
library its own few batches (measured with DuckDB: three to four batches' worth, whatever the
size of the input; batches of a whole large stream would make that four streams):

- A DuckDB relation: ``relation.to_arrow_reader(batch_size)``, DuckDB's streaming reader
  (DuckDB 2.0). ``__arrow_c_stream__`` streams too in DuckDB 2.0, but takes no batch size and
  collected the whole result in DuckDB 1.5 (duckdb-python#342). The query starts when the
  scope starts and its connection stays busy until the last stream is cut: another query on
  that connection meanwhile raises DuckDB's ``ResourceInUseException``, so agents that query
  DuckDB use a cursor (``con.cursor()``) or another connection. Its rows are not counted (that
  would run the query twice): ``total`` is known at the last stream.
- A polars ``LazyFrame``: ``collect_batches(chunk_size=..., engine="streaming")``, started when
  the first stream is cut, on polars' streaming engine named
  explicitly (polars 1.39 ran ``"auto"`` on the in-memory engine, which collects the whole
  frame before the first batch: pola-rs/polars#26930). Rows are not counted. polars' Parquet
  scan decodes row groups ahead of what is pulled from it (about 150 MB on two threads, growing
  slowly with the input: pola-rs/polars#28569), memory of polars' own. polars before 1.34 has no
  way to pull a lazy frame's rows batch by batch (slicing it, ``lf.slice(offset, n).collect()``
  per batch, re-reads every file of a multi-file scan per batch: 16,000,000 rows in
  100,000-row slices took 156 s and 1.1 GB at peak on polars 1.3), hence the ``polars>=1.34``
  of the ``polars`` extra.
- A ``pyarrow.dataset.Dataset``: its scanner's reader, reading one batch and one file ahead
  (Arrow's defaults read 16 batches of 4 files ahead), without pre-buffering for Parquet files
  on the local disk when the dataset keeps Arrow's default Parquet options (as
  :func:`~arrowflow.scan_parquet` reads them); order is kept. Its row count is announced when
  metadata gives it for free: an in-memory dataset, or Parquet files without a filter (their
  footers, as ``scan_parquet``); and then the key column a state store asks for is read alone.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, TypeGuard

import pyarrow as pa
import pyarrow.compute as pc

from arrowflow._row_counts import carry_num_rows, reader_with_num_rows

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = [
    "MAX_BATCH_ROWS",
    "MIN_BATCH_ROWS",
    "decoded",
    "describe",
    "is_tabular",
    "to_table",
    "to_table_or_reader",
    "value_type",
    "without_views",
]

# Libraries whose data frames live in memory: their length is free, so converting them to a
# table up front is cheap and gives every stream its total. Matched on the module name so that
# checking never imports them.
_IN_MEMORY_FRAME_MODULES = ("polars", "pandas")


def is_tabular(value: Any, *, allow_records: bool = False) -> bool:
    """Whether ``value`` is Arrow-shaped (or, when ``allow_records``, a list of dicts)."""
    if isinstance(value, pa.Table | pa.RecordBatch | pa.RecordBatchReader):
        return True
    if isinstance(value, type):
        return False
    if hasattr(value, "__arrow_c_stream__") or hasattr(value, "__arrow_c_array__"):
        return True
    return _lazy_source(value) is not None or (allow_records and _is_records(value))


def _is_records(value: Any) -> TypeGuard[list[dict[str, Any]]]:
    # A list of dicts: only the first element is checked; pyarrow reports any later mismatch.
    return isinstance(value, list) and (not value or isinstance(value[0], dict))


def _is_in_memory_frame(value: Any) -> bool:
    module = type(value).__module__.partition(".")[0]
    return module in _IN_MEMORY_FRAME_MODULES


def to_table_or_reader(
    value: Any, batch_size: int | None = None
) -> pa.Table | pa.RecordBatchReader:
    """Convert a tabular value, keeping lazy sources lazy (see the module docstring).

    ``batch_size`` is the number of rows a lazy input is asked for at a time (a scope gives its
    stream size), kept between :data:`MIN_BATCH_ROWS` and :data:`MAX_BATCH_ROWS`.
    """
    if isinstance(value, pa.Table):
        return without_views(value)
    if isinstance(value, pa.RecordBatchReader):
        return _reader_without_views(value)
    if isinstance(value, pa.RecordBatch):
        return without_views(pa.Table.from_batches([value]))
    lazy = _lazy_source(value)
    if lazy is not None:
        rows = min(max(batch_size or MAX_BATCH_ROWS, MIN_BATCH_ROWS), MAX_BATCH_ROWS)
        converted = lazy.reader(value, rows)
        if isinstance(converted, pa.Table):
            return without_views(converted)
        return _reader_without_views(converted)
    if hasattr(value, "__arrow_c_stream__"):
        if _is_in_memory_frame(value):
            return without_views(pa.table(value))
        return _reader_without_views(pa.RecordBatchReader.from_stream(value))
    if hasattr(value, "__arrow_c_array__"):
        return without_views(pa.Table.from_batches([pa.record_batch(value)]))
    if _is_records(value):
        # pyarrow infers no view type from Python values.
        return pa.Table.from_pylist(value) if value else pa.table({})
    raise TypeError(f"expected an Arrow table or something Arrow-shaped, got {describe(value)}")


def to_table(value: Any) -> pa.Table:
    """Convert a tabular value to a ``pa.Table``, reading a lazy source to its end."""
    lazy = _lazy_source(value)
    if lazy is not None:
        return without_views(lazy.whole(value))
    converted = to_table_or_reader(value)
    if isinstance(converted, pa.RecordBatchReader):
        return converted.read_all()
    return converted


def describe(value: Any) -> str:
    """A short description of a value's type for error messages: ``int``, ``polars.DataFrame``."""
    kind = type(value)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


# -- lazy inputs -----------------------------------------------------------------------------

#: The fewest rows a lazy input is asked for at a time: smaller batches cost DuckDB and polars
#: more per row than they save in memory.
MIN_BATCH_ROWS = 8_192
#: The most: what a lazy input's library holds beside the batch it hands out grows with the
#: batch (DuckDB holds about four), not with the stream, which is cut from several batches.
MAX_BATCH_ROWS = 65_536


class _LazySource(NamedTuple):
    """A library's lazy type (found as ``module.name``), read in batches or whole."""

    module: str
    name: str
    reader: Callable[[Any, int], pa.RecordBatchReader | pa.Table]
    whole: Callable[[Any], pa.Table]


def _lazy_source(value: Any) -> _LazySource | None:
    # A type whose module is not imported has no instance: checking imports nothing.
    for source in _LAZY_SOURCES:
        kind = getattr(sys.modules.get(source.module), source.name, None)
        if isinstance(kind, type) and isinstance(value, kind):
            return source
    return None


def _relation_reader(relation: Any, batch_size: int) -> pa.RecordBatchReader:
    reader: pa.RecordBatchReader = relation.to_arrow_reader(batch_size)
    return reader


def _relation_table(relation: Any) -> pa.Table:
    table: pa.Table = relation.to_arrow_table()
    return table


def _lazy_frame_reader(frame: Any, batch_size: int) -> pa.RecordBatchReader:
    polars = sys.modules["polars"]
    # From the schema alone: ``clear()`` is ``limit(0)`` in newer polars, which runs the plan.
    schema = polars.DataFrame(schema=frame.collect_schema()).to_arrow().schema
    return pa.RecordBatchReader.from_batches(schema, _lazy_frame_batches(frame, schema, batch_size))


def _lazy_frame_batches(frame: Any, schema: pa.Schema, batch_size: int) -> Iterator[pa.RecordBatch]:
    # Started on the first pull, not when the scope starts: a run that fails before its first
    # stream leaves no query running.
    frames = frame.collect_batches(chunk_size=batch_size, engine="streaming")
    try:
        for chunk in frames:
            for batch in chunk.to_arrow().to_batches():
                yield _conformed(batch, schema)
    finally:
        # Where the query runs on a thread of polars' Python code, it runs on unless stopped;
        # later polars, whose batches have no ``stop``, stops it when they are dropped.
        stop = getattr(frames, "stop", None)
        if stop is not None:
            stop()


def _lazy_frame_table(frame: Any) -> pa.Table:
    table: pa.Table = frame.collect().to_arrow()
    return table


def _conformed(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` with ``schema``'s types and metadata (polars may tag a batch's categorical
    column otherwise than an empty frame's)."""
    if batch.schema.equals(schema, check_metadata=True):
        return batch
    columns = [
        column if column.type.equals(field.type) else column.cast(field.type)
        for column, field in zip(batch.columns, schema, strict=True)
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _dataset_reader(dataset: Any, batch_size: int) -> pa.RecordBatchReader:
    scanner = dataset.scanner(
        batch_size=batch_size,
        batch_readahead=1,
        fragment_readahead=1,
        **_fragment_scan_options(dataset),
    )
    reader: pa.RecordBatchReader = scanner.to_reader()
    num_rows = _dataset_num_rows(dataset)
    if num_rows is None:
        return reader
    return reader_with_num_rows(reader.schema, reader, num_rows, partial(_dataset_column, dataset))


def _dataset_table(dataset: Any) -> pa.Table:
    table: pa.Table = dataset.to_table()
    return table


def _fragment_scan_options(dataset: Any) -> dict[str, Any]:
    import pyarrow.dataset as ds
    import pyarrow.fs

    file_format = getattr(dataset, "format", None)
    if (
        isinstance(file_format, ds.ParquetFileFormat)
        and isinstance(dataset.filesystem, pyarrow.fs.LocalFileSystem)
        and file_format.default_fragment_scan_options == ds.ParquetFragmentScanOptions()
    ):
        return {"fragment_scan_options": ds.ParquetFragmentScanOptions(pre_buffer=False)}
    return {}


def _dataset_num_rows(dataset: Any) -> int | None:
    """The dataset's rows when metadata tells them without reading data, else ``None``."""
    import pyarrow.dataset as ds

    # A filter (``Dataset.filter``) is kept in ``_scan_options``; a filtered dataset counts its
    # rows by reading them, and so does one whose options cannot be seen.
    options = getattr(dataset, "_scan_options", None)
    if not isinstance(options, dict) or options.get("filter") is not None:
        return None
    file_format = getattr(dataset, "format", None)
    if isinstance(dataset, ds.InMemoryDataset) or isinstance(file_format, ds.ParquetFileFormat):
        num_rows: int = dataset.count_rows()
        return num_rows
    return None


def _dataset_column(dataset: Any, name: str) -> pa.ChunkedArray:
    column: pa.ChunkedArray = without_views(dataset.to_table(columns=[name]))[name]
    return column


_LAZY_SOURCES = (
    _LazySource("duckdb", "DuckDBPyRelation", _relation_reader, _relation_table),
    _LazySource("polars", "LazyFrame", _lazy_frame_reader, _lazy_frame_table),
    _LazySource("pyarrow._dataset", "Dataset", _dataset_reader, _dataset_table),
)


# -- view types ------------------------------------------------------------------------------


def without_views(table: pa.Table) -> pa.Table:
    """``table`` with its view-typed columns converted (module docstring); ``table`` itself
    when it has none.

    Example:
        >>> import pyarrow as pa
        >>> table = pa.table({"s": pa.array(["a", "b"], pa.string_view()), "n": [1, 2]})
        >>> without_views(table).schema.types
        [DataType(large_string), DataType(int64)]
    """
    schema = _schema_without_views(table.schema)
    if schema is None:
        return table
    columns = [
        column if column.type.equals(field.type) else _chunked_without_views(column, field.type)
        for column, field in zip(table.columns, schema, strict=True)
    ]
    return pa.Table.from_arrays(columns, schema=schema)


# Type ids of the views without children, with what they become.
_FLAT_VIEWS = {
    pa.string_view().id: pa.large_string(),
    pa.binary_view().id: pa.large_binary(),
}
_DICTIONARY = pa.dictionary(pa.int32(), pa.string()).id


def _reader_without_views(reader: pa.RecordBatchReader) -> pa.RecordBatchReader:
    schema = _schema_without_views(reader.schema)
    if schema is None:
        return reader
    wrapped = pa.RecordBatchReader.from_batches(schema, _batches_without_views(reader, schema))
    carry_num_rows(reader, wrapped)
    return wrapped


def _batches_without_views(
    reader: pa.RecordBatchReader, schema: pa.Schema
) -> Iterator[pa.RecordBatch]:
    for batch in reader:
        columns = [
            column if column.type.equals(field.type) else _array_without_views(column, field.type)
            for column, field in zip(batch.columns, schema, strict=True)
        ]
        yield pa.RecordBatch.from_arrays(columns, schema=schema)


def _schema_without_views(schema: pa.Schema) -> pa.Schema | None:
    """``schema`` with view types replaced, or ``None`` when it has none."""
    # Every view type prints with "_view" (string_view, list_view<...>): one C++ call rules
    # them out for the usual schema, several times cheaper than walking its types.
    text = schema.to_string(show_field_metadata=False, show_schema_metadata=False)
    if "_view" not in text:
        return None
    plain = [_type_without_views(data_type) for data_type in schema.types]
    if all(data_type is None for data_type in plain):
        return None
    return pa.schema(
        [
            field if data_type is None else field.with_type(data_type)
            for field, data_type in zip(schema, plain, strict=True)
        ],
        metadata=schema.metadata,
    )


def _field_without_views(field: pa.Field) -> pa.Field | None:
    plain = _type_without_views(field.type)
    return None if plain is None else field.with_type(plain)


def _type_without_views(data_type: pa.DataType) -> pa.DataType | None:
    """``data_type`` with view types replaced, or ``None`` when it holds none.

    ``None`` rather than the type itself: pyarrow hands out a new wrapper on every access, so
    "unchanged" cannot be told by identity, and comparing types would walk them twice.
    """
    kind = data_type.id
    if kind in _FLAT_VIEWS:
        return _FLAT_VIEWS[kind]
    if kind != _DICTIONARY and data_type.num_fields == 0:
        return None  # the usual case, decided without walking the predicates below
    types = pa.types
    if types.is_list_view(data_type) or types.is_large_list_view(data_type):
        return pa.large_list(_field_without_views(data_type.value_field) or data_type.value_field)
    if types.is_list(data_type) or types.is_large_list(data_type):
        value = _field_without_views(data_type.value_field)
        if value is None:
            return None
        return pa.list_(value) if types.is_list(data_type) else pa.large_list(value)
    if types.is_fixed_size_list(data_type):
        value = _field_without_views(data_type.value_field)
        return None if value is None else pa.list_(value, data_type.list_size)
    if types.is_map(data_type):
        key = _field_without_views(data_type.key_field)
        item = _field_without_views(data_type.item_field)
        if key is None and item is None:
            return None
        return pa.map_(
            key or data_type.key_field,
            item or data_type.item_field,
            keys_sorted=data_type.keys_sorted,
        )
    if types.is_struct(data_type):
        fields = [_field_without_views(field) for field in data_type]
        if all(field is None for field in fields):
            return None
        return pa.struct([new or old for new, old in zip(fields, list(data_type), strict=True)])
    if types.is_dictionary(data_type):
        values = _type_without_views(data_type.value_type)
        if values is None:
            return None
        return pa.dictionary(data_type.index_type, values, data_type.ordered)
    return None


def _chunked_without_views(column: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray:
    return pa.chunked_array(
        [_array_without_views(chunk, target) for chunk in column.chunks], type=target
    )


def _array_without_views(array: pa.Array, target: pa.DataType) -> pa.Array:
    """``array`` as ``target``, its type with views replaced (see the module docstring)."""
    kind = array.type
    if not _holds_list_view(kind):
        return array.cast(target)
    types = pa.types
    nulls = pc.is_null(array) if array.null_count else None
    if types.is_list_view(kind) or types.is_large_list_view(kind):
        values = _array_without_views(pc.list_flatten(array), target.value_type)
        lengths = pc.fill_null(pc.list_value_length(array), 0).cast(pa.int64())
        start = pa.array([0], pa.int64())
        offsets = pa.concat_arrays([start, pc.cumulative_sum(lengths)])
        return pa.LargeListArray.from_arrays(offsets, values, type=target, mask=nulls)
    if types.is_list(kind) or types.is_large_list(kind):
        offsets, (values,) = _rebased(array.offsets, array.values)
        values = _array_without_views(values, target.value_type)
        lists = pa.ListArray if types.is_list(kind) else pa.LargeListArray
        return lists.from_arrays(offsets, values, type=target, mask=nulls)
    if types.is_fixed_size_list(kind):
        size = kind.list_size
        values = array.values.slice(array.offset * size, len(array) * size)
        converted = _array_without_views(values, target.value_type)
        return pa.FixedSizeListArray.from_arrays(converted, type=target, mask=nulls)
    if types.is_map(kind):
        offsets, (keys, items) = _rebased(array.offsets, array.keys, array.items)
        keys = _array_without_views(keys, target.key_type)
        items = _array_without_views(items, target.item_type)
        return pa.MapArray.from_arrays(offsets, keys, items, type=target, mask=nulls)
    if types.is_struct(kind):
        children = [
            _array_without_views(array.field(index), target.field(index).type)
            for index in range(kind.num_fields)
        ]
        return pa.StructArray.from_arrays(children, fields=list(target), mask=nulls)
    if types.is_dictionary(kind):
        dictionary = _array_without_views(array.dictionary, target.value_type)
        return pa.DictionaryArray.from_arrays(array.indices, dictionary, ordered=kind.ordered)
    return array.cast(target)


def _rebased(offsets: pa.Array, *children: pa.Array) -> tuple[pa.Array, list[pa.Array]]:
    """Offsets starting at 0 and the part of ``children`` they cover: a slice's offsets index
    its parent's children, and Arrow builds no list from sliced offsets and a null mask."""
    first, last = offsets[0].as_py(), offsets[-1].as_py()
    rebased = pc.subtract(offsets, pa.scalar(first, offsets.type))
    return rebased, [child.slice(first, last - first) for child in children]


def _holds_list_view(data_type: pa.DataType) -> bool:
    if pa.types.is_list_view(data_type) or pa.types.is_large_list_view(data_type):
        return True
    if pa.types.is_dictionary(data_type):
        return _holds_list_view(data_type.value_type)
    return any(
        _holds_list_view(data_type.field(index).type) for index in range(data_type.num_fields)
    )


# -- dictionary-encoded values -----------------------------------------------------------------


def value_type(data_type: pa.DataType) -> pa.DataType:
    """The type of the values a column holds: a dictionary's value type, else the type itself."""
    if pa.types.is_dictionary(data_type):
        return data_type.value_type
    return data_type


def decoded(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """``values`` with a dictionary encoding undone (as they are otherwise).

    Keys compare by value: the same value may have another code in another chunk, another
    frame or another run (a pandas ``Categorical`` with its categories in another order), and
    Arrow's hash kernels with a dictionary value set want plain values.
    """
    if pa.types.is_dictionary(values.type):
        return values.cast(values.type.value_type)
    return values
