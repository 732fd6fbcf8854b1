"""Programming errors fail the run at once, with a message that says what to write."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

import arrowflow as af


def _streaming(**options: Any) -> Any:
    return af.intelligent_streaming(5, over="companies", **options)


@pytest.mark.parametrize("on_error", ["raise", "continue"])
def test_a_call_returning_a_non_mapping_fails_at_once(make_companies, on_error: str) -> None:
    calls: list[int] = []

    @_streaming(retries=3, backoff=0, on_error=on_error)
    class Listy(af.Agent):
        def call(self, context: Any) -> Any:
            calls.append(context["_batch_metadata"]["batch_number"])
            return [context["companies"]]

    with pytest.raises(af.ConfigurationError) as caught:
        af.Flow(Listy).run(companies=make_companies(20))

    assert calls == [1]  # not retried, and no later stream ran
    message = str(caught.value)
    assert "Agent 'Listy', stream 1/4" in message
    assert 'return {"companies": table}' in message
    assert "retries=" not in message
    assert "on_error" not in message


def test_a_table_field_set_to_a_non_table_fails_at_once(make_companies) -> None:
    calls: list[int] = []

    @_streaming(retries=2, backoff=0)
    class Texty(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            calls.append(1)
            return {"companies": "not a table"}

    with pytest.raises(af.ConfigurationError, match=r"field 'companies' must stay a table"):
        af.Flow(Texty).run(companies=make_companies(10))
    assert calls == [1]


def test_an_agent_without_call_is_refused_before_any_agent_runs(make_companies) -> None:
    calls: list[str] = []

    @_streaming()
    class Trigger(af.Agent):
        def call(self, context: Any) -> None:
            calls.append("trigger")

    class Forgotten(af.Agent):
        pass

    with pytest.raises(af.ConfigurationError, match=r"Agent 'Forgotten' has no call\(\)"):
        (Trigger >> Forgotten).run(companies=make_companies(10))
    assert calls == []


@pytest.mark.parametrize(
    ("name", "hook"),
    [
        ("on_stream_start", lambda stream_num, total: None),
        ("on_stream_complete", lambda results: None),
        ("on_stream_error", lambda stream_num, total, error: None),
        ("skip_if", lambda batch: None),
        ("load_existing", lambda: None),
        ("persist_each_stream", lambda results, context, extra: None),
    ],
)
def test_a_hook_or_option_with_a_wrong_signature_is_refused_before_any_agent_runs(
    make_companies, name: str, hook: Any
) -> None:
    calls: list[int] = []

    @_streaming(**{name: hook})
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            calls.append(1)

    with pytest.raises(af.ConfigurationError, match=rf"Agent 'Work': {name} cannot be called"):
        af.Flow(Work).run(companies=make_companies(10))
    assert calls == []


def test_a_hook_method_with_a_wrong_signature_is_refused(make_companies) -> None:
    @_streaming()
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            return None

        def on_stream_complete(self, results: Any) -> None:  # missing stream_num, total
            return None

    with pytest.raises(af.ConfigurationError, match=r"def on_stream_complete\(self, stream_num"):
        af.Flow(Work).run(companies=make_companies(10))


def test_hooks_with_defaults_or_varargs_are_accepted(make_companies) -> None:
    seen: list[Any] = []

    @_streaming(
        incremental=True,
        on_stream_start=lambda *args: seen.append(len(args)),
        on_stream_complete=lambda stream_num, total, results, extra=None: seen.append(stream_num),
    )
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            return None

    af.Flow(Work).run(companies=make_companies(10))
    assert seen == [3, 1, 3, 2]


def test_a_skip_mask_of_the_wrong_length_is_not_retried(make_companies) -> None:
    calls: list[int] = []

    def skip_if(batch: pa.Table, context: Any) -> pa.Array:
        calls.append(1)
        return pa.array([True])

    @_streaming(skip_if=skip_if, retries=3, backoff=0)
    class Work(af.Agent):
        def call(self, context: Any) -> None:
            return None

    with pytest.raises(af.ConfigurationError, match="boolean mask of 5 values"):
        af.Flow(Work).run(companies=make_companies(10))
    assert calls == [1]


def test_returning_none_passes_the_stream_through(make_companies) -> None:
    @_streaming()
    class SideEffect(af.Agent):
        def call(self, context: Any) -> None:
            return None

    companies = make_companies(12)
    assert af.Flow(SideEffect).run(companies=companies)["companies"].equals(companies)
