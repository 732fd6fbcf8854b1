"""How flows, pipelines, results and state stores show themselves, and a plot of a run.

``repr()`` gives one readable text; notebooks call ``_repr_html_``, which these functions
render. The HTML is plain markup with inline styles, no script and no stylesheet, so it renders
alike in Jupyter, VS Code and on GitHub. Text keeps the notebook's own colour; borders and
backgrounds are translucent grey, and one mid blue marks the scopes, so it reads on light and
dark themes alike. Every string a user chose (agent and field names, values, errors) is escaped.
"""

from __future__ import annotations

import html
import reprlib
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import pyarrow as pa

from arrowflow._compat import import_optional
from arrowflow._row_counts import known_num_rows
from arrowflow._tabular import is_tabular
from arrowflow.exceptions import ConfigurationError

if TYPE_CHECKING:
    from arrowflow.flow import Flow
    from arrowflow.results import PipelineResult
    from arrowflow.scope import BatchingScope

__all__ = [
    "flow_html",
    "flow_text",
    "plot_streams",
    "properties_html",
    "result_html",
    "result_text",
]

#: Stream rows shown per scope in a result's HTML; ``result.streams()`` has them all.
SHOWN_STREAMS = 5

_FRAME = (
    "font-family:var(--jp-code-font-family,monospace);font-size:12px;line-height:1.5;"
    "display:inline-block;text-align:left"
)
_MUTED = "opacity:.7"
_GREY = "rgba(128,128,128,.55)"
_BLUE = "#4a90d9"
_RED = "#d9534f"
_AGENT = f"border:1px solid {_GREY};border-radius:3px;padding:0 6px;white-space:nowrap"
_SCOPE = (
    f"border:2px solid {_BLUE};border-radius:6px;padding:2px 6px;background:rgba(74,144,217,.08)"
)
_ROW = "display:flex;flex-wrap:wrap;align-items:center;gap:4px"
_TABLE = "border-collapse:collapse;margin:4px 0"
_LINE = f"border-bottom:1px solid {_GREY}"
_HEAD = "padding:1px 8px;text-align:left"
_CELL = "padding:1px 8px"
_ARROW = f'<span style="{_MUTED}">&rarr;</span>'

# Short reprs: a result may hold a long list or a large object.
_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60


def _escape(value: object) -> str:
    return html.escape(str(value))


# -- flows -------------------------------------------------------------------------------------


class _ScopeView(NamedTuple):
    """What a flow shows of one scope: its members and its effective options."""

    agents: tuple[str, ...]
    stream_size: int | None
    over: str | None
    max_concurrency: int
    state: Any


def _scope_view(scope: BatchingScope) -> _ScopeView:
    config = scope.streaming_config()
    return _ScopeView(
        agents=tuple(agent.name for agent in scope.agents),
        stream_size=scope.chunk_size,
        over=scope.array_field,
        max_concurrency=1 if config is None else config.max_concurrency,
        state=None if config is None else config.state,
    )


def _steps(flow: Flow) -> tuple[list[str | _ScopeView], str | None]:
    """The flow's agents in order, each scope's members gathered into one step, and the
    problem of a flow whose scopes are invalid (its agents are then listed one by one)."""
    try:
        scopes = flow.scopes()
    except ConfigurationError as exc:
        return [agent.name for agent in flow.agents], str(exc)
    steps: list[str | _ScopeView] = []
    pending = iter(scopes)
    scope = next(pending, None)
    index = 0
    # A scope's members follow its trigger in the flow, so each scope is one run of agents.
    while index < len(flow.agents):
        agent = flow.agents[index]
        if scope is not None and agent is scope.trigger_agent:
            steps.append(_scope_view(scope))
            index += len(scope.agents)
            scope = next(pending, None)
        else:
            steps.append(agent.name)
            index += 1
    return steps, None


def _state_name(state: Any) -> str:
    """A state store as a flow shows it: its table, else its type."""
    if state is None:
        return "no state"
    table = getattr(state, "table", None)
    return table if isinstance(table, str) else type(state).__name__


def flow_text(flow: Flow) -> str:
    """A flow on one line, each scope in brackets with its stream size and field, and its
    concurrency and state store's table when it has them.

    A flow whose scopes are invalid lists its agents alone: running it says what is wrong.

    Example:
        >>> import arrowflow as af
        >>> class A(af.Agent): ...
        >>> @af.intelligent_streaming(stream_size=100, over="companies", max_concurrency=4)
        ... class B(af.Agent): ...
        >>> @af.ends_batching
        ... class C(af.Agent): ...
        >>> flow_text(A >> B >> C)
        "Flow(A >> [B | stream_size=100 over='companies' max_concurrency=4] >> C)"
    """
    steps, _ = _steps(flow)
    texts: list[str] = []
    for step in steps:
        if isinstance(step, str):
            texts.append(step)
            continue
        over = "auto" if step.over is None else repr(step.over)
        options = [f"stream_size={step.stream_size}", f"over={over}"]
        if step.max_concurrency != 1:
            options.append(f"max_concurrency={step.max_concurrency}")
        if step.state is not None:
            options.append(f"state={_state_name(step.state)!r}")
        texts.append(f"[{' >> '.join(step.agents)} | {' '.join(options)}]")
    return f"Flow({' >> '.join(texts)})"


def _agent_html(name: str) -> str:
    return f'<span class="arrowflow-agent" style="{_AGENT}">{_escape(name)}</span>'


def _scope_html(step: _ScopeView) -> str:
    agents = _ARROW.join(_agent_html(name) for name in step.agents)
    options = {
        "over": "auto" if step.over is None else step.over,
        "stream_size": step.stream_size,
        "max_concurrency": step.max_concurrency,
        "state": _state_name(step.state),
    }
    shown = " &middot; ".join(
        f'<span class="arrowflow-option" data-option="{name}">{name}: <b>{_escape(value)}</b>'
        "</span>"
        for name, value in options.items()
    )
    # The store's full repr (path, key, version) on hover, without widening the bracket.
    title = "" if step.state is None else f' title="{_escape(repr(step.state))}"'
    return (
        f'<div class="arrowflow-scope" style="{_SCOPE}"{title}>'
        f'<div style="{_ROW}">{agents}</div>'
        f'<div class="arrowflow-options" style="font-size:11px;{_MUTED}">{shown}</div></div>'
    )


def flow_html(flow: Flow, *, title: str = "Flow", context: Mapping[str, Any] | None = None) -> str:
    """A flow as HTML: its agents in order, each scope a bracket around its members with its
    field (``over``, "auto" when detected at run time), stream size, concurrency and state
    store's table; the problem of a flow whose scopes are invalid; and ``context``'s fields.

    Example:
        >>> import arrowflow as af
        >>> class A(af.Agent):
        ...     name = "<A>"
        >>> "&lt;A&gt;" in flow_html(af.Flow(A)), "<A>" in flow_html(af.Flow(A))
        (True, False)
    """
    steps, problem = _steps(flow)
    parts = [_agent_html(step) if isinstance(step, str) else _scope_html(step) for step in steps]
    scopes = sum(not isinstance(step, str) for step in steps)
    counts = f"{_plural(len(flow.agents), 'agent')}, {_plural(scopes, 'scope')}"
    body = [
        f'<div><b>{_escape(title)}</b> <span style="{_MUTED}">{counts}</span></div>',
        f'<div style="{_ROW}">{_ARROW.join(parts)}</div>',
    ]
    if problem is not None:
        body.append(f'<div class="arrowflow-problem" style="color:{_RED}">{_escape(problem)}</div>')
    if context is not None:
        fields = ", ".join(
            f"{_escape(name)} ({_escape(_describe(value))})" for name, value in context.items()
        )
        body.append(f'<div style="{_MUTED}">context: {fields or "empty"}</div>')
    return _frame("arrowflow-flow", "".join(body))


# -- results -----------------------------------------------------------------------------------


class _Field(NamedTuple):
    """What a result shows of one field."""

    type: str
    rows: int | None
    columns: int | None
    value: str


def _type_name(value: object) -> str:
    kind = type(value)
    package = kind.__module__.partition(".")[0]
    return kind.__qualname__ if package == "builtins" else f"{package}.{kind.__qualname__}"


def _field(value: object) -> _Field:
    """Rows and columns of Arrow values (rows ``None`` when unknown); others by a short repr."""
    rows: int | None = None
    if isinstance(value, pa.Table | pa.RecordBatch):
        rows = value.num_rows
    elif isinstance(value, pa.RecordBatchReader):
        rows = known_num_rows(value)
    elif is_tabular(value):
        # Another library's frame or relation: its length, even its repr, may run a query.
        return _Field(_type_name(value), None, None, "")
    else:
        return _Field(_type_name(value), None, None, _short.repr(value))
    names = value.schema.names
    return _Field(_type_name(value), rows, len(names), _short.repr(names))


def _describe(value: object) -> str:
    field = _field(value)
    if field.columns is None:
        return f"{field.type} = {field.value}" if field.value else field.type
    rows = "? rows" if field.rows is None else _plural(field.rows, "row")
    return f"{field.type}, {rows}, {_plural(field.columns, 'column')}"


def _summary(stats: Mapping[str, Any]) -> str:
    """A scope's ``execution_stats`` on one line: streams, rows and seconds."""
    total = stats.get("total_batches", 0)
    ok = stats.get("successful_batches", 0)
    failed = stats.get("failed_batches", 0)
    outcome = f"{ok} ok, {failed} failed"
    if total - ok - failed:
        outcome += f", {total - ok - failed} interrupted"
    rows = ", ".join(
        f"{stats.get(f'{name}_items', 0)} {word}"
        for name, word in (
            ("total", "in"),
            ("processed", "processed"),
            ("skipped", "skipped"),
            ("loaded", "loaded"),
        )
    )
    start, end = stats.get("start_time"), stats.get("end_time")
    if isinstance(start, datetime) and isinstance(end, datetime):
        took = f"{_seconds((end - start).total_seconds())} s"
    else:
        took = "running"
    return f"{_plural(total, 'stream')} ({outcome}); rows: {rows}; {took}"


def result_text(result: PipelineResult) -> str:
    """A result as text: one line per field, then one per scope with its statistics.

    Example:
        >>> import pyarrow as pa
        >>> import arrowflow as af
        >>> @af.intelligent_streaming(stream_size=2, over="rows")
        ... class Tag(af.Agent):
        ...     def call(self, context):
        ...         return None
        >>> rows = pa.table({"n": range(5)})
        >>> result = af.Flow(Tag).run(rows=rows, note="first", progress=False)
        >>> print(result_text(result))  # doctest: +ELLIPSIS
        PipelineResult(2 fields, 1 scope)
          rows: pyarrow.Table, 5 rows, 1 column
          note: str = 'first'
          scope Tag: 3 streams (3 ok, 0 failed); rows: 5 in, 5 processed, 0 skipped, 0 loaded; ... s
    """
    counts = f"{_plural(len(result), 'field')}, {_plural(len(result.stats), 'scope')}"
    lines = [f"PipelineResult({counts})"]
    lines += [f"  {name}: {_describe(value)}" for name, value in result.items()]
    lines += [
        f"  scope {name}: {_summary(stats)}"
        for name, stats in zip(_scope_names(result), result.stats, strict=True)
    ]
    return "\n".join(lines)


def _scope_names(result: PipelineResult) -> list[str]:
    # A result built by hand may name fewer scopes than it has statistics.
    return [
        result.scopes[index] if index < len(result.scopes) else f"#{index + 1}"
        for index in range(len(result.stats))
    ]


def _table_html(css_class: str, header: list[str], rows: list[list[str]]) -> str:
    """A table of cells already escaped."""
    head = "".join(f'<th style="{_HEAD}">{cell}</th>' for cell in header)
    body = "".join(
        f'<tr style="{_LINE}">'
        + "".join(f'<td style="{_CELL}">{cell}</td>' for cell in row)
        + "</tr>"
        for row in rows
    )
    return (
        f'<table class="{css_class}" style="{_TABLE}">'
        f'<thead><tr style="{_LINE}">{head}</tr></thead><tbody>{body}</tbody></table>'
    )


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return _seconds(value)
    text = str(value)
    if len(text) <= 80:
        return _escape(text)
    # A long error stays whole on hover.
    return f'<span title="{_escape(text)}">{_escape(text[:79])}&hellip;</span>'


def _streams_html(stats: Mapping[str, Any]) -> str:
    streams = stats.get("streams")
    if not isinstance(streams, pa.Table) or streams.num_rows == 0:
        return ""
    shown = streams.slice(0, SHOWN_STREAMS).to_pylist()
    rows = [[_cell(value) for value in row.values()] for row in shown]
    table = _table_html("arrowflow-streams", [_escape(name) for name in streams.schema.names], rows)
    more = streams.num_rows - len(shown)
    if more:
        table += f'<div style="{_MUTED}">and {_plural(more, "more stream")}: result.streams()</div>'
    return table


def result_html(result: PipelineResult) -> str:
    """A result as HTML: each field with its type and, for a table, its rows and columns; each
    scope with its statistics on one line and its first streams.

    Example:
        >>> import arrowflow as af
        >>> "&lt;script&gt;" in result_html(af.PipelineResult({"<script>": 1}, []))
        True
    """
    fields = []
    for name, value in result.items():
        field = _field(value)
        rows = "?" if field.rows is None else str(field.rows)
        sizes = ["", ""] if field.columns is None else [rows, str(field.columns)]
        fields.append([_escape(name), _escape(field.type), *sizes, _escape(field.value)])
    header = ["field", "type", "rows", "columns", "value"]
    counts = f"{_plural(len(result), 'field')}, {_plural(len(result.stats), 'scope')}"
    body = [
        f'<div><b>PipelineResult</b> <span style="{_MUTED}">{counts}</span></div>',
        _table_html("arrowflow-fields", header, fields),
    ]
    for name, stats in zip(_scope_names(result), result.stats, strict=True):
        body.append(
            f'<div class="arrowflow-scope-stats" style="margin-top:6px">'
            f'<div style="border-left:3px solid {_BLUE};padding-left:6px">'
            f"scope <b>{_escape(name)}</b>: "
            f'<span class="arrowflow-summary">{_escape(_summary(stats))}</span></div>'
            f"{_streams_html(stats)}</div>"
        )
    return _frame("arrowflow-result", "".join(body))


# -- stores and shared pieces ------------------------------------------------------------------


def properties_html(title: str, properties: Mapping[str, object]) -> str:
    """An object's configuration as HTML: its title over a table of names and values.

    Example:
        >>> "<td" in properties_html("Store", {"table": "quick_fit"})
        True
    """
    rows = "".join(
        f'<tr style="{_LINE}"><th style="{_HEAD}">{_escape(name)}</th>'
        f'<td style="{_CELL}">{_escape(value)}</td></tr>'
        for name, value in properties.items()
    )
    table = f'<table class="arrowflow-properties" style="{_TABLE}"><tbody>{rows}</tbody></table>'
    return _frame("arrowflow-object", f"<div><b>{_escape(title)}</b></div>{table}")


def _frame(css_class: str, body: str) -> str:
    return f'<div class="{css_class}" style="{_FRAME}">{body}</div>'


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _seconds(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


# -- plots -------------------------------------------------------------------------------------


def plot_streams(result: PipelineResult, ax: Any = None) -> tuple[Any, Any]:
    """Plot each stream's seconds and rows out against its number, one series per scope.

    Seconds are drawn on ``ax`` (a new figure's when ``None``), rows out on a twin axis sharing
    its stream numbers; a scope's two series share a colour. Needs matplotlib (the ``plot``
    extra); nothing is shown, so it works with any backend.

    Args:
        result: what ``run()`` returned.
        ax: the matplotlib ``Axes`` to draw on.

    Returns:
        The seconds axes and the rows axes.

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")  # off screen
        >>> import pyarrow as pa
        >>> import arrowflow as af
        >>> @af.intelligent_streaming(stream_size=2, over="rows")
        ... class Tag(af.Agent):
        ...     def call(self, context):
        ...         return None
        >>> result = af.Flow(Tag).run(rows=pa.table({"n": range(5)}), progress=False)
        >>> seconds, rows = af.plot_streams(result)
        >>> rows.lines[0].get_label(), rows.lines[0].get_ydata().tolist()
        ('Tag rows out', [2, 2, 1])
        >>> import matplotlib.pyplot as plt
        >>> plt.close(seconds.figure)
    """
    plt = import_optional("matplotlib.pyplot", extra="plot")
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4))
    rows_ax = ax.twinx()
    for index, (name, stats) in enumerate(zip(_scope_names(result), result.stats, strict=True)):
        streams = stats["streams"]
        numbers = streams["stream_num"].to_numpy()
        color = f"C{index % 10}"
        seconds, rows = streams["seconds"].to_numpy(), streams["rows_out"].to_numpy()
        ax.plot(numbers, seconds, "o-", color=color, label=f"{name} seconds")
        rows_ax.plot(numbers, rows, "s--", color=color, label=f"{name} rows out")
    ax.set_xlabel("stream")
    ax.set_ylabel("seconds")
    rows_ax.set_ylabel("rows out")
    lines = ax.get_lines() + rows_ax.get_lines()
    if lines:
        rows_ax.legend(lines, [line.get_label() for line in lines], loc="best")
    return ax, rows_ax
