"""Interop agents: a polars function or a DuckDB query as a step of a flow.

:func:`polars_agent` and :func:`sql_agent` return agent classes, like ``@af.agent``, so they
compose with ``>>``, take the streaming decorators and can stand anywhere in a flow. Each reads
one tabular field, ``over``, and writes its result back to it as a ``pa.Table``:

- inside a streaming scope, once per stream, on the stream's slice (the streamed field, unless
  ``over`` names another one);
- outside a scope, once, on the whole field.

With ``over=None`` the field is the scope's streamed field inside a scope, else the only tabular
field of the context (fields named in ``tables=`` left aside).

Tables cross without a copy where the libraries allow it (the Arrow C stream interface both ways
with polars, without rechunking; DuckDB's Arrow scans). The view types polars and DuckDB may
export (``string_view``…) come back as the types the rest of arrowflow works with
(``large_string``…).

polars is optional: it is imported when a polars agent is created, never by ``import
arrowflow``. DuckDB queries run on one in-memory connection per thread, opened on the thread's
first query and never shared with another thread, so streams running at once never wait for
each other's connection. A query sees ``batch`` and the fields named in ``tables=``, nothing
else: not the Python variables of the code running the flow, which DuckDB would otherwise find
by name.
"""

from __future__ import annotations

import atexit
import inspect
import json
import re
import threading
import typing
from contextlib import suppress
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import duckdb
import pyarrow as pa

from arrowflow._compat import import_optional
from arrowflow._invoke import in_stream
from arrowflow._tabular import describe, is_tabular, to_table, without_views
from arrowflow.agent import Agent
from arrowflow.exceptions import ConfigurationError, ExecutionError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping

    from arrowflow.context import Context

__all__ = ["polars_agent", "sql_agent"]

#: The name under which a SQL agent's query sees the table of its field ``over``.
STREAM_TABLE = "batch"

_CONVERTING = threading.Lock()  # held while a field that is not an Arrow table is converted

# How much of a query a SQL agent's default name shows, at most (cut at a space).
_NAME_CHARS = 48
# A first parameter annotated ``LazyFrame``, ``pl.LazyFrame`` or ``polars.LazyFrame``, when the
# annotation is a string that cannot be resolved (polars imported under ``TYPE_CHECKING``).
_LAZY_ANNOTATION = re.compile(r"(?:[\w.]+\.)?LazyFrame")


class _InteropAgent(Agent):
    """An agent reading a table from its field ``over`` and writing its result back to it."""

    _over: ClassVar[str | None] = None
    _tables: ClassVar[tuple[str, ...]] = ()

    def _field(self, context: Mapping[str, Any]) -> str:
        """The field to read and write: ``over``, else detected (module docstring)."""
        over = type(self)._over
        if over is not None:
            return over
        meta = context.get("_batch_metadata")
        if isinstance(meta, dict) and meta.get("array_field") is not None:
            return str(meta["array_field"])
        tables = type(self)._tables
        candidates = [
            name for name, value in context.items() if name not in tables and is_tabular(value)
        ]
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise ConfigurationError(
                f"Agent '{self.name}'{in_stream(context)}: no tabular field in the context to read "
                f"(fields: {_names(context)}). Set one before this agent, or name it with "
                "over='field'."
            )
        raise ConfigurationError(
            f"Agent '{self.name}'{in_stream(context)}: several tabular fields could be its input "
            f"({', '.join(candidates)}); choose one with over='{candidates[0]}'."
        )

    def _table(self, context: Mapping[str, Any], field: str, role: str) -> pa.Table:
        """Field ``field`` as a table; ``ExecutionError`` when it is absent or not tabular."""
        if field not in context:
            raise ExecutionError(
                f"Agent '{self.name}'{in_stream(context)}: field '{field}' ({role}) is not in the "
                f"context (fields: {_names(context)}). Set it before this agent, or fix the "
                "name given to the agent."
            )
        value = context[field]
        if not is_tabular(value, allow_records=True):
            raise ExecutionError(
                f"Agent '{self.name}'{in_stream(context)}: field '{field}' ({role}) must hold a "
                f"table, found {describe(value)}. Give it a pyarrow Table or a data frame, or "
                "name another field."
            )
        # A table goes as it is: polars and DuckDB read view types, and what they return is
        # normalised. Converting it again would cost a look at its schema per stream.
        if type(value) is pa.Table:
            return value
        # Streams running at once read the same frame (a lookup of ``tables=``): polars before
        # 1.41 deadlocks the interpreter exporting one frame from two threads, and a DuckDB
        # relation is tied to a connection that threads must not share. One at a time.
        with _CONVERTING:
            return to_table(value)


def _names(context: Mapping[str, Any]) -> str:
    return ", ".join(name for name in context if name != "_batch_metadata") or "none"


def _check_names(over: str | None, name: str | None) -> None:
    if over is not None and (not isinstance(over, str) or not over):
        raise ConfigurationError(f"over= names a field: a non-empty str, got {over!r}.")
    if name is not None and (not isinstance(name, str) or not name):
        raise ConfigurationError(f"name= is the agent's name: a non-empty str, got {name!r}.")


# -- polars ----------------------------------------------------------------------------------


class _PolarsAgent(_InteropAgent):
    """Calls a function on its field as a polars ``DataFrame`` (or ``LazyFrame``)."""

    _function: ClassVar[Callable[[Any], Any]]
    _lazy: ClassVar[bool]

    def call(self, context: Context) -> Mapping[str, Any] | None:
        pl = import_optional("polars", extra="polars")
        field = self._field(context)
        frame = pl.DataFrame(_ArrowStream(self._table(context, field, "over=")))
        returned = type(self)._function(frame.lazy() if type(self)._lazy else frame)
        if isinstance(returned, pl.LazyFrame):
            returned = returned.collect()
        if not isinstance(returned, pl.DataFrame):
            raise ConfigurationError(
                f"Agent '{self.name}'{in_stream(context)}: the function returned "
                f"{describe(returned)} for field '{field}'; return a polars DataFrame or "
                "LazyFrame (a Series becomes one with .to_frame())."
            )
        # Through the Arrow PyCapsule stream: polars' newest types (views), which
        # ``without_views`` turns into the usual ones, in about half the time ``to_arrow()``
        # takes on a 10,000-row frame of numbers (~8 µs against ~18).
        return {field: without_views(pa.table(returned))}


class _ArrowStream:
    """A table seen through the Arrow PyCapsule stream interface alone.

    polars imports such an object in one call into its Rust code: the same frame as
    ``pl.from_arrow(table, rechunk=False)`` (types, chunks, metadata) in about half the time
    (~10 µs against ~20 on 10,000 rows), ``pl.from_arrow`` reading the table's schema in
    Python first.
    """

    __slots__ = ("_table",)

    def __init__(self, table: pa.Table) -> None:
        self._table = table

    def __arrow_c_stream__(self, requested_schema: object | None = None) -> object:
        return self._table.__arrow_c_stream__(requested_schema)


def polars_agent(
    fn: Callable[[Any], Any], over: str | None = None, *, name: str | None = None
) -> type[Agent]:
    """Turn a function over a polars frame into an agent class.

    The agent hands field ``over`` to ``fn`` as a ``pl.DataFrame`` (the frame
    ``pl.from_arrow(table, rechunk=False)`` gives, no copy where polars allows), or as a
    ``pl.LazyFrame`` when ``fn``'s first parameter is annotated ``pl.LazyFrame`` (a string
    annotation too), and writes the frame ``fn`` returns (a ``LazyFrame`` is collected) back to
    the field as a ``pa.Table``. Inside a streaming scope it runs once per stream on the
    stream's rows.

    Args:
        fn: a function taking the frame and returning a ``pl.DataFrame`` or ``pl.LazyFrame``.
        over: the field to read and write. Default ``None``: the scope's streamed field inside
            a scope, else the only tabular field of the context.
        name: the agent's name in messages and reprs. Default: ``fn.__name__``.

    Returns:
        An :class:`~arrowflow.Agent` subclass, to compose with ``>>``.

    Raises:
        ConfigurationError: polars is not installed, ``fn`` takes no argument, or (when the
            agent runs) ``fn`` returned something other than a polars frame.

    Example:
        >>> import polars as pl
        >>> import pyarrow as pa
        >>> import arrowflow as af
        >>> def doubled(rows: pl.LazyFrame) -> pl.LazyFrame:
        ...     return rows.with_columns(y=pl.col("x") * 2).filter(pl.col("y") > 2)
        >>> rows = pa.table({"x": [1, 2, 3]})
        >>> af.Flow(af.polars_agent(doubled)).run(rows=rows)["rows"].to_pydict()
        {'x': [2, 3], 'y': [4, 6]}
        >>> streamed = af.intelligent_streaming(stream_size=2)(af.polars_agent(doubled))
        >>> af.Flow(streamed)
        Flow([doubled | stream_size=2 over=auto])
        >>> af.Flow(streamed).run(rows=rows)["rows"].to_pydict()
        {'x': [2, 3], 'y': [4, 6]}
    """
    import_optional("polars", extra="polars")
    if not callable(fn):
        raise ConfigurationError(f"polars_agent takes a function over a frame, got {fn!r}.")
    _check_names(over, name)
    label: str = name or str(getattr(fn, "__name__", type(fn).__name__))
    namespace = {
        "name": label,
        "_function": staticmethod(fn),
        "_over": over,
        "_lazy": _wants_lazy(fn, label),
        "__doc__": fn.__doc__,
        "__module__": getattr(fn, "__module__", __name__),
        "__qualname__": getattr(fn, "__qualname__", label),
    }
    return type(getattr(fn, "__name__", "PolarsAgent"), (_PolarsAgent,), namespace)


def _wants_lazy(fn: Callable[..., Any], label: str) -> bool:
    """Whether ``fn``'s first parameter is annotated ``pl.LazyFrame``."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or extension callable: no annotations to read
        return False
    if not parameters or parameters[0].kind in (
        inspect.Parameter.KEYWORD_ONLY,
        inspect.Parameter.VAR_KEYWORD,
    ):
        raise ConfigurationError(
            f"Agent '{label}': the function must take the frame as its first positional "
            "parameter, e.g. def f(frame: pl.DataFrame) -> pl.DataFrame."
        )
    first = parameters[0]
    annotation = first.annotation
    # Names that do not resolve (polars imported under TYPE_CHECKING, a later definition) leave
    # the annotation a string, read below.
    with suppress(Exception):
        annotation = typing.get_type_hints(fn).get(first.name, annotation)
    if isinstance(annotation, str):
        return _LAZY_ANNOTATION.fullmatch(annotation.strip().strip("'\"")) is not None
    if not str(getattr(annotation, "__module__", "")).startswith("polars"):
        return False
    pl = import_optional("polars", extra="polars")
    return isinstance(annotation, type) and issubclass(annotation, pl.LazyFrame)


# -- DuckDB ----------------------------------------------------------------------------------

# Each thread's connection, by thread. Not a ``threading.local``: that closes a connection on
# its thread as the thread ends, and a stream thread ending while the interpreter exits (the
# last run's, just released) then aborts the process inside DuckDB's destructor. Here the
# connections of ended threads are closed by the next thread that opens one, and at exit.
_connections: dict[threading.Thread, duckdb.DuckDBPyConnection] = {}
_connections_lock = threading.Lock()


def _close_connections(*, at_exit: bool = False) -> None:
    """Close the connections of the threads that ended (and, ``at_exit``, the exiting one's);
    those of threads still running (a stream abandoned at exit) may be in use: left alone."""
    current = threading.current_thread()
    with _connections_lock:
        done = [
            thread
            for thread in _connections
            if not thread.is_alive() or (at_exit and thread is current)
        ]
        closing = [_connections.pop(thread) for thread in done]
    for connection in closing:
        connection.close()


atexit.register(partial(_close_connections, at_exit=True))


def _connection() -> duckdb.DuckDBPyConnection:
    """This thread's in-memory DuckDB connection, opened on its first use.

    One per thread: a connection runs one query at a time, so threads sharing one would wait
    on each other. A query finds ``batch`` by a replacement scan (:func:`_scan`), which leaves
    nothing behind; tables it registers (``tables=``, and ``batch`` where the scan cannot find
    it) are registered on a cursor of the connection for that query alone: closing the cursor
    drops them (cheaper than unregistering them one by one), so no query sees the tables of
    another, and none outlives its query.
    """
    thread = threading.current_thread()
    connection = _connections.get(thread)
    if connection is not None:
        return connection
    connection = duckdb.connect()
    # A name that is no table of the catalog is looked up among the Python variables of the
    # frame running the query, _scan's, and of no other (the default, made sure of): not the
    # frames of the agent's callers.
    connection.execute("set global python_scan_all_frames = false")
    _close_connections()
    with _connections_lock:
        _connections[thread] = connection
    return connection


class _SQLAgent(_InteropAgent):
    """Runs a DuckDB query over its field, seen as table ``batch``."""

    _sql: ClassVar[str]
    _parameters: ClassVar[tuple[str, ...]]
    _scans_batch: ClassVar[bool]

    def call(self, context: Context) -> Mapping[str, Any] | None:
        cls = type(self)
        field = self._field(context)
        batch = self._table(context, field, "over=")
        tables = {table: self._table(context, table, "tables=") for table in cls._tables}
        parameters = {name: self._parameter(context, name) for name in cls._parameters}
        try:
            result = _query(cls._sql, parameters or None, batch, tables, cls._scans_batch)
        except duckdb.InterruptException:
            raise
        except duckdb.Error as exc:
            views = {STREAM_TABLE: batch, **tables}
            raise ExecutionError(self._failure(context, field, views, exc)) from exc
        return {field: without_views(result)}

    def _parameter(self, context: Mapping[str, Any], name: str) -> Any:
        if name not in context:
            raise ExecutionError(
                f"Agent '{self.name}'{in_stream(context)}: the query's parameter ${name} is not a "
                f"field of the context (fields: {_names(context)}). Set field '{name}' before "
                f"this agent, e.g. run({name}=...)."
            )
        value = context[name]
        # A pyarrow scalar (a value read from a table) binds as the Python value it holds.
        as_py = getattr(value, "as_py", None)
        return as_py() if callable(as_py) and not is_tabular(value) else value

    def _failure(
        self,
        context: Mapping[str, Any],
        field: str,
        views: Mapping[str, pa.Table],
        exc: duckdb.Error,
    ) -> str:
        columns = ", ".join(views[STREAM_TABLE].schema.names) or "none"
        seen = ", ".join(_quoted(view) for view in views)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not message.endswith((".", "!", "?")):
            message += "."
        return (
            f"Agent '{self.name}'{in_stream(context)}: the query over field '{field}' failed: "
            f"{message} Check it against the field's columns ({columns}) and the tables it "
            f"reads ({seen}); quote names that are not plain lower-case words."
        )


def _query(
    sql: str,
    parameters: dict[str, Any] | None,
    batch: pa.Table,
    tables: Mapping[str, pa.Table],
    scans_batch: bool,
) -> pa.Table:
    """``sql``'s result over ``batch`` and ``tables``, on this thread's connection."""
    connection = _connection()
    if scans_batch and not tables:
        # Nothing to register, so no cursor to drop it with: a query on a new cursor takes
        # ~150 µs more than on the connection.
        return _scan(batch, partial(connection.sql, sql, params=parameters))
    with connection.cursor() as cursor:
        if not scans_batch:
            cursor.register(STREAM_TABLE, batch)
        for name, table in tables.items():
            cursor.register(name, table)
        return _scan(batch, partial(cursor.sql, sql, params=parameters))


def _scan(batch: pa.Table, query: Callable[[], duckdb.DuckDBPyRelation]) -> pa.Table:
    """The result of ``query()``, a query that finds table ``batch`` among this frame's locals.

    DuckDB looks a table name its catalog does not hold up among the local, then global,
    variables of the frame running the query (a replacement scan): this frame, whose locals
    are ``batch`` and ``query`` and whose globals (this module's) hold no table, so another
    name is still unknown (or, for ``query`` and this module's names, refused as no table).
    Each thread runs its queries in frames of its own: concurrent queries find their own
    ``batch``. Registering ``batch`` instead creates a view, a statement of its own: ~250 µs a
    query, a fifth of the whole query on 10,000 rows.
    """
    result: pa.Table = query().to_arrow_table()
    return result


def _quoted(name: str) -> str:
    """``name`` as a SQL identifier: bare when it is a plain lower-case word."""
    if re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


def sql_agent(
    sql: str,
    over: str | None = None,
    *,
    tables: Iterable[str] = (),
    name: str | None = None,
) -> type[Agent]:
    """Turn a DuckDB query into an agent class.

    The query reads field ``over`` as the table ``batch``, and the fields named in ``tables``
    (Arrow tables, polars or pandas frames, anything Arrow-shaped) by their field names: quote a
    name that is not a plain word, ``select * from "Price list"``. Named parameters ``$name``
    are bound to the context fields of that name. The result is written back to ``over`` as a
    ``pa.Table``. Inside a streaming scope the query runs once per stream on the stream's rows.

    Rows keep their order through projections and filters; a join or an aggregation does not
    promise one, so add ``order by`` when it matters. Each thread runs its queries on its own
    in-memory DuckDB connection.

    Args:
        sql: one DuckDB query, e.g. ``"select *, x * 2 as y from batch where k > $min_k"``.
        over: the field to read and write. Default ``None``: the scope's streamed field inside
            a scope, else the only tabular field of the context outside ``tables``.
        tables: other fields the query reads, by their names.
        name: the agent's name in messages and reprs. Default: ``sql(`` and the start of the
            query.

    Returns:
        An :class:`~arrowflow.Agent` subclass, to compose with ``>>``.

    Raises:
        ConfigurationError: a query DuckDB cannot parse, several statements, positional
            parameters, or ``tables`` names that clash (with each other or ``batch``).

    Example:
        >>> import pyarrow as pa
        >>> import arrowflow as af
        >>> Labelled = af.sql_agent(
        ...     "select id, x * $factor as y, label from batch join codes using (k) order by id",
        ...     tables=["codes"],
        ... )
        >>> Labelled.name
        'sql(select id, x * $factor as y, label from batch…)'
        >>> result = af.Flow(Labelled).run(
        ...     rows=pa.table({"id": [1, 2, 3], "x": [1.5, 2.0, 3.0], "k": [1, 2, 1]}),
        ...     codes=pa.table({"k": [1, 2], "label": ["one", "two"]}),
        ...     factor=10,
        ... )
        >>> result["rows"].to_pylist()[0]
        {'id': 1, 'y': 15.0, 'label': 'one'}
    """
    if not isinstance(sql, str) or not sql.strip():
        raise ConfigurationError(f"sql_agent takes a DuckDB query, got {sql!r}.")
    _check_names(over, name)
    label = name or _default_name(sql)
    names = _table_names(label, tables)
    namespace = {
        "name": label,
        "_sql": sql,
        "_over": over,
        "_tables": names,
        "_parameters": _parameters(label, sql),
        "_scans_batch": _batch_is_scanned(sql),
        "__doc__": f"Runs a DuckDB query over field ``over``, seen as ``batch``: {sql}",
        "__module__": __name__,
        "__qualname__": "SQLAgent",
    }
    return type("SQLAgent", (_SQLAgent,), namespace)


def _default_name(sql: str) -> str:
    text = " ".join(sql.split())
    if len(text) > _NAME_CHARS:
        cut = text[: _NAME_CHARS + 1]
        text = (cut.rsplit(" ", 1)[0] if " " in cut else cut[:_NAME_CHARS]).rstrip() + "…"
    return f"sql({text})"


def _table_names(label: str, tables: Iterable[str]) -> tuple[str, ...]:
    """``tables`` as a tuple, checked: non-empty strings, distinct as DuckDB sees them."""
    names = tuple(dict.fromkeys((tables,) if isinstance(tables, str) else tables))
    seen = {STREAM_TABLE: STREAM_TABLE}
    for table in names:
        if not isinstance(table, str) or not table:
            raise ConfigurationError(
                f"Agent '{label}': tables= names fields, as non-empty strings; got {table!r}."
            )
        # DuckDB compares names without regard to case: "Codes" and "codes" are one table.
        clash = seen.setdefault(table.casefold(), table)
        if clash != table or table.casefold() == STREAM_TABLE:
            raise ConfigurationError(
                f"Agent '{label}': tables= field '{table}' clashes with '{clash}' (DuckDB "
                f"ignores case, and '{STREAM_TABLE}' is the field over=); rename the field."
            )
    return names


def _parameters(label: str, sql: str) -> tuple[str, ...]:
    """The named parameters of ``sql``; ``ConfigurationError`` for a query that will not run."""
    try:
        statements = _connection().extract_statements(sql)
    except duckdb.Error as exc:
        raise ConfigurationError(
            f"Agent '{label}': DuckDB cannot parse the query: {str(exc).strip()}"
        ) from exc
    if len(statements) != 1:
        raise ConfigurationError(
            f"Agent '{label}': the query must be one statement, found {len(statements)}; "
            "chain several agents, or combine the statements with a CTE (with ... select)."
        )
    found = sorted(statements[0].named_parameters)
    positional = [parameter for parameter in found if parameter.isdigit()]
    if positional:
        raise ConfigurationError(
            f"Agent '{label}': the query has positional parameters (? or $1); name them "
            "after context fields instead, e.g. where k > $min_k."
        )
    return tuple(found)


def _batch_is_scanned(sql: str) -> bool:
    """Whether ``sql`` names ``batch`` as the replacement scan looks it up (:func:`_scan`).

    The scan looks a name up as it is written, where DuckDB's catalog ignores case: a query
    reading ``Batch`` or ``temp.batch``, or one DuckDB cannot serialize (only selects are),
    gets ``batch`` registered as a view instead.
    """
    # Fetched to its end: a result left unfinished would hold the connection.
    ((serialized,),) = _connection().execute("select json_serialize_sql(?)", [sql]).fetchall()
    tree = json.loads(serialized)
    if tree.get("error", True):
        return False
    return all(
        (ref.get("catalog_name"), ref.get("schema_name"), ref.get("table_name"))
        == ("", "", STREAM_TABLE)
        for ref in _base_tables(tree)
        if str(ref.get("table_name", "")).casefold() == STREAM_TABLE
    )


def _base_tables(node: Any) -> Iterator[dict[str, Any]]:
    """The table references (``BASE_TABLE`` nodes) of a query serialized by DuckDB."""
    if isinstance(node, dict):
        if node.get("type") == "BASE_TABLE":
            yield node
        for value in node.values():
            yield from _base_tables(value)
    elif isinstance(node, list):
        for value in node:
            yield from _base_tables(value)
