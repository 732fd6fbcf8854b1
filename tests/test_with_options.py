"""Run-time overrides: ``with_options`` on flows and pipelines."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

import arrowflow as af


def _triple(rows: pa.Table) -> pa.Table:
    return rows.append_column("triple", pc.multiply(rows["id"], 3))


def _streaming_agent(size: int = 10, **options: Any) -> type[af.Agent]:
    @af.intelligent_streaming(size, over="companies", **options)
    class Triple(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            return {"companies": _triple(context["companies"])}

    return Triple


def _sizes(result: af.PipelineResult, scope: int = 0) -> list[int]:
    return result.stats[scope]["streams"]["rows_in"].to_pylist()


def test_stream_size_is_overridden_and_the_class_is_untouched(make_companies) -> None:
    triple = _streaming_agent(10, retries=2, incremental=True)
    declared = triple._streaming
    flow = af.Flow(triple).with_options(stream_size=4)

    result = flow.run(companies=make_companies(10), progress=False)

    assert _sizes(result) == [4, 4, 2]
    assert result["companies"].equals(_triple(make_companies(10)))
    assert triple._streaming is declared
    assert triple.batching_config()["triggers"]["chunk_size"] == 10
    assert _sizes(af.Flow(triple).run(companies=make_companies(10), progress=False)) == [10]


def test_the_rest_of_the_declaration_is_kept(make_companies) -> None:
    seen: list[int] = []
    failures = {2: 1}

    @af.intelligent_streaming(10, over="companies", retries=1, backoff=0, incremental=True)
    class Flaky(af.Agent):
        def call(self, context: Any) -> None:
            num = context["_batch_metadata"]["batch_number"]
            if failures.get(num):
                failures[num] -= 1
                raise ConnectionError("once")

        def on_stream_complete(self, num: int, total: int, results: pa.Table) -> None:
            seen.append(results.num_rows)

    result = (
        af.Flow(Flaky).with_options(stream_size=3).run(companies=make_companies(7), progress=False)
    )
    assert seen == [3, 3, 1]  # incremental hooks, per stream of the new size
    assert result.stats[0]["streams"]["attempts"].to_pylist() == [1, 2, 1]  # retries kept


def test_max_concurrency_runs_streams_on_threads(make_companies) -> None:
    threads: set[str] = set()

    @af.intelligent_streaming(1, over="companies")
    class Where(af.Agent):
        def call(self, context: Any) -> None:
            threads.add(threading.current_thread().name)

    af.Flow(Where).run(companies=make_companies(4), progress=False)
    assert threads == {threading.current_thread().name}

    threads.clear()
    result = (
        af.Flow(Where)
        .with_options(max_concurrency=2)
        .run(companies=make_companies(4), progress=False)
    )
    assert all(name.startswith("arrowflow-stream") for name in threads)
    assert result["companies"].equals(make_companies(4))


def test_scope_names_the_trigger_of_a_later_scope(make_companies) -> None:
    first = _streaming_agent(5)

    @af.ends_batching
    class End(af.Agent):
        def call(self, context: Any) -> None:
            return None

    @af.intelligent_streaming(5, over="companies")
    class Second(af.Agent):
        def call(self, context: Any) -> None:
            return None

    flow = (first >> End >> Second).with_options(stream_size=2, scope="Second")
    result = flow.run(companies=make_companies(5), progress=False)
    assert _sizes(result, 0) == [5]
    assert _sizes(result, 1) == [2, 2, 1]


def test_options_survive_composition(make_companies, passthrough) -> None:
    flow = passthrough >> af.Flow(_streaming_agent(10)).with_options(stream_size=3)
    assert _sizes(flow.run(companies=make_companies(7), progress=False)) == [3, 3, 1]
    assert flow != af.Flow(*flow.agents)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stream_size": 0}, "greater than 0"),
        ({"stream_size": "10"}, "stream_size"),
        ({"stream_size": True}, "stream_size"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"state": object()}, "state= must be a store"),
        ({"scope": "Nobody"}, "'Nobody' is in no scope; the scopes are triggered by 'Triple'"),
    ],
)
def test_bad_options_are_refused_before_running(options: dict[str, Any], message: str) -> None:
    with pytest.raises(af.ConfigurationError, match=message):
        af.Flow(_streaming_agent()).with_options(**options)


def test_a_flow_without_scope_is_refused(passthrough) -> None:
    with pytest.raises(af.ConfigurationError, match="no streaming scope"):
        af.Flow(passthrough).with_options(stream_size=3)


def test_two_scopes_with_one_trigger_name_are_ambiguous() -> None:
    triple = _streaming_agent()

    @af.ends_batching
    class End(af.Agent):
        def call(self, context: Any) -> None:
            return None

    with pytest.raises(af.ConfigurationError, match="'Triple' triggers two scopes"):
        (triple >> End >> triple).with_options(stream_size=3)


def test_state_is_overridden(tmp_path: Path, make_companies) -> None:
    declared = af.DuckDBState(tmp_path / "declared.duckdb", table="t", key="id")
    other = af.DuckDBState(tmp_path / "other.duckdb", table="t", key="id")
    triple = _streaming_agent(4, state=declared)

    result = (
        af.Flow(triple).with_options(state=other).run(companies=make_companies(10), progress=False)
    )

    assert result["companies"].equals(_triple(make_companies(10)))
    assert not (tmp_path / "declared.duckdb").exists()
    again = (
        af.Flow(triple).with_options(state=other).run(companies=make_companies(10), progress=False)
    )
    assert again.stats[0]["skipped_items"] == 10
    assert again["companies"].equals(result["companies"])


def test_a_run_resumed_at_another_stream_size_skips_what_is_done(
    tmp_path: Path, make_companies
) -> None:
    """The fingerprint does not depend on the stream size or the concurrency."""
    store = af.DuckDBState(tmp_path / "state.duckdb", table="t", key="id")
    calls: list[list[int]] = []
    fail = [True]

    @af.intelligent_streaming(10, over="companies", state=store)
    class Triple(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            rows = context["companies"]
            if fail[0] and context["_batch_metadata"]["batch_number"] == 3:
                raise ConnectionError("the service went away")
            calls.append(rows["id"].to_pylist())
            return {"companies": _triple(rows)}

    companies = make_companies(50)
    with pytest.raises(af.BatchExecutionError):
        af.Flow(Triple).run(companies=companies, progress=False)
    assert [len(ids) for ids in calls] == [10, 10]

    calls.clear()
    fail[0] = False
    resumed = af.Flow(Triple).with_options(stream_size=7, max_concurrency=2)
    result = resumed.run(companies=companies, progress=False)

    assert sorted(i for ids in calls for i in ids) == list(range(20, 50))
    assert result.stats[0]["skipped_items"] == 20
    assert result["companies"].equals(_triple(companies))


def test_pipeline_class_and_instance(make_companies) -> None:
    triple = _streaming_agent(10)

    class Tripling(af.Pipeline):
        flow = triple

    small = Tripling.with_options(stream_size=3)
    assert small.__name__ == "Tripling"
    assert issubclass(small, Tripling)
    assert _sizes(small(companies=make_companies(7)).run(progress=False)) == [3, 3, 1]

    pipeline = Tripling(companies=make_companies(7))
    derived = pipeline.with_options(stream_size=2)
    assert isinstance(derived, Tripling)
    assert _sizes(derived.run(progress=False)) == [2, 2, 2, 1]
    assert _sizes(pipeline.run(progress=False)) == [7]
    assert Tripling.flow is triple
