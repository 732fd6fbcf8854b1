"""Scopes: detection, validation, field detection and how a field is cut (DESIGN §4, §6)."""

from __future__ import annotations

import re
import types
from typing import Any

import pyarrow as pa
import pytest

import arrowflow as af


def _agent(name: str, calls: list[str] | None = None) -> type[af.Agent]:
    """A plain agent class named ``name`` that appends its name to ``calls``."""

    def call(self: af.Agent, context: Any) -> None:
        if calls is not None:
            calls.append(name)

    return types.new_class(name, (af.Agent,), exec_body=lambda ns: ns.update(call=call))


def _trigger(name: str, size: int = 10, over: str | None = None, **options: Any) -> type[af.Agent]:
    return af.intelligent_streaming(size, over=over, **options)(_agent(name))


def _end(name: str, calls: list[str] | None = None) -> type[af.Agent]:
    return af.ends_batching(_agent(name, calls))


# --------------------------------------------------------------------------- BatchingScope


class TestBatchingScope:
    def test_chunk_size_and_field_from_trigger(self) -> None:
        trigger = _trigger("QuickFit", 10, over="companies")
        scope = af.BatchingScope(trigger)
        assert scope.chunk_size == 10
        assert scope.array_field == "companies"
        assert list(scope.agents) == [trigger]
        assert scope.is_valid()

    def test_constructor_chunk_size_wins(self) -> None:
        scope = af.BatchingScope(_trigger("QuickFit", 10, over="companies"), chunk_size=3)
        assert scope.chunk_size == 3

    def test_constructor_array_field_wins(self) -> None:
        scope = af.BatchingScope(_trigger("QuickFit", 10, over="companies"), array_field="people")
        assert scope.array_field == "people"

    def test_array_field_none_when_auto_detected(self) -> None:
        assert af.BatchingScope(_trigger("QuickFit", 10)).array_field is None

    def test_add_and_includes_agent(self) -> None:
        trigger = _trigger("QuickFit")
        member, outsider = _agent("DeepIntel"), _agent("Other")
        scope = af.BatchingScope(trigger)
        scope.add_agent(member)
        assert list(scope.agents) == [trigger, member]
        assert scope.includes_agent(trigger)
        assert scope.includes_agent(member)
        assert not scope.includes_agent(outsider)

    def test_should_end(self) -> None:
        end, member = _end("Scoring"), _agent("DeepIntel")
        scope = af.BatchingScope(_trigger("QuickFit"), ending_agent=end)
        assert scope.should_end(end)
        assert not scope.should_end(member)

    def test_should_end_on_any_terminator_when_no_ending_agent(self) -> None:
        scope = af.BatchingScope(_trigger("QuickFit"))
        assert scope.should_end(_end("Scoring"))
        assert not scope.should_end(_agent("DeepIntel"))

    @pytest.mark.parametrize("chunk_size", [0, -1])
    def test_built_without_validating(self, chunk_size: int) -> None:
        scope = af.BatchingScope(_trigger("QuickFit"), chunk_size=chunk_size)
        assert scope.is_valid() is False

    def test_plain_agent_scope_is_not_valid(self) -> None:
        assert af.BatchingScope(_agent("Plain")).is_valid() is False

    def test_detect_one_tabular_field(self, make_companies) -> None:
        scope = af.BatchingScope(_trigger("QuickFit"))
        context = {
            "companies": make_companies(3),
            "query": "tech",
            "limit": 5,
            "records": [{"a": 1}],  # a list of dicts is tabular only for over=
        }
        assert scope.detect_array_field(context) == "companies"

    @pytest.mark.parametrize(
        "make_value",
        [
            pytest.param(lambda t: t.to_batches()[0], id="record_batch"),
            pytest.param(lambda t: pa.RecordBatchReader.from_batches(t.schema, []), id="reader"),
        ],
    )
    def test_detect_other_arrow_objects(self, make_companies, make_value) -> None:
        scope = af.BatchingScope(_trigger("QuickFit"))
        context = {"people": make_value(make_companies(3)), "query": "tech"}
        assert scope.detect_array_field(context) == "people"

    def test_detect_no_tabular_field(self) -> None:
        scope = af.BatchingScope(_trigger("QuickFit"))
        with pytest.raises(af.ConfigurationError, match="over=") as exc_info:
            scope.detect_array_field({"query": "tech", "records": [{"a": 1}]})
        assert "QuickFit" in str(exc_info.value)

    def test_detect_several_tabular_fields(self, make_companies) -> None:
        scope = af.BatchingScope(_trigger("QuickFit"))
        context = {"companies": make_companies(3), "people": make_companies(2), "q": 1}
        with pytest.raises(af.ConfigurationError, match="over=") as exc_info:
            scope.detect_array_field(context)
        message = str(exc_info.value)
        assert "companies" in message
        assert "people" in message

    def test_detect_uses_over(self, make_companies) -> None:
        scope = af.BatchingScope(_trigger("QuickFit", over="people"))
        context = {"companies": make_companies(3), "people": make_companies(2)}
        assert scope.detect_array_field(context) == "people"

    def test_get_array_from_context(self, make_companies) -> None:
        table = make_companies(5)
        scope = af.BatchingScope(_trigger("QuickFit", over="companies"))
        got = scope.get_array_from_context({"companies": table, "query": "x"})
        assert isinstance(got, pa.Table)
        assert got.equals(table)

    def test_get_array_from_record_batch(self, make_companies) -> None:
        table = make_companies(5)
        scope = af.BatchingScope(_trigger("QuickFit"))
        got = scope.get_array_from_context({"companies": table.to_batches()[0]})
        assert isinstance(got, pa.Table)
        assert got.equals(table)

    def test_get_array_from_list_of_dicts_with_over(self) -> None:
        scope = af.BatchingScope(_trigger("QuickFit", over="records"))
        got = scope.get_array_from_context({"records": [{"a": 1}, {"a": 2}, {"a": 3}]})
        assert isinstance(got, pa.Table)
        assert got.to_pylist() == [{"a": 1}, {"a": 2}, {"a": 3}]

    def test_get_array_missing_field(self, make_companies) -> None:
        scope = af.BatchingScope(_trigger("QuickFit", over="prospects"))
        with pytest.raises(af.ExecutionError, match="prospects"):
            scope.get_array_from_context({"companies": make_companies(3)})

    def test_get_array_field_not_tabular(self) -> None:
        scope = af.BatchingScope(_trigger("QuickFit", over="prospects"))
        with pytest.raises(af.ExecutionError, match="prospects") as exc_info:
            scope.get_array_from_context({"prospects": 42})
        assert re.search(r"int|42", str(exc_info.value))


# --------------------------------------------------------------------------- BatchingScopeManager


class TestBatchingScopeManager:
    def test_detect_scopes(self) -> None:
        discovery, quick_fit = _agent("Discovery"), _trigger("QuickFit", 100, over="companies")
        deep, enrich = _agent("DeepIntel"), _agent("Enrich")
        scoring, report = _end("Scoring"), _agent("Report")
        flow = discovery >> quick_fit >> deep >> enrich >> scoring >> report
        manager = af.BatchingScopeManager()
        scopes = manager.detect_scopes(flow)
        assert len(scopes) == 1
        scope = scopes[0]
        assert isinstance(scope, af.BatchingScope)
        assert list(scope.agents) == [quick_fit, deep, enrich]
        assert scope.chunk_size == 100
        assert scope.array_field == "companies"
        assert scope.is_valid()

        assert manager.find_scope_for_agent(quick_fit) is scope
        for agent in (discovery, deep, enrich, scoring, report):
            assert manager.find_scope_for_agent(agent) is None
        for agent in (quick_fit, deep, enrich):
            assert manager.in_batching_scope(agent)
        for agent in (discovery, scoring, report):
            assert not manager.in_batching_scope(agent)
        skipped = list(manager.agents_to_skip())
        assert len(skipped) == 2
        assert set(skipped) == {deep, enrich}

    def test_scope_without_terminator_runs_to_the_end(self) -> None:
        first, trigger, last = _agent("First"), _trigger("QuickFit"), _agent("Last")
        scopes = af.BatchingScopeManager().detect_scopes(first >> trigger >> last)
        assert [list(s.agents) for s in scopes] == [[trigger, last]]

    def test_two_scopes_in_flow_order(self) -> None:
        t1, a, e1 = _trigger("T1", 5), _agent("A"), _end("E1")
        t2, b = _trigger("T2", 7), _agent("B")
        manager = af.BatchingScopeManager()
        scopes = manager.detect_scopes(t1 >> a >> e1 >> t2 >> b)
        assert [list(s.agents) for s in scopes] == [[t1, a], [t2, b]]
        assert [s.chunk_size for s in scopes] == [5, 7]
        assert set(manager.agents_to_skip()) == {a, b}
        assert manager.find_scope_for_agent(t2) is scopes[1]

    def test_no_scope(self) -> None:
        a, b = _agent("A"), _agent("B")
        manager = af.BatchingScopeManager()
        assert list(manager.detect_scopes(a >> b)) == []
        assert list(manager.agents_to_skip()) == []
        assert manager.find_scope_for_agent(a) is None
        assert not manager.in_batching_scope(a)

    def test_instances_are_kept_as_given(self) -> None:
        trigger, member = _trigger("QuickFit")(), _agent("DeepIntel")()
        manager = af.BatchingScopeManager()
        (scope,) = manager.detect_scopes(_agent("A") >> trigger >> member)
        assert list(scope.agents) == [trigger, member]
        assert manager.find_scope_for_agent(trigger) is scope
        assert manager.in_batching_scope(member)

    def test_nested_trigger(self) -> None:
        flow = _trigger("T1") >> _agent("A") >> _trigger("T2")
        with pytest.raises(af.ConfigurationError, match="Nested batching scopes not yet supported"):
            af.BatchingScopeManager().detect_scopes(flow)

    def test_terminator_without_scope(self) -> None:
        with pytest.raises(af.ConfigurationError, match="Scoring"):
            af.BatchingScopeManager().detect_scopes(_agent("A") >> _end("Scoring"))


# --------------------------------------------------------------------------- flow validation


class TestFlowValidation:
    def test_rshift_never_validates(self) -> None:
        lone = _agent("A") >> _end("Scoring")
        nested = _trigger("T1") >> _trigger("T2")
        starts_with_end = _end("Scoring") >> _agent("A")
        for flow in (lone, nested, starts_with_end):
            assert isinstance(flow, af.Flow)
            assert len(flow.agents) == 2

    def test_pipeline_definition_rejects_lone_terminator(self) -> None:
        with pytest.raises(af.ConfigurationError, match="Scoring"):

            class Bad(af.Pipeline):
                flow = _agent("A") >> _end("Scoring")

    def test_pipeline_definition_rejects_nested_scope(self) -> None:
        with pytest.raises(af.ConfigurationError, match="Nested batching scopes not yet supported"):

            class Bad(af.Pipeline):
                flow = _trigger("T1") >> _agent("A") >> _trigger("T2")

    def test_run_rejects_nested_scope_before_any_agent(self, make_companies) -> None:
        calls: list[str] = []
        flow = _agent("First", calls) >> _trigger("T1") >> _trigger("T2") >> _agent("Z", calls)
        with pytest.raises(af.ConfigurationError, match="Nested batching scopes not yet supported"):
            flow.run(companies=make_companies(5))
        assert calls == []

    def test_run_rejects_lone_terminator_before_any_agent(self) -> None:
        calls: list[str] = []
        flow = _agent("First", calls) >> _end("Scoring", calls)
        with pytest.raises(af.ConfigurationError, match="Scoring"):
            flow.run(x=1)
        assert calls == []

    def test_run_rejects_terminator_after_closed_scope(self, make_companies) -> None:
        calls: list[str] = []
        flow = (
            _agent("First", calls)
            >> _trigger("T1", over="companies")
            >> _end("E1", calls)
            >> _agent("Mid", calls)
            >> _end("E2", calls)
        )
        with pytest.raises(af.ConfigurationError, match="E2"):
            flow.run(companies=make_companies(5))
        assert calls == []

    def test_stream_rejects_nested_scope_before_any_agent(self, make_companies) -> None:
        calls: list[str] = []
        flow = _agent("First", calls) >> _trigger("T1") >> _trigger("T2")
        with pytest.raises(af.ConfigurationError, match="Nested batching scopes not yet supported"):
            list(flow.stream(companies=make_companies(5)))
        assert calls == []

    def test_trigger_after_closed_scope_is_fine(self, make_companies) -> None:
        calls: list[str] = []
        flow = (
            _trigger("T1", 5, over="companies")
            >> _end("E1", calls)
            >> _trigger("T2", 3, over="companies")
            >> _agent("B", calls)
        )
        result = flow.run(companies=make_companies(10))
        assert calls == ["E1"] + ["B"] * 4
        assert [s["total_batches"] for s in result.stats] == [2, 4]


# --------------------------------------------------------------------------- cutting streams


@pytest.mark.parametrize(
    ("rows", "size", "expected"),
    [
        pytest.param(25, 10, [10, 10, 5], id="uneven-last"),
        pytest.param(99, 100, [99], id="99-at-100"),
        pytest.param(100, 100, [100], id="100-at-100"),
        pytest.param(101, 100, [100, 1], id="101-at-100"),
        pytest.param(5, 1, [1, 1, 1, 1, 1], id="size-1"),
        pytest.param(7, 100, [7], id="size-larger-than-input"),
        pytest.param(1, 1, [1], id="one-row"),
    ],
)
def test_streams_cut_and_metadata(make_companies, rows: int, size: int, expected: list[int]):
    metas: list[dict[str, Any]] = []
    ids: list[list[int]] = []

    @af.intelligent_streaming(size, over="companies")
    class QuickFit(af.Agent):
        def call(self, context: Any) -> None:
            metas.append(dict(context["_batch_metadata"]))
            ids.append(context["companies"]["id"].to_pylist())

    class DeepIntel(af.Agent):
        def call(self, context: Any) -> None:
            return None

    table = make_companies(rows)
    result = (QuickFit >> DeepIntel).run(companies=table)
    total = len(expected)
    assert [m["batch_size"] for m in metas] == expected
    assert [m["batch_number"] for m in metas] == list(range(1, total + 1))
    assert [m["total_batches"] for m in metas] == [total] * total
    assert {m["array_field"] for m in metas} == {"companies"}
    scope_ids = {m["scope_id"] for m in metas}
    assert len(scope_ids) == 1
    assert isinstance(scope_ids.pop(), str)
    assert [i for chunk in ids for i in chunk] == list(range(rows))
    assert result["companies"].equals(table)
    assert "_batch_metadata" not in result
    assert result.stats[0]["total_batches"] == total


def test_agents_see_earlier_outputs_of_the_same_stream(make_companies, events) -> None:
    @af.intelligent_streaming(10, over="companies")
    class Tag(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            companies = context["companies"]
            k = context["_batch_metadata"]["batch_number"]
            flag = pa.array([k] * companies.num_rows, pa.int64())
            return {"companies": companies.append_column("stream", flag), "note": k}

    class Check(af.Agent):
        def call(self, context: Any) -> None:
            meta = context["_batch_metadata"]
            stream_col = context["companies"]["stream"].to_pylist()
            events.append((meta["batch_number"], context["note"], set(stream_col)))

    result = (Tag >> Check).run(companies=make_companies(25))
    assert events == [(1, 1, {1}), (2, 2, {2}), (3, 3, {3})]
    assert result["companies"]["stream"].to_pylist() == [1] * 10 + [2] * 10 + [3] * 5


def test_auto_detected_field(make_companies, stream_recorder, events, passthrough) -> None:
    trigger = stream_recorder(10, over=None)
    result = (trigger >> passthrough).run(companies=make_companies(25), query="tech", limit=3)
    assert events == [("trigger", 1, 10), ("trigger", 2, 10), ("trigger", 3, 5)]
    assert result["query"] == "tech"
    assert result["limit"] == 3


def test_auto_detect_with_several_tables_fails_before_scope(make_companies, passthrough) -> None:
    calls: list[str] = []
    trigger = af.intelligent_streaming(10)(_agent("QuickFit", calls))
    with pytest.raises(af.ConfigurationError, match="over=") as exc_info:
        (trigger >> passthrough).run(companies=make_companies(5), people=make_companies(5))
    assert "companies" in str(exc_info.value)
    assert "people" in str(exc_info.value)
    assert calls == []


def test_auto_detect_without_tables_fails(passthrough) -> None:
    trigger = af.intelligent_streaming(10)(_agent("QuickFit"))
    with pytest.raises(af.ConfigurationError, match="over="):
        (trigger >> passthrough).run(query="tech", records=[{"a": 1}])


def test_over_field_missing_at_run(make_companies, passthrough) -> None:
    trigger = af.intelligent_streaming(10, over="prospects")(_agent("QuickFit"))
    with pytest.raises(af.ExecutionError, match="prospects"):
        (trigger >> passthrough).run(companies=make_companies(5))


def test_over_field_not_tabular_at_run(passthrough) -> None:
    trigger = af.intelligent_streaming(10, over="prospects")(_agent("QuickFit"))
    with pytest.raises(af.ExecutionError, match="prospects"):
        (trigger >> passthrough).run(prospects="not a table")


# --------------------------------------------------------------------------- empty input


class TestEmptyInput:
    def test_no_agent_no_hook(self, make_companies, events) -> None:
        table = make_companies(0)

        def hook(*args: Any) -> None:
            events.append("keyword hook")

        @af.intelligent_streaming(
            10, over="companies", incremental=True, on_stream_error=hook, on_stream_start=hook
        )
        class QuickFit(af.Agent):
            def call(self, context: Any) -> None:
                events.append("QuickFit")

            def on_stream_complete(self, *args: Any) -> None:
                events.append("on_stream_complete")

        class DeepIntel(af.Agent):
            def call(self, context: Any) -> None:
                events.append("DeepIntel")

        @af.ends_batching
        class Scoring(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                events.append(("Scoring", context["companies"].num_rows))
                return {"scored": True}

        result = (QuickFit >> DeepIntel >> Scoring).run(companies=table)
        assert events == [("Scoring", 0)]
        out = result["companies"]
        assert isinstance(out, pa.Table)
        assert out.num_rows == 0
        assert out.schema.equals(table.schema)
        assert result["scored"] is True
        (stats,) = result.stats
        assert stats["total_batches"] == 0
        assert stats["successful_batches"] == 0
        assert stats["failed_batches"] == 0
        assert stats["total_items"] == 0
        assert stats["streams"].num_rows == 0

    def test_not_incremental_no_final_hook(self, make_companies, events) -> None:
        @af.intelligent_streaming(10, over="companies")
        class QuickFit(af.Agent):
            def call(self, context: Any) -> None:
                events.append("QuickFit")

            def on_stream_complete(self, *args: Any) -> None:
                events.append("on_stream_complete")

            def on_stream_start(self, *args: Any) -> None:
                events.append("on_stream_start")

        class Last(af.Agent):
            def call(self, context: Any) -> None:
                events.append("Last")

        result = (QuickFit >> Last).run(companies=make_companies(0))
        assert events == []
        assert result["companies"].num_rows == 0
        assert result.stats[0]["total_batches"] == 0
