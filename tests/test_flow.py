"""Flows, pipelines, results and incremental delivery (DESIGN §2, §4)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

import arrowflow as af


def _named(name: str, events: list[Any]) -> type[af.Agent]:
    class _Agent(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            events.append(name)
            return {"trail": [*context.get("trail", []), name]}

    _Agent.name = name
    return _Agent


# --------------------------------------------------------------------------- composition


class TestComposition:
    def test_rshift_builds_a_flow(self, events) -> None:
        a, b = _named("A", events), _named("B", events)
        flow = a >> b
        assert isinstance(flow, af.Flow)
        assert list(flow.agents) == [a, b]

    def test_flows_nest_and_flatten(self, events) -> None:
        a, b, c, d = (_named(n, events) for n in "ABCD")
        flow = (a >> b) >> (c >> d)
        assert list(flow.agents) == [a, b, c, d]
        assert list((a >> (b >> c)).agents) == [a, b, c]
        assert list(((a >> b) >> c).agents) == [a, b, c]
        assert flow.run()["trail"] == ["A", "B", "C", "D"]
        assert events == ["A", "B", "C", "D"]

    def test_instances_and_classes_mix(self, events) -> None:
        a, b = _named("A", events), _named("B", events)
        instance = b()
        flow = a >> instance >> a
        assert list(flow.agents) == [a, instance, a]
        assert flow.run()["trail"] == ["A", "B", "A"]

    def test_rshift_does_not_change_operands(self, events) -> None:
        a, b, c = (_named(n, events) for n in "ABC")
        ab = a >> b
        abc = ab >> c
        assert list(ab.agents) == [a, b]
        assert list(abc.agents) == [a, b, c]

    def test_single_agent_pipeline(self, events) -> None:
        a = _named("A", events)

        class Single(af.Pipeline):
            flow = a

        assert Single(x=1).run()["trail"] == ["A"]


# --------------------------------------------------------------------------- running


class TestRun:
    def test_flow_run_returns_pipeline_result(self, events) -> None:
        a, b = _named("A", events), _named("B", events)
        result = (a >> b).run(search_query="tech")
        assert isinstance(result, Mapping)
        assert type(result).__name__ == "PipelineResult"
        assert result["search_query"] == "tech"
        assert result["trail"] == ["A", "B"]
        assert result.stats == []

    def test_pipeline_result_is_read_only_mapping(self, events) -> None:
        result = (_named("A", events) >> _named("B", events)).run(x=1)
        assert result == {"x": 1, "trail": ["A", "B"]}
        assert dict(result) == {"x": 1, "trail": ["A", "B"]}
        assert set(result.keys()) == {"x", "trail"}
        assert len(result) == 2
        assert "x" in result
        assert result.get("missing") is None
        with pytest.raises(TypeError):
            result["x"] = 2  # type: ignore[index]
        with pytest.raises(TypeError):
            del result["x"]  # type: ignore[attr-defined]
        assert result["x"] == 1

    def test_context_is_read_only(self) -> None:
        seen: dict[str, Any] = {}

        class Mutator(af.Agent):
            def call(self, context: Any) -> None:
                seen["is_mapping"] = isinstance(context, Mapping)
                try:
                    context["x"] = 1
                except TypeError:
                    seen["raised"] = True

        class Other(af.Agent):
            def call(self, context: Any) -> None:
                seen["x"] = context["x"]

        result = (Mutator >> Other).run(x=0)
        assert seen == {"is_mapping": True, "raised": True, "x": 0}
        assert result["x"] == 0

    def test_context_is_read_only_inside_a_scope(self, make_companies) -> None:
        raised: list[bool] = []

        @af.intelligent_streaming(10, over="companies")
        class Mutator(af.Agent):
            def call(self, context: Any) -> None:
                try:
                    context["companies"] = None
                except TypeError:
                    raised.append(True)

        class Other(af.Agent):
            def call(self, context: Any) -> None:
                return None

        result = (Mutator >> Other).run(companies=make_companies(25))
        assert raised == [True, True, True]
        assert result["companies"].equals(make_companies(25))

    def test_caller_inputs_are_not_mutated(self, make_companies) -> None:
        @af.intelligent_streaming(10, over="companies")
        class Double(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                companies = context["companies"]
                return {"companies": companies.append_column("d", pc.multiply(companies["id"], 2))}

        class Other(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                return {"done": True}

        table = make_companies(25)
        initial = {"companies": table, "query": "x"}
        result = (Double >> Other).run(initial)
        assert initial == {"companies": table, "query": "x"}
        assert table.equals(make_companies(25))
        assert table.column_names == ["id", "name", "employees"]
        assert result["companies"].column_names == ["id", "name", "employees", "d"]

    def test_positional_context_for_reserved_names(self) -> None:
        seen: list[Any] = []

        class Engine(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                seen.append((context["engine"], context["sink"], context["other"]))
                return {"engine": context["engine"] + "!"}

        class Other(af.Agent):
            def call(self, context: Any) -> None:
                return None

        result = (Engine >> Other).run({"engine": "v8", "sink": "kitchen"}, other=3)
        assert seen == [("v8", "kitchen", 3)]
        assert result["engine"] == "v8!"
        assert result["sink"] == "kitchen"

    @pytest.mark.parametrize(
        ("option", "value"), [("engine", "local"), ("progress", False), ("sink", None)]
    )
    def test_run_options_are_not_fields(self, events, option: str, value: Any) -> None:
        flow = _named("A", events) >> _named("B", events)
        assert dict(flow.run(x=1, **{option: value})) == {"x": 1, "trail": ["A", "B"]}
        assert list(flow.stream(x=1, **{option: value})) == []

    def test_agent_sees_outputs_of_previous_agents(self) -> None:
        class First(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                return {"value": context["seed"] + 1}

        class Second(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                return {"value": context["value"] * 10, "seed_seen": context["seed"]}

        assert dict((First >> Second).run(seed=1)) == {"seed": 1, "value": 20, "seed_seen": 1}

    def test_classes_instantiated_once_per_run(self, make_companies) -> None:
        created: list[int] = []
        used: list[int] = []

        @af.intelligent_streaming(10, over="companies")
        class Counted(af.Agent):
            def __init__(self) -> None:
                super().__init__()
                created.append(id(self))

            def call(self, context: Any) -> None:
                used.append(id(self))

        class Other(af.Agent):
            def call(self, context: Any) -> None:
                return None

        flow = Counted >> Other
        flow.run(companies=make_companies(25))
        assert len(created) == 1
        assert used == created * 3
        flow.run(companies=make_companies(25))
        assert len(created) == 2
        assert used[3:] == [created[1]] * 3

    def test_instances_used_as_they_are(self, make_companies) -> None:
        @af.intelligent_streaming(10, over="companies")
        class Counter(af.Agent):
            def __init__(self, label: str) -> None:
                super().__init__()
                self.label = label
                self.calls = 0

            def call(self, context: Any) -> dict[str, Any]:
                self.calls += 1
                return {"label": self.label}

        class Other(af.Agent):
            def call(self, context: Any) -> None:
                return None

        counter = Counter("mine")
        flow = counter >> Other
        result = flow.run(companies=make_companies(25))
        assert counter.calls == 3
        assert result["label"] == ["mine", "mine", "mine"]
        flow.run(companies=make_companies(5))
        assert counter.calls == 4


# --------------------------------------------------------------------------- pipelines


class TestPipeline:
    def test_constructor_kwargs_are_initial_context(self, make_companies) -> None:
        seen: list[str] = []

        class Discovery(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                seen.append(context["search_query"])
                return {"companies": make_companies(25)}

        @af.intelligent_streaming(stream_size=10, over="companies", incremental=True)
        class QuickFit(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                return {"companies": context["companies"].filter(pc.field("employees") > 10)}

        class DeepIntel(af.Agent):
            def call(self, context: Any) -> None:
                return None

        @af.ends_batching
        class Scoring(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                return {"scored": context["companies"].num_rows}

        class ProspectPipeline(af.Pipeline):
            flow = Discovery >> QuickFit >> DeepIntel >> Scoring

        result = ProspectPipeline(search_query="tech").run()
        expected = make_companies(25).filter(pc.field("employees") > 10)
        assert seen == ["tech"]
        assert result["search_query"] == "tech"
        assert result["companies"].equals(expected)
        assert result["scored"] == expected.num_rows
        assert len(result.stats) == 1
        assert result.stats[0]["total_batches"] == 3

    def test_thousand_companies_in_streams_of_100(self, make_companies) -> None:
        trigger_rows: list[int] = []
        member_rows: list[int] = []
        received: list[pa.Table] = []

        @af.intelligent_streaming(stream_size=100, over="companies")
        class QuickFit(af.Agent):
            def call(self, context: Any) -> None:
                trigger_rows.append(context["companies"].num_rows)

        class DeepIntel(af.Agent):
            def call(self, context: Any) -> None:
                member_rows.append(context["companies"].num_rows)

        @af.ends_batching
        class Scoring(af.Agent):
            def call(self, context: Any) -> None:
                assert "_batch_metadata" not in context
                received.append(context["companies"])

        class Prospects(af.Pipeline):
            flow = QuickFit >> DeepIntel >> Scoring

        table = make_companies(1000)
        result = Prospects(companies=table).run()
        assert trigger_rows == [100] * 10
        assert member_rows == [100] * 10
        assert len(received) == 1
        assert isinstance(received[0], pa.Table)
        assert received[0].num_rows == 1000
        assert received[0]["id"].to_pylist() == list(range(1000))
        assert received[0].equals(table)
        assert result["companies"].equals(table)
        assert "_batch_metadata" not in result

    def test_pipeline_run_twice(self, events) -> None:
        class Twice(af.Pipeline):
            flow = _named("A", events) >> _named("B", events)

        pipeline = Twice(x=1)
        assert pipeline.run()["trail"] == ["A", "B"]
        assert pipeline.run()["trail"] == ["A", "B"]
        assert events == ["A", "B", "A", "B"]


# --------------------------------------------------------------------------- stream()


def _streaming_flow(events: list[Any], size: int = 10):
    @af.intelligent_streaming(size, over="companies")
    class QuickFit(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            events.append(("QuickFit", context["_batch_metadata"]["batch_number"]))
            companies = context["companies"]
            return {"companies": companies.filter(pc.field("employees") > 10)}

    @af.ends_batching
    class Scoring(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            events.append(("Scoring", context["companies"].num_rows))
            return {"scored": context["companies"].num_rows}

    class After(af.Agent):
        def call(self, context: Any) -> None:
            events.append("After")

    return QuickFit >> Scoring >> After


class TestStream:
    def test_yields_each_stream_in_order(self, make_companies, events) -> None:
        table = make_companies(25)
        flow = _streaming_flow(events)
        iterator = flow.stream(companies=table)
        parts = []
        for part in iterator:
            assert not any(e == "After" or e[0] == "Scoring" for e in events)
            parts.append((part.stream_num, part.total, part.results))
        assert [(k, total) for k, total, _ in parts] == [(1, 3), (2, 3), (3, 3)]
        for k, _, results in parts:
            assert isinstance(results, pa.Table)
            expected = table.slice((k - 1) * 10, 10).filter(pc.field("employees") > 10)
            assert results.equals(expected)
        expected_all = table.filter(pc.field("employees") > 10)
        assert events[-2:] == [("Scoring", expected_all.num_rows), "After"]
        result = iterator.result
        assert isinstance(result, Mapping)
        assert result["scored"] == expected_all.num_rows
        assert result["companies"].equals(expected_all)
        assert result.stats[0]["total_batches"] == 3

    def test_stream_is_incremental(self, make_companies, events) -> None:
        flow = _streaming_flow(events)
        iterator = iter(flow.stream(companies=make_companies(100)))
        first = next(iterator)
        assert first.stream_num == 1
        assert first.total == 10
        assert ("QuickFit", 10) not in events
        rest = list(iterator)
        assert [p.stream_num for p in rest] == list(range(2, 11))

    def test_breaking_early_stops_the_run(self, make_companies, events) -> None:
        flow = _streaming_flow(events)
        iterator = flow.stream(companies=make_companies(100))
        for part in iterator:
            if part.stream_num == 2:
                break
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
        del iterator
        calls = [e for e in events if e[0] == "QuickFit"]
        assert len(calls) < 10
        assert not any(e == "After" or e[0] == "Scoring" for e in events)

    def test_pipeline_stream(self, make_companies, events) -> None:
        class Prospects(af.Pipeline):
            flow = _streaming_flow(events, size=4)

        iterator = Prospects(companies=make_companies(10)).stream()
        parts = [(p.stream_num, p.total, p.results.num_rows) for p in iterator]
        assert [(k, t) for k, t, _ in parts] == [(1, 3), (2, 3), (3, 3)]
        assert iterator.result["scored"] == sum(n for _, _, n in parts)

    def test_flow_without_scope_yields_nothing(self, events) -> None:
        iterator = (_named("A", events) >> _named("B", events)).stream(x=1)
        assert list(iterator) == []
        assert events == ["A", "B"]
        assert iterator.result["trail"] == ["A", "B"]
        assert iterator.result["x"] == 1

    def test_empty_input_yields_nothing(self, make_companies, events) -> None:
        iterator = _streaming_flow(events).stream(companies=make_companies(0))
        assert list(iterator) == []
        assert events == [("Scoring", 0), "After"]
        assert iterator.result["scored"] == 0

    def test_stream_positional_context(self, make_companies, events) -> None:
        iterator = _streaming_flow(events).stream({"companies": make_companies(25)})
        assert [p.stream_num for p in iterator] == [1, 2, 3]
