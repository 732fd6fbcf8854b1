"""How flows, pipelines, results and stores show themselves, and ``af.plot_streams``."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

import arrowflow as af
from arrowflow.stats import STREAMS_SCHEMA

# What the renderers may emit: plain markup, no script, no stylesheet.
ALLOWED_TAGS = {"div", "span", "b", "table", "thead", "tbody", "tr", "th", "td"}


@dataclass
class Node:
    """An element of parsed HTML."""

    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(child if isinstance(child, str) else child.text() for child in self.children)

    def elements(self) -> list[Node]:
        """Every element below this one, in document order."""
        found: list[Node] = []
        for child in self.children:
            if isinstance(child, Node):
                found += [child, *child.elements()]
        return found

    def find_all(self, css_class: str) -> list[Node]:
        return [
            node for node in self.elements() if css_class in node.attrs.get("class", "").split()
        ]

    def find(self, css_class: str) -> Node:
        (node,) = self.find_all(css_class)
        return node

    def tags(self, tag: str) -> list[Node]:
        return [node for node in self.elements() if node.tag == tag]


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack = [Node("document", {})]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {name: value or "" for name, value in attrs})
        self.stack[-1].children.append(node)
        self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(markup: str) -> Node:
    """The element tree of ``markup``, which must be well formed and use only ALLOWED_TAGS."""
    builder = _TreeBuilder()
    builder.feed(markup)
    builder.close()
    assert len(builder.stack) == 1, f"unclosed <{builder.stack[-1].tag}>"
    document = builder.stack[0]
    assert {node.tag for node in document.elements()} <= ALLOWED_TAGS
    return document


def table_rows(table: Node) -> list[list[str]]:
    """The body rows of a table, as the text of their cells."""
    (body,) = table.tags("tbody")
    return [
        [cell.text() for cell in row.elements() if cell.tag in {"td", "th"}]
        for row in body.tags("tr")
    ]


def header(table: Node) -> list[str]:
    (head,) = table.tags("thead")
    return [cell.text() for cell in head.tags("th")]


def options(scope: Node) -> dict[str, str]:
    """The options a scope bracket shows, by option name."""
    return {
        node.attrs["data-option"]: node.tags("b")[0].text()
        for node in scope.find_all("arrowflow-option")
    }


def _plain(name: str, *, ends: bool = False) -> type[af.Agent]:
    class Plain(af.Agent):
        def call(self, context: Any) -> None:
            return None

    Plain.name = name
    return af.ends_batching(Plain) if ends else Plain


def _trigger(name: str, size: int, **declared: Any) -> type[af.Agent]:
    @af.intelligent_streaming(size, **declared)
    class Trigger(af.Agent):
        def call(self, context: Any) -> None:
            return None

    Trigger.name = name
    return Trigger


@pytest.fixture
def store(tmp_path: Path) -> af.DuckDBState:
    return af.DuckDBState(tmp_path / "s.duckdb", table="t", key="id")


@pytest.fixture
def flow(store: af.DuckDBState) -> af.Flow:
    trigger = _trigger("Trigger", 4, over="rows", max_concurrency=2, state=store)
    return _plain("A") >> trigger >> _plain("B") >> _plain("End", ends=True) >> _plain("C")


# -- flows ---------------------------------------------------------------------------------


def test_flow_html_lists_the_agents_in_order_and_brackets_the_scope(flow: af.Flow) -> None:
    document = parse(flow._repr_html_())

    names = [node.text() for node in document.find_all("arrowflow-agent")]
    assert names == ["A", "Trigger", "B", "End", "C"]
    scope = document.find("arrowflow-scope")
    assert [node.text() for node in scope.find_all("arrowflow-agent")] == ["Trigger", "B"]
    assert options(scope) == {
        "over": "rows",
        "stream_size": "4",
        "max_concurrency": "2",
        "state": "t",
    }
    assert document.find_all("arrowflow-problem") == []


def test_flow_repr_is_one_line_with_the_scope_in_brackets(flow: af.Flow) -> None:
    assert repr(flow) == (
        "Flow(A >> [Trigger >> B | stream_size=4 over='rows' max_concurrency=2 state='t'] "
        ">> End >> C)"
    )
    assert repr(_plain("A") >> _plain("B")) == "Flow(A >> B)"


def test_run_time_options_are_shown(flow: af.Flow) -> None:
    faster = flow.with_options(stream_size=7, max_concurrency=3)

    scope = parse(faster._repr_html_()).find("arrowflow-scope")
    assert options(scope)["stream_size"] == "7"
    assert options(scope)["max_concurrency"] == "3"
    assert "stream_size=7 over='rows' max_concurrency=3" in repr(faster)
    assert options(parse(flow._repr_html_()).find("arrowflow-scope"))["stream_size"] == "4"


def test_a_detected_field_and_no_state_are_said() -> None:
    flow = af.Flow(_trigger("Tag", 10))

    assert options(parse(flow._repr_html_()).find("arrowflow-scope")) == {
        "over": "auto",
        "stream_size": "10",
        "max_concurrency": "1",
        "state": "no state",
    }
    assert repr(flow) == "Flow([Tag | stream_size=10 over=auto])"


def test_a_flow_with_invalid_scopes_shows_its_agents_and_the_problem() -> None:
    nested = _trigger("Outer", 2) >> _plain("Middle") >> _trigger("Inner", 2)

    document = parse(nested._repr_html_())

    assert [node.text() for node in document.find_all("arrowflow-agent")] == [
        "Outer",
        "Middle",
        "Inner",
    ]
    assert document.find_all("arrowflow-scope") == []
    assert "Nested batching scopes" in document.find("arrowflow-problem").text()
    assert repr(nested) == "Flow(Outer >> Middle >> Inner)"


def test_a_pipeline_shows_its_name_flow_and_context(flow: af.Flow) -> None:
    Prospects = type("Prospects", (af.Pipeline,), {"flow": flow})
    pipeline = Prospects(rows=pa.table({"id": [1, 2, 3]}), limit=5)

    document = parse(pipeline._repr_html_())

    assert document.tags("b")[0].text() == "Prospects"
    assert len(document.find_all("arrowflow-agent")) == 5
    assert options(document.find("arrowflow-scope"))["state"] == "t"
    assert "rows (pyarrow.Table, 3 rows, 1 column)" in document.text()
    assert "limit (int = 5)" in document.text()
    assert repr(pipeline) == f"Prospects({flow!r})"


def test_user_names_are_escaped(tmp_path: Path) -> None:
    evil = "<script>alert(1)</script>"
    store = af.DuckDBState(tmp_path / "s.duckdb", table=evil, key="id")
    flow = _plain(evil) >> _trigger(f"{evil}!", 2, over=evil, state=store)

    markup = flow._repr_html_()
    document = parse(markup)  # only ALLOWED_TAGS: no script element

    assert "<script>" not in markup
    assert [node.text() for node in document.find_all("arrowflow-agent")] == [evil, f"{evil}!"]
    assert options(document.find("arrowflow-scope"))["over"] == evil


# -- results -------------------------------------------------------------------------------


def _resumed_result(store: Any) -> af.PipelineResult:
    """A run that skips and loads rows a first run stored, with a failing stream."""

    @af.intelligent_streaming(2, over="rows", state=store, on_error="continue")
    class Score(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            rows = context["rows"]
            if 6 in rows["id"].to_pylist():
                raise ValueError("<script>bad</script> row")
            return {"rows": rows.append_column("score", pc.multiply(rows["id"], 10))}

    af.Flow(Score).run(rows=pa.table({"id": range(4)}), progress=False)
    return af.Flow(Score).run(rows=pa.table({"id": range(13)}), note="done", progress=False)


def test_result_html_lists_fields_and_each_scope_from_the_run() -> None:
    result = _resumed_result(af.MemoryState(table="scores", key="id"))
    stats = result.stats[0]

    document = parse(result._repr_html_())

    fields = {row[0]: row[1:4] for row in table_rows(document.find("arrowflow-fields"))}
    rows = result["rows"]
    assert fields == {
        "rows": ["pyarrow.Table", str(rows.num_rows), str(rows.num_columns)],
        "note": ["str", "", ""],
    }
    summary = document.find("arrowflow-summary").text()
    numbers = re.fullmatch(
        r"(\d+) streams \((\d+) ok, (\d+) failed\); rows: (\d+) in, (\d+) processed, "
        r"(\d+) skipped, (\d+) loaded; [\d.]+ s",
        summary,
    )
    assert numbers is not None, summary
    assert [int(number) for number in numbers.groups()] == [
        stats[name]
        for name in (
            "total_batches",
            "successful_batches",
            "failed_batches",
            "total_items",
            "processed_items",
            "skipped_items",
            "loaded_items",
        )
    ]
    assert stats["skipped_items"] == 4
    assert stats["failed_batches"] == 1


def test_fields_are_counted_only_where_arrow_knows_the_count() -> None:
    import duckdb

    schema = pa.schema([("a", pa.int64()), ("b", pa.string())])
    result = af.PipelineResult(
        {
            "empty": schema.empty_table(),
            "lazy": pa.RecordBatchReader.from_batches(schema, []),
            "relation": duckdb.sql("select 1 as a"),
        },
        [],
    )

    fields = table_rows(parse(result._repr_html_()).find("arrowflow-fields"))

    assert fields == [
        ["empty", "pyarrow.Table", "0", "2", "['a', 'b']"],
        ["lazy", "pyarrow.RecordBatchReader", "?", "2", "['a', 'b']"],
        ["relation", "duckdb.DuckDBPyRelation", "", "", ""],
    ]
    assert repr(result).splitlines()[1:] == [
        "  empty: pyarrow.Table, 0 rows, 2 columns",
        "  lazy: pyarrow.RecordBatchReader, ? rows, 2 columns",
        "  relation: duckdb.DuckDBPyRelation",
    ]


def test_result_html_shows_the_first_streams() -> None:
    result = _resumed_result(af.MemoryState(table="scores", key="id"))
    streams = result.stats[0]["streams"]
    assert streams.num_rows == 7

    scope = parse(result._repr_html_()).find("arrowflow-scope-stats")

    table = scope.find("arrowflow-streams")
    assert header(table) == STREAMS_SCHEMA.names
    shown = table_rows(table)
    assert [row[:3] for row in shown] == [
        [str(value) for value in values]
        for values in zip(
            streams["stream_num"].to_pylist()[:5],
            streams["rows_in"].to_pylist()[:5],
            streams["rows_out"].to_pylist()[:5],
            strict=True,
        )
    ]
    assert "and 2 more streams" in scope.text()


def test_a_failed_stream_s_error_is_escaped() -> None:
    result = _resumed_result(af.MemoryState(table="scores", key="id"))
    result.stats[0]["streams"] = result.stats[0]["streams"].slice(3)  # the failed one first

    markup = result._repr_html_()

    assert "<script>" not in markup
    errors = [row[-1] for row in table_rows(parse(markup).find("arrowflow-streams"))]
    assert any("<script>bad</script> row" in error for error in errors)


def test_result_repr_has_a_line_per_field_and_per_scope() -> None:
    result = _resumed_result(af.MemoryState(table="scores", key="id"))

    lines = repr(result).splitlines()

    assert lines[0] == "PipelineResult(2 fields, 1 scope)"
    assert lines[1] == f"  rows: pyarrow.Table, {result['rows'].num_rows} rows, 2 columns"
    assert lines[2] == "  note: str = 'done'"
    assert lines[3].startswith(
        "  scope Score: 7 streams (6 ok, 1 failed); rows: 13 in, 7 processed, 4 skipped, 4 loaded; "
    )


def _two_scopes() -> af.PipelineResult:
    """Five rows through two scopes; the first keeps the even ids, so rows out differ."""

    @af.intelligent_streaming(2, over="rows")
    class First(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            rows = context["rows"]
            return {"rows": rows.filter(pc.equal(pc.bit_wise_and(rows["id"], 1), 0))}

    flow = First >> _plain("End", ends=True) >> _trigger("Second", 2)
    return flow.run(rows=pa.table({"id": range(5)}), progress=False)


def test_streams_gathers_every_scope_with_its_name() -> None:
    streams = _two_scopes().streams()

    assert streams.schema == pa.schema([pa.field("scope", pa.string(), False), *STREAMS_SCHEMA])
    assert streams.select(["scope", "stream_num", "rows_in", "rows_out"]).to_pylist() == [
        {"scope": name, "stream_num": num, "rows_in": rows_in, "rows_out": rows_out}
        for name, num, rows_in, rows_out in [
            ("First", 1, 2, 1),
            ("First", 2, 2, 1),
            ("First", 3, 1, 1),
            ("Second", 1, 2, 2),
            ("Second", 2, 1, 1),
        ]
    ]


def test_streams_of_a_run_without_scope_is_empty_with_the_columns() -> None:
    streams = af.Flow(_plain("Only")).run(progress=False).streams()

    assert streams.num_rows == 0
    assert streams.column_names == ["scope", *STREAMS_SCHEMA.names]


# -- plots ---------------------------------------------------------------------------------


@pytest.fixture
def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    yield plt
    plt.close("all")


def test_plot_streams_draws_seconds_and_rows_out_per_scope(pyplot: Any) -> None:
    result = _two_scopes()

    seconds, rows = af.plot_streams(result)

    assert rows.get_shared_x_axes().joined(seconds, rows)
    assert [line.get_label() for line in seconds.lines] == ["First seconds", "Second seconds"]
    assert [line.get_label() for line in rows.lines] == ["First rows out", "Second rows out"]
    for index, stats in enumerate(result.stats):
        streams = stats["streams"]
        numbers = streams["stream_num"].to_pylist()
        assert seconds.lines[index].get_xdata().tolist() == numbers
        assert seconds.lines[index].get_ydata().tolist() == streams["seconds"].to_pylist()
        assert rows.lines[index].get_ydata().tolist() == streams["rows_out"].to_pylist()


def test_plot_streams_draws_on_the_given_axes(pyplot: Any) -> None:
    _, ax = pyplot.subplots()

    seconds, rows = af.plot_streams(_two_scopes(), ax=ax)

    assert seconds is ax
    assert rows is not ax
    assert rows.figure is ax.figure


def test_plot_streams_without_matplotlib_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # import fails

    with pytest.raises(af.ConfigurationError, match=r"arrowflow\[plot\]"):
        af.plot_streams(_two_scopes())


# -- stores --------------------------------------------------------------------------------


def test_duckdb_state_shows_its_configuration_without_touching_the_disk(
    tmp_path: Path, store: af.DuckDBState
) -> None:
    flow = af.Flow(_trigger("Tag", 2, state=store))

    text = repr(store)
    document = parse(store._repr_html_())
    parse(flow._repr_html_())

    assert list(tmp_path.iterdir()) == []
    path = str(tmp_path / "s.duckdb")
    assert (
        text == f"DuckDBState(path={path!r}, table='t', key='id', version=None, lifecycle='closed')"
    )
    properties = dict(table_rows(document.find("arrowflow-properties")))
    assert {
        name: properties[name] for name in ("path", "table", "key", "version", "lifecycle")
    } == {
        "path": path,
        "table": "t",
        "key": "id",
        "version": "None",
        "lifecycle": "closed",
    }


def test_duckdb_state_says_when_it_is_open() -> None:
    store = af.DuckDBState(":memory:", table="t", key="id", version=2)
    af.Flow(_trigger("Tag", 2, over="rows", state=store)).run(
        rows=pa.table({"id": [1, 2, 3]}), progress=False
    )
    try:
        assert repr(store).endswith("version=2, lifecycle='open')")
        properties = dict(table_rows(parse(store._repr_html_()).find("arrowflow-properties")))
        assert properties["lifecycle"] == "open"
    finally:
        store.close()
    assert repr(store).endswith("lifecycle='closed')")
