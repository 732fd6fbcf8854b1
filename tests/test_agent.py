"""Agents, streaming declarations and their seed aliases (DESIGN §2, §3)."""

from __future__ import annotations

import inspect
import types
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

import arrowflow as af


def _plain(name: str = "QuickFit") -> type[af.Agent]:
    """A fresh agent class (each test declares on its own class)."""

    def call(self: af.Agent, context: Any) -> None:
        return None

    return types.new_class(name, (af.Agent,), exec_body=lambda ns: ns.update(call=call))


def _hook(*args: Any) -> None:
    return None


# --------------------------------------------------------------------------- names


class TestName:
    def test_name_defaults_to_class_name(self) -> None:
        class QuickFit(af.Agent):
            def call(self, context: Any) -> None:
                return None

        assert QuickFit().name == "QuickFit"

    def test_name_attribute_overrides_class_name(self) -> None:
        class QuickFit(af.Agent):
            name = "quick_fit"

            def call(self, context: Any) -> None:
                return None

        assert QuickFit().name == "quick_fit"

    def test_configuration_error_names_agent_by_its_name(self) -> None:
        class Renamed(af.Agent):
            name = "renamed_agent"

        with pytest.raises(af.ConfigurationError, match="renamed_agent"):
            Renamed.intelligent_streaming(0)


# --------------------------------------------------------------------------- declaration rules


class TestDeclarationErrors:
    @pytest.mark.parametrize("stream_size", [0, -1, True, False, "10", 1.5, None])
    def test_stream_size_must_be_positive_int(self, stream_size: Any) -> None:
        agent = _plain("QuickFit")
        with pytest.raises(af.ConfigurationError, match="QuickFit") as exc_info:
            agent.intelligent_streaming(stream_size, over="companies")
        assert "stream" in str(exc_info.value).lower()
        assert not agent.is_batching_trigger()

    @pytest.mark.parametrize("stream_size", [0, -1, True, "10", 1.5])
    def test_decorator_rejects_bad_stream_size(self, stream_size: Any) -> None:
        with pytest.raises(af.ConfigurationError, match="DecoratedAgent"):

            @af.intelligent_streaming(stream_size=stream_size)
            class DecoratedAgent(af.Agent):
                pass

    def test_configuration_error_is_a_value_error(self) -> None:
        assert issubclass(af.ConfigurationError, af.ArrowflowError)
        assert issubclass(af.ConfigurationError, ValueError)
        with pytest.raises(ValueError, match="QuickFit"):
            _plain("QuickFit").intelligent_streaming(0)

    @pytest.mark.parametrize("over", [5, ["companies"], b"companies", 1.0])
    def test_over_must_be_str_or_none(self, over: Any) -> None:
        with pytest.raises(af.ConfigurationError, match="QuickFit") as exc_info:
            _plain("QuickFit").intelligent_streaming(10, over=over)
        assert "over" in str(exc_info.value)

    @pytest.mark.parametrize("incremental", [1, 0, "yes", None])
    def test_incremental_must_be_bool(self, incremental: Any) -> None:
        with pytest.raises(af.ConfigurationError, match="QuickFit") as exc_info:
            _plain("QuickFit").intelligent_streaming(10, incremental=incremental)
        assert "incremental" in str(exc_info.value)

    @pytest.mark.parametrize("over", [None, "companies"])
    def test_valid_declarations_are_accepted(self, over: str | None) -> None:
        agent = _plain()
        agent.intelligent_streaming(
            10,
            over=over,
            incremental=True,
            on_stream_start=_hook,
            on_stream_complete=_hook,
            on_stream_error=_hook,
            retries=2,
            retry_on=(ValueError,),
            backoff=0,
            on_error="continue",
            max_concurrency=1,
            timeout=None,
            key="id",
        )
        assert agent.is_batching_trigger()

    def test_second_declaration_is_an_error(self) -> None:
        agent = _plain("QuickFit")
        agent.intelligent_streaming(10, over="companies")
        with pytest.raises(af.ConfigurationError, match="already configured") as exc_info:
            agent.intelligent_streaming(20, over="companies")
        assert "QuickFit" in str(exc_info.value)
        assert agent.batching_config()["triggers"]["chunk_size"] == 10

    def test_second_declaration_through_an_alias_is_an_error(self) -> None:
        agent = _plain("QuickFit")
        agent.intelligent_streaming(10)
        with pytest.raises(af.ConfigurationError, match="already configured"):
            agent.triggers_batching(chunk_size=20)

    def test_override_replaces_the_declaration(self) -> None:
        agent = _plain()
        agent.intelligent_streaming(10, over="companies")
        agent.intelligent_streaming(20, over="people", override=True)
        assert agent.batching_config() == {
            "triggers": {"chunk_size": 20, "field": "people", "hooks": {}},
            "ends": False,
        }

    def test_subclass_inherits_parent_configuration(self) -> None:
        @af.intelligent_streaming(10, over="companies")
        class Parent(af.Agent):
            pass

        class Child(Parent):
            pass

        assert Child.is_batching_trigger()
        assert Child.batching_config() == Parent.batching_config()

    def test_subclass_may_declare_its_own(self) -> None:
        @af.intelligent_streaming(10, over="companies")
        class Parent(af.Agent):
            pass

        class Child(Parent):
            pass

        Child.intelligent_streaming(5, over="people")
        assert Child.batching_config()["triggers"]["chunk_size"] == 5
        assert Child.batching_config()["triggers"]["field"] == "people"
        assert Parent.batching_config()["triggers"]["chunk_size"] == 10
        assert Parent.batching_config()["triggers"]["field"] == "companies"
        with pytest.raises(af.ConfigurationError, match="already configured"):
            Child.intelligent_streaming(7)

    def test_unknown_option(self) -> None:
        with pytest.raises(af.ConfigurationError, match="Unknown option 'invalid_option'") as e:
            _plain("QuickFit").intelligent_streaming(10, invalid_option=True)
        assert "QuickFit" in str(e.value)

    @pytest.mark.parametrize("hook", ["on_stream_start", "on_stream_complete", "on_stream_error"])
    def test_hook_keyword_must_be_callable(self, hook: str) -> None:
        with pytest.raises(af.ConfigurationError, match="QuickFit") as exc_info:
            _plain("QuickFit").intelligent_streaming(10, **{hook: "not callable"})
        assert hook in str(exc_info.value)

    @pytest.mark.parametrize("option", ["skip_if", "load_existing", "persist_each_stream"])
    def test_state_callable_keyword_must_be_callable(self, option: str) -> None:
        with pytest.raises(af.ConfigurationError, match="QuickFit") as exc_info:
            _plain("QuickFit").intelligent_streaming(10, **{option: 42})
        assert option in str(exc_info.value)

    def test_state_callables_as_keywords_are_accepted(self) -> None:
        agent = _plain()
        agent.intelligent_streaming(
            10, skip_if=_hook, load_existing=_hook, persist_each_stream=_hook, key="id"
        )
        assert agent.is_batching_trigger()

    def test_state_must_be_a_store(self) -> None:
        class NotAStore:
            def skip_if(self, batch: Any, context: Any) -> None:
                return None

        with pytest.raises(af.ConfigurationError, match="QuickFit") as exc_info:
            _plain("QuickFit").intelligent_streaming(10, state=NotAStore())
        assert "state" in str(exc_info.value)

    def test_state_store_with_the_three_callables_is_accepted(self) -> None:
        class Store:
            def skip_if(self, batch: Any, context: Any) -> Any:
                return pa.array([False] * batch.num_rows)

            def load_existing(self, skipped: Any, context: Any) -> Any:
                return skipped

            def persist_each_stream(self, results: Any, context: Any) -> None:
                return None

        agent = _plain()
        agent.intelligent_streaming(10, state=Store(), key="id")
        assert agent.is_batching_trigger()

    def test_trigger_cannot_end_batching(self) -> None:
        agent = _plain("Both")
        agent.intelligent_streaming(10)
        with pytest.raises(af.ConfigurationError, match="Both"):
            agent.ends_batching()

    def test_terminator_cannot_trigger(self) -> None:
        agent = _plain("Both")
        agent.ends_batching()
        with pytest.raises(af.ConfigurationError, match="Both"):
            agent.intelligent_streaming(10)

    def test_decorators_cannot_combine_trigger_and_end(self) -> None:
        with pytest.raises(af.ConfigurationError, match="Both"):

            @af.ends_batching
            @af.triggers_batching(chunk_size=10)
            class Both(af.Agent):
                pass


# --------------------------------------------------------------------------- seed aliases


class TestSeedAliases:
    def test_plain_agent_has_no_config(self) -> None:
        agent = _plain()
        assert agent.batching_config() is None
        assert agent.is_batching_trigger() is False
        assert agent.is_batching_terminator() is False

    def test_intelligent_streaming_config(self) -> None:
        @af.intelligent_streaming(stream_size=100, over="companies", incremental=True)
        class QuickFit(af.Agent):
            pass

        assert QuickFit.batching_config() == {
            "triggers": {"chunk_size": 100, "field": "companies", "hooks": {}},
            "ends": False,
        }
        assert QuickFit.is_batching_trigger() is True
        assert QuickFit.is_batching_terminator() is False

    def test_intelligent_batching_decorator(self) -> None:
        @af.intelligent_batching(batch_size=10, over="companies", streaming=True)
        class QuickFit(af.Agent):
            pass

        assert QuickFit.batching_config() == {
            "triggers": {"chunk_size": 10, "field": "companies", "hooks": {}},
            "ends": False,
        }

    def test_intelligent_batching_classmethod(self) -> None:
        agent = _plain()
        agent.intelligent_batching(batch_size=7)
        assert agent.batching_config() == {
            "triggers": {"chunk_size": 7, "field": None, "hooks": {}},
            "ends": False,
        }

    @pytest.mark.parametrize("batch_size", [0, "10", True])
    def test_intelligent_batching_same_rules(self, batch_size: Any) -> None:
        with pytest.raises(af.ConfigurationError, match="QuickFit"):
            _plain("QuickFit").intelligent_batching(batch_size=batch_size)

    def test_triggers_batching_decorator_and_classmethod(self) -> None:
        @af.triggers_batching(chunk_size=100)
        class Decorated(af.Agent):
            pass

        agent = _plain()
        agent.triggers_batching(chunk_size=5, over="companies")
        assert Decorated.batching_config() == {
            "triggers": {"chunk_size": 100, "field": None, "hooks": {}},
            "ends": False,
        }
        assert agent.batching_config() == {
            "triggers": {"chunk_size": 5, "field": "companies", "hooks": {}},
            "ends": False,
        }

    @pytest.mark.parametrize("chunk_size", [0, -3, "5", 2.0])
    def test_triggers_batching_same_rules(self, chunk_size: Any) -> None:
        with pytest.raises(af.ConfigurationError, match="QuickFit"):
            _plain("QuickFit").triggers_batching(chunk_size=chunk_size)

    def test_ends_batching_decorator(self) -> None:
        @af.ends_batching
        class Scoring(af.Agent):
            pass

        assert isinstance(Scoring, type)
        assert issubclass(Scoring, af.Agent)
        assert Scoring.is_batching_terminator() is True
        assert Scoring.is_batching_trigger() is False
        assert Scoring.batching_config() == {"triggers": None, "ends": True}

    def test_ends_batching_classmethod(self) -> None:
        agent = _plain()
        agent.ends_batching()
        assert agent.is_batching_terminator() is True
        assert agent.batching_config() == {"triggers": None, "ends": True}

    def test_only_registered_hooks_appear(self) -> None:
        agent = _plain()
        agent.intelligent_streaming(
            10, over="companies", on_stream_start=_hook, on_stream_error=_hook
        )
        config = agent.batching_config()
        assert config["triggers"]["chunk_size"] == 10
        assert config["triggers"]["field"] == "companies"
        assert config["ends"] is False
        hooks = config["triggers"]["hooks"]
        assert set(hooks) == {"on_start", "on_error"}
        assert all(callable(h) for h in hooks.values())

    def test_all_three_hooks_registered(self) -> None:
        agent = _plain()
        agent.intelligent_streaming(
            10, on_stream_start=_hook, on_stream_complete=_hook, on_stream_error=_hook
        )
        assert set(agent.batching_config()["triggers"]["hooks"]) == {
            "on_start",
            "on_complete",
            "on_error",
        }

    def test_streaming_alias_means_incremental(self, make_companies, passthrough) -> None:
        completed: list[tuple[int, int, int]] = []

        @af.intelligent_batching(batch_size=10, over="companies", streaming=True)
        class QuickFit(af.Agent):
            def call(self, context: Any) -> None:
                return None

            def on_stream_complete(self, stream_num: int, total: int, results: pa.Table) -> None:
                completed.append((stream_num, total, results.num_rows))

        (QuickFit >> passthrough).run(companies=make_companies(25))
        assert completed == [(1, 3, 10), (2, 3, 10), (3, 3, 5)]

    def test_triggers_batching_is_not_incremental(self, make_companies, passthrough) -> None:
        completed: list[tuple[int, int, int]] = []

        @af.triggers_batching(chunk_size=10, over="companies")
        class QuickFit(af.Agent):
            def call(self, context: Any) -> None:
                return None

            def on_stream_complete(self, stream_num: int, total: int, results: pa.Table) -> None:
                completed.append((stream_num, total, results.num_rows))

        (QuickFit >> passthrough).run(companies=make_companies(25))
        assert completed == [(3, 3, 25)]


# --------------------------------------------------------------------------- in_chunks_of


def _chunk_recorder(sizes: list[int]) -> type[af.Agent]:
    class Double(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            companies = context["companies"]
            assert isinstance(companies, pa.Table)
            sizes.append(companies.num_rows)
            return {"companies": companies.append_column("double", pc.multiply(companies["id"], 2))}

    return Double


class TestInChunksOf:
    def test_outside_a_scope(self, make_companies, passthrough) -> None:
        sizes: list[int] = []
        agent = af.in_chunks_of(3)(_chunk_recorder(sizes))
        result = (agent >> passthrough).run(companies=make_companies(10))
        assert sizes == [3, 3, 3, 1]
        out = result["companies"]
        assert isinstance(out, pa.Table)
        assert out["id"].to_pylist() == list(range(10))
        assert out["double"].to_pylist() == [2 * i for i in range(10)]

    def test_classmethod_with_over(self, make_companies, passthrough) -> None:
        sizes: list[int] = []
        agent = _chunk_recorder(sizes)
        agent.in_chunks_of(4, over="companies")
        other = make_companies(3)
        result = (agent >> passthrough).run(companies=make_companies(10), other=other)
        assert sizes == [4, 4, 2]
        assert result["companies"]["double"].to_pylist() == [2 * i for i in range(10)]
        assert result["other"].equals(other)

    def test_chunk_larger_than_input(self, make_companies, passthrough) -> None:
        sizes: list[int] = []
        agent = af.in_chunks_of(100)(_chunk_recorder(sizes))
        result = (agent >> passthrough).run(companies=make_companies(10))
        assert sizes == [10]
        assert result["companies"].num_rows == 10

    @pytest.mark.parametrize("order", ["chunks_inside", "chunks_outside"])
    def test_combined_with_a_trigger(self, make_companies, passthrough, order: str) -> None:
        sizes: list[int] = []
        agent = _chunk_recorder(sizes)
        if order == "chunks_inside":
            agent = af.intelligent_streaming(5, over="companies")(af.in_chunks_of(2)(agent))
        else:
            agent = af.in_chunks_of(2)(af.intelligent_streaming(5, over="companies")(agent))
        result = (agent >> passthrough).run(companies=make_companies(10))
        assert sizes == [2, 2, 1, 2, 2, 1]
        assert result["companies"]["double"].to_pylist() == [2 * i for i in range(10)]
        assert result.stats[0]["total_batches"] == 2

    @pytest.mark.parametrize("n", [0, -1, "3", True])
    def test_same_rules(self, n: Any) -> None:
        with pytest.raises(af.ConfigurationError, match="QuickFit"):
            _plain("QuickFit").in_chunks_of(n)


# --------------------------------------------------------------------------- functional agents


class TestFunctionalAgent:
    def test_parameters_are_read_from_context(self, make_companies, passthrough) -> None:
        seen: list[tuple[int, str]] = []

        @af.agent
        def summarize(companies, search_query):
            seen.append((companies.num_rows, search_query))
            return {"summary": f"{search_query}:{companies.num_rows}"}

        assert isinstance(summarize, type)
        assert issubclass(summarize, af.Agent)
        result = (passthrough >> summarize).run(companies=make_companies(4), search_query="tech")
        assert seen == [(4, "tech")]
        assert result["summary"] == "tech:4"
        assert result["search_query"] == "tech"

    def test_writes_puts_a_table_in_a_field(self, make_companies, passthrough) -> None:
        @af.agent(writes="companies")
        def big_ones(companies):
            return companies.filter(pc.field("employees") > 50)

        table = make_companies(20)
        result = (big_ones >> passthrough).run(companies=table)
        expected = table.filter(pc.field("employees") > 50)
        assert result["companies"].equals(expected)

    def test_decorated_with_intelligent_streaming(self, make_companies, terminator, events) -> None:
        sizes: list[int] = []

        @af.intelligent_streaming(stream_size=10, over="companies")
        @af.agent(writes="companies")
        def tag(companies):
            sizes.append(companies.num_rows)
            return companies.append_column("tagged", pa.array([True] * companies.num_rows))

        assert tag.is_batching_trigger()
        result = (tag >> terminator).run(companies=make_companies(25))
        assert sizes == [10, 10, 5]
        assert events == [("end", 25)]
        assert result["companies"]["tagged"].to_pylist() == [True] * 25
        assert result["companies"]["id"].to_pylist() == list(range(25))

    def test_missing_required_parameter(self, passthrough) -> None:
        @af.agent
        def allocate_funds(quota):
            return {"funds": quota * 2}

        with pytest.raises(af.ExecutionError, match="allocate_funds") as exc_info:
            (passthrough >> allocate_funds).run(search_query="tech")
        assert "quota" in str(exc_info.value)

    def test_default_parameters_are_optional(self, passthrough) -> None:
        @af.agent
        def scale(value, factor=3):
            return {"scaled": value * factor}

        assert (passthrough >> scale).run(value=2)["scaled"] == 6
        assert (passthrough >> scale).run(value=2, factor=10)["scaled"] == 20

    def test_context_parameter_receives_read_only_context(self, passthrough) -> None:
        seen: dict[str, Any] = {}

        @af.agent
        def inspect(context):
            seen["keys"] = set(context)
            seen["value"] = context["value"]
            try:
                context["value"] = 99
            except TypeError:
                seen["read_only"] = True
            return {"inspected": True}

        result = (passthrough >> inspect).run(value=1, other="x")
        assert seen == {"keys": {"value", "other"}, "value": 1, "read_only": True}
        assert result["value"] == 1
        assert result["inspected"] is True

    def test_none_return_changes_nothing(self, passthrough) -> None:
        @af.agent
        def nothing(value):
            return None

        result = (passthrough >> nothing).run(value=1)
        assert dict(result) == {"value": 1}

    def test_non_mapping_return_needs_writes(self, passthrough) -> None:
        @af.agent
        def count_rows(value):
            return 42

        with pytest.raises(af.ConfigurationError, match="count_rows"):
            (passthrough >> count_rows).run(value=1)

    def test_composes_with_class_agents(self, passthrough) -> None:
        @af.agent
        def first(value):
            return {"value": value + 1}

        @af.agent
        def second(value):
            return {"value": value * 10}

        flow = first >> passthrough >> second
        assert list(flow.agents) == [first, passthrough, second]
        assert flow.run(value=1)["value"] == 20

    def test_call_returns_a_mapping(self) -> None:
        @af.agent
        def add(a, b):
            return {"c": a + b}

        assert isinstance(add().call({"a": 1, "b": 2}), Mapping)
        assert dict(add().call({"a": 1, "b": 2})) == {"c": 3}


# --------------------------------------------------------------------------- option signatures

OPTION_DEFAULTS = {
    "state": None,
    "key": None,
    "skip_if": None,
    "load_existing": None,
    "persist_each_stream": None,
    "on_stream_start": None,
    "on_stream_complete": None,
    "on_stream_error": None,
    "max_concurrency": 1,
    "retries": 0,
    "retry_on": (Exception,),
    "backoff": 1.0,
    "timeout": None,
    "on_error": "raise",
    "on_batch_start": None,
    "on_batch_complete": None,
    "on_batch_error": None,
    "persist_each_batch": None,
}
DECLARATIONS = {
    "Agent.intelligent_streaming": lambda cls, **kw: cls.intelligent_streaming(10, **kw),
    "Agent.intelligent_batching": lambda cls, **kw: cls.intelligent_batching(10, **kw),
    "Agent.triggers_batching": lambda cls, **kw: cls.triggers_batching(10, **kw),
    "af.intelligent_streaming": lambda cls, **kw: af.intelligent_streaming(10, **kw)(cls),
    "af.intelligent_batching": lambda cls, **kw: af.intelligent_batching(10, **kw)(cls),
    "af.triggers_batching": lambda cls, **kw: af.triggers_batching(10, **kw)(cls),
}
DECLARATION_FUNCTIONS = {
    "Agent.intelligent_streaming": af.Agent.intelligent_streaming,
    "Agent.intelligent_batching": af.Agent.intelligent_batching,
    "Agent.triggers_batching": af.Agent.triggers_batching,
    "af.intelligent_streaming": af.intelligent_streaming,
    "af.intelligent_batching": af.intelligent_batching,
    "af.triggers_batching": af.triggers_batching,
}


class TestOptionSignatures:
    @pytest.mark.parametrize("name", DECLARATION_FUNCTIONS)
    def test_every_option_is_keyword_only_with_its_default(self, name: str) -> None:
        parameters = inspect.signature(DECLARATION_FUNCTIONS[name]).parameters
        options = {
            option: parameter.default
            for option, parameter in parameters.items()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY and option != "override"
        }
        assert options == OPTION_DEFAULTS
        assert parameters["override"].default is False

    def test_options_match_what_the_configuration_validates(self) -> None:
        from arrowflow._config import HOOK_ALIASES, StreamingConfig, StreamingOptions

        declared = set(StreamingConfig.model_fields) - {"stream_size", "over", "incremental"}
        assert set(StreamingOptions.__annotations__) == declared | set(HOOK_ALIASES)
        assert set(OPTION_DEFAULTS) == set(StreamingOptions.__annotations__)

    def test_every_option_is_documented_with_its_default(self) -> None:
        doc = inspect.getdoc(af.Agent.intelligent_streaming) or ""
        assert "DESIGN" not in doc
        entries: dict[str, str] = {}
        name = ""
        for line in doc.split("Args:", 1)[1].split("Returns:", 1)[0].strip("\n").splitlines():
            if line[4:5].isalpha():
                name = line.split(":", 1)[0].strip()
            entries[name] = entries.get(name, "") + line
        aliases = {
            "on_batch_start": "on_stream_start",
            "on_batch_complete": "on_stream_complete",
            "on_batch_error": "on_stream_error",
            "persist_each_batch": "persist_each_stream",
        }
        for option in set(OPTION_DEFAULTS) - set(aliases):
            assert "default" in entries[option].lower(), option
        for alias, target in aliases.items():
            assert alias in entries[target]
        assert {"stream_size", "over", "incremental", "override"} <= set(entries)

    @pytest.mark.parametrize("name", DECLARATIONS)
    def test_unknown_option_is_a_configuration_error_with_a_hint(self, name: str) -> None:
        agent = _plain("QuickFit")
        with pytest.raises(af.ConfigurationError) as exc_info:
            DECLARATIONS[name](agent, max_concurency=4)
        message = str(exc_info.value)
        assert "Agent 'QuickFit'" in message
        assert "Unknown option 'max_concurency'" in message
        assert "Did you mean 'max_concurrency'?" in message
        assert not agent.is_batching_trigger()

    @pytest.mark.parametrize("name", DECLARATIONS)
    def test_options_are_accepted_by_every_form(self, name: str) -> None:
        agent = _plain("QuickFit")
        DECLARATIONS[name](agent, max_concurrency=3, on_batch_complete=_hook, retry_on=KeyError)
        config = agent._streaming
        assert config is not None
        assert (config.max_concurrency, config.on_stream_complete, config.retry_on) == (
            3,
            _hook,
            (KeyError,),
        )
