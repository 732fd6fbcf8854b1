"""Run options of ``run`` and ``stream``: misspellings and streaming options are not fields."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pytest

import arrowflow as af

Call = Callable[..., Any]


def _recording_flow(calls: list[str]) -> af.Flow:
    """A streaming flow whose agents record that they ran."""

    @af.agent(writes="streamed")
    def source() -> pa.Table:
        calls.append("source")
        return pa.table({"n": [1, 2, 3]})

    @af.intelligent_streaming(stream_size=2, over="streamed")
    class Double(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            calls.append("Double")
            return {"streamed": context["streamed"]}

    return source >> Double


def _flow_run(flow: af.Flow, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return dict(flow.run(*args, **kwargs))


def _flow_stream(flow: af.Flow, *args: Any, **kwargs: Any) -> dict[str, Any]:
    stream = flow.stream(*args, **kwargs)
    list(stream)
    assert stream.result is not None
    return dict(stream.result)


def _pipeline(flow: af.Flow) -> af.Pipeline:
    return type("Prospects", (af.Pipeline,), {"flow": flow})()


def _pipeline_run(flow: af.Flow, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return dict(_pipeline(flow).run(*args, **kwargs))


def _pipeline_stream(flow: af.Flow, *args: Any, **kwargs: Any) -> dict[str, Any]:
    stream = _pipeline(flow).stream(*args, **kwargs)
    list(stream)
    assert stream.result is not None
    return dict(stream.result)


CALLERS = pytest.mark.parametrize(
    ("caller", "method"),
    [
        (_flow_run, "run"),
        (_flow_stream, "stream"),
        (_pipeline_run, "run"),
        (_pipeline_stream, "stream"),
    ],
    ids=["Flow.run", "Flow.stream", "Pipeline.run", "Pipeline.stream"],
)


@CALLERS
@pytest.mark.parametrize(
    ("keyword", "meant"),
    [
        ("progres", "progress"),
        ("progess", "progress"),
        ("porgress", "progress"),
        ("Progress", "progress"),
        ("engin", "engine"),
        ("enigne", "engine"),
        ("engines", "engine"),
        ("sinks", "sink"),
        ("snik", "sink"),
    ],
)
def test_misspelt_run_option_is_refused_before_any_agent_runs(
    caller: Call, method: str, keyword: str, meant: str
) -> None:
    calls: list[str] = []
    with pytest.raises(af.ConfigurationError) as exc_info:
        caller(_recording_flow(calls), **{keyword: True})
    message = str(exc_info.value)
    assert f"'{keyword}' looks like a misspelling of the run option '{meant}'" in message
    assert f"{method}({{'{keyword}': ...}})" in message
    assert calls == []


@CALLERS
@pytest.mark.parametrize(
    "option",
    [
        "max_concurrency",
        "stream_size",
        "over",
        "incremental",
        "state",
        "key",
        "retries",
        "timeout",
        "on_error",
        "on_stream_complete",
        "on_batch_complete",
        "persist_each_batch",
    ],
)
def test_streaming_option_passed_to_run_is_refused(caller: Call, method: str, option: str) -> None:
    calls: list[str] = []
    with pytest.raises(af.ConfigurationError) as exc_info:
        caller(_recording_flow(calls), **{option: 4})
    message = str(exc_info.value)
    assert f"'{option}' is an option of intelligent_streaming" in message
    assert f"@af.intelligent_streaming(..., {option}=...)" in message
    assert f"{method}({{'{option}': ...}})" in message
    assert calls == []


@CALLERS
def test_every_offending_keyword_is_named(caller: Call, method: str) -> None:
    with pytest.raises(af.ConfigurationError) as exc_info:
        caller(_recording_flow([]), progres=True, max_concurrency=4, companies=1)
    message = str(exc_info.value)
    assert "'progres'" in message
    assert "'max_concurrency'" in message
    assert "'companies'" not in message


@CALLERS
def test_positional_mapping_passes_such_fields(caller: Call, method: str) -> None:
    fields = {"progres": 1, "max_concurrency": 4, "progress": "field", "sink": "field"}
    result = caller(_recording_flow([]), fields, progress=False)
    assert {name: result[name] for name in fields} == fields


@CALLERS
@pytest.mark.parametrize(
    "field",
    [
        "companies",
        "search_query",
        "rows",
        "query",
        "data",
        "records",
        "progress_log",
        "progress_bar",
        "process",
        "link",
        "ending",
        "online",
        "states",
        "keys",
        "overview",
    ],
)
def test_ordinary_fields_are_not_mistaken_for_options(
    caller: Call, method: str, field: str
) -> None:
    assert caller(_recording_flow([]), **{field: "value"})[field] == "value"


def test_run_options_are_defined_once() -> None:
    def options(method: Callable[..., Any]) -> list[inspect.Parameter]:
        return [
            parameter
            for parameter in inspect.signature(method).parameters.values()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY
        ]

    methods = [af.Flow.run, af.Flow.stream, af.Pipeline.run, af.Pipeline.stream]
    assert all(options(method) == options(af.Flow.run) for method in methods)
    assert [parameter.name for parameter in options(af.Flow.run)] == list(af.flow.RUN_OPTIONS)
    assert set(af.flow.RUN_OPTIONS) >= {"engine", "progress", "sink"}


# --------------------------------------------------------------------------- Pipeline(...)


def _prospects(calls: list[str]) -> type[af.Pipeline]:
    return type("Prospects", (af.Pipeline,), {"flow": _recording_flow(calls)})


@pytest.mark.parametrize(
    ("keyword", "fragment"),
    [
        ("max_concurrency", "'max_concurrency' is an option of intelligent_streaming"),
        ("progres", "'progres' looks like a misspelling of the run option 'progress'"),
        ("sink", "'sink' is an option of run() and stream(): pass it there"),
        ("progress", "'progress' is an option of run() and stream(): pass it there"),
    ],
)
def test_pipeline_constructor_keywords_are_checked_too(keyword: str, fragment: str) -> None:
    calls: list[str] = []
    with pytest.raises(af.ConfigurationError) as exc_info:
        _prospects(calls)(**{keyword: 4})
    message = str(exc_info.value)
    assert message.startswith("Prospects(): ")
    assert fragment in message
    assert f"Prospects({{'{keyword}': ...}})" in message
    assert calls == []


def test_pipeline_constructor_takes_a_mapping_for_such_fields() -> None:
    pipeline = _prospects([])({"sink": "field", "max_concurrency": 4}, search_query="tech")
    result = pipeline.run()
    assert (result["sink"], result["max_concurrency"], result["search_query"]) == (
        "field",
        4,
        "tech",
    )
