"""Running a scope: hooks, errors, retries, statistics and merging (DESIGN §4, §6)."""

from __future__ import annotations

import datetime as dt
import gc
import logging
import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

import arrowflow as af

STREAM_COLUMNS = [
    "stream_num",
    "rows_in",
    "rows_out",
    "skipped",
    "loaded",
    "seconds",
    "attempts",
    "status",
    "error",
]
STATS_KEYS = {
    "total_batches",
    "successful_batches",
    "failed_batches",
    "total_items",
    "processed_items",
    "skipped_items",
    "loaded_items",
    "start_time",
    "end_time",
    "streams",
}


def _evens(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(pc.bit_wise_and(table["id"], 1), 0))


def _with_double(table: pa.Table) -> pa.Table:
    return table.append_column("double", pc.multiply(table["id"], 2))


class Boom(Exception):
    """The error the failing agents of these tests raise."""


def _failing_member(events: list[Any], fail_streams: set[int], name: str = "DeepIntel"):
    """A scope member that raises ``Boom`` in the given streams and keeps even ids otherwise."""

    class DeepIntel(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            k = context["_batch_metadata"]["batch_number"]
            events.append(("call", k))
            if k in fail_streams:
                raise Boom(f"boom in stream {k}")
            return {"companies": _evens(context["companies"])}

    DeepIntel.name = name
    return DeepIntel


# --------------------------------------------------------------------------- hooks


class TestHooks:
    def test_method_hooks_incremental(self, make_companies, events, terminator) -> None:
        @af.intelligent_streaming(10, over="companies", incremental=True)
        class QuickFit(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                events.append(("call", context["_batch_metadata"]["batch_number"]))
                return {"companies": _evens(context["companies"])}

            def on_stream_start(self, stream_num: int, total: int, context: Any) -> None:
                companies = context["companies"]
                meta = context["_batch_metadata"]
                assert meta["batch_number"] == stream_num
                events.append(
                    ("start", stream_num, total, companies["id"][0].as_py(), len(companies))
                )

            def on_stream_complete(self, stream_num: int, total: int, results: pa.Table) -> None:
                assert isinstance(results, pa.Table)
                events.append(("complete", stream_num, total, results["id"].to_pylist()))

        result = (QuickFit >> terminator).run(companies=make_companies(25))
        assert events == [
            ("start", 1, 3, 0, 10),
            ("call", 1),
            ("complete", 1, 3, [0, 2, 4, 6, 8]),
            ("start", 2, 3, 10, 10),
            ("call", 2),
            ("complete", 2, 3, [10, 12, 14, 16, 18]),
            ("start", 3, 3, 20, 5),
            ("call", 3),
            ("complete", 3, 3, [20, 22, 24]),
            ("end", 13),
        ]
        assert result["companies"]["id"].to_pylist() == list(range(0, 25, 2))

    def test_method_hooks_not_incremental(self, make_companies, events, terminator) -> None:
        @af.intelligent_streaming(10, over="companies")
        class QuickFit(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                events.append(("call", context["_batch_metadata"]["batch_number"]))
                return {"companies": _evens(context["companies"])}

            def on_stream_start(self, stream_num: int, total: int, context: Any) -> None:
                events.append(("start", stream_num, total, context["companies"].num_rows))

            def on_stream_complete(self, stream_num: int, total: int, results: pa.Table) -> None:
                assert isinstance(results, pa.Table)
                events.append(("complete", stream_num, total, results["id"].to_pylist()))

        (QuickFit >> terminator).run(companies=make_companies(25))
        assert events == [
            ("start", 1, 3, 10),
            ("call", 1),
            ("start", 2, 3, 10),
            ("call", 2),
            ("start", 3, 3, 5),
            ("call", 3),
            ("complete", 3, 3, list(range(0, 25, 2))),
            ("end", 13),
        ]

    def test_keyword_hooks(self, make_companies, events, terminator) -> None:
        def on_start(stream_num: int, total: int, context: Any) -> None:
            events.append(("start", stream_num, total, context["companies"].num_rows))

        def on_complete(stream_num: int, total: int, results: pa.Table) -> None:
            events.append(("complete", stream_num, total, results.num_rows))

        @af.intelligent_streaming(
            10,
            over="companies",
            incremental=True,
            on_stream_start=on_start,
            on_stream_complete=on_complete,
        )
        class QuickFit(af.Agent):
            def call(self, context: Any) -> None:
                events.append(("call", context["_batch_metadata"]["batch_number"]))

        (QuickFit >> terminator).run(companies=make_companies(25))
        assert events == [
            ("start", 1, 3, 10),
            ("call", 1),
            ("complete", 1, 3, 10),
            ("start", 2, 3, 10),
            ("call", 2),
            ("complete", 2, 3, 10),
            ("start", 3, 3, 5),
            ("call", 3),
            ("complete", 3, 3, 5),
            ("end", 25),
        ]

    def test_batch_aliases_as_methods(self, make_companies, events, passthrough) -> None:
        @af.intelligent_streaming(10, over="companies", incremental=True, on_error="continue")
        class QuickFit(af.Agent):
            def call(self, context: Any) -> None:
                if context["_batch_metadata"]["batch_number"] == 2:
                    raise Boom("second")

            def on_batch_start(self, stream_num: int, total: int, context: Any) -> None:
                events.append(("start", stream_num, total))

            def on_batch_complete(self, stream_num: int, total: int, results: pa.Table) -> None:
                events.append(("complete", stream_num, total, results.num_rows))

            def on_batch_error(
                self, stream_num: int, total: int, error: Exception, context: Any
            ) -> None:
                events.append(("error", stream_num, total, str(error)))

        (QuickFit >> passthrough).run(companies=make_companies(25))
        assert events == [
            ("start", 1, 3),
            ("complete", 1, 3, 10),
            ("start", 2, 3),
            ("error", 2, 3, "second"),
            ("start", 3, 3),
            ("complete", 3, 3, 5),
        ]

    def test_keyword_hook_wins_over_method(self, make_companies, events, passthrough) -> None:
        def on_stream_start(stream_num: int, total: int, context: Any) -> None:
            events.append(("keyword", stream_num))

        @af.intelligent_streaming(10, over="companies", on_stream_start=on_stream_start)
        class QuickFit(af.Agent):
            def call(self, context: Any) -> None:
                return None

            def on_stream_start(self, stream_num: int, total: int, context: Any) -> None:
                events.append(("method", stream_num))

        (QuickFit >> passthrough).run(companies=make_companies(25))
        assert events == [("keyword", 1), ("keyword", 2), ("keyword", 3)]

    def test_raising_hook_is_logged_and_run_goes_on(
        self, make_companies, events, terminator, caplog
    ) -> None:
        caplog.set_level(logging.DEBUG)

        @af.intelligent_streaming(10, over="companies", incremental=True)
        class QuickFit(af.Agent):
            def call(self, context: Any) -> None:
                events.append(("call", context["_batch_metadata"]["batch_number"]))

            def on_stream_start(self, stream_num: int, total: int, context: Any) -> None:
                raise RuntimeError("hook failed")

            def on_stream_complete(self, stream_num: int, total: int, results: pa.Table) -> None:
                raise RuntimeError("hook failed too")

        result = (QuickFit >> terminator).run(companies=make_companies(25))
        assert events == [("call", 1), ("call", 2), ("call", 3), ("end", 25)]
        assert result["companies"].num_rows == 25
        assert result.stats[0]["failed_batches"] == 0
        records = [r for r in caplog.records if r.name.split(".")[0] == "arrowflow"]
        start_logs = [r for r in records if "on_stream_start" in r.getMessage()]
        complete_logs = [r for r in records if "on_stream_complete" in r.getMessage()]
        assert len(start_logs) == 3
        assert len(complete_logs) == 3

    def test_raising_error_hook_still_raises_batch_error(
        self, make_companies, events, caplog
    ) -> None:
        caplog.set_level(logging.DEBUG)

        def on_stream_error(stream_num: int, total: int, error: Exception, context: Any) -> None:
            events.append(("error", stream_num))
            raise RuntimeError("error hook failed")

        @af.intelligent_streaming(10, over="companies", on_stream_error=on_stream_error)
        class QuickFit(af.Agent):
            def call(self, context: Any) -> None:
                raise Boom("always")

        with pytest.raises(af.BatchExecutionError) as exc_info:
            (QuickFit >> _failing_member(events, set())).run(companies=make_companies(25))
        assert isinstance(exc_info.value.original_error, Boom)
        assert events == [("error", 1)]
        assert any(
            "on_stream_error" in r.getMessage()
            for r in caplog.records
            if r.name.split(".")[0] == "arrowflow"
        )


# --------------------------------------------------------------------------- errors


class TestErrors:
    def test_batch_execution_error(self, make_companies, events) -> None:
        errors: list[tuple[int, int, BaseException, int]] = []

        def on_error(stream_num: int, total: int, error: BaseException, context: Any) -> None:
            errors.append((stream_num, total, error, context["companies"].num_rows))

        @af.intelligent_streaming(10, over="companies", on_stream_error=on_error)
        class QuickFit(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                return {"companies": _with_double(context["companies"])}

        @af.ends_batching
        class Scoring(af.Agent):
            def call(self, context: Any) -> None:
                events.append("Scoring")

        member = _failing_member(events, {3})
        with pytest.raises(af.BatchExecutionError) as exc_info:
            (QuickFit >> member >> Scoring).run(companies=make_companies(25))
        err = exc_info.value
        assert isinstance(err, af.ExecutionError)
        assert err.batch_number == 3
        assert err.total_batches == 3
        assert isinstance(err.original_error, Boom)
        assert str(err.original_error) == "boom in stream 3"
        assert err.__cause__ is err.original_error
        assert "DeepIntel" in str(err)
        assert re.search(r"stream\W+3", str(err), re.IGNORECASE)
        expected = _evens(_with_double(make_companies(20)))
        partial = err.partial_results["companies"]
        assert isinstance(partial, pa.Table)
        assert partial.equals(expected)
        assert len(errors) == 1
        stream_num, total, error, rows = errors[0]
        assert (stream_num, total, rows) == (3, 3, 5)
        assert error is err.original_error
        assert "Scoring" not in events
        assert events == [("call", 1), ("call", 2), ("call", 3)]

    def test_first_stream_failure_has_empty_partial_results(self, make_companies, events):
        trigger = af.intelligent_streaming(10, over="companies")(_failing_member(events, {1}))
        with pytest.raises(af.BatchExecutionError) as exc_info:
            (trigger >> _failing_member([], set(), "Other")).run(companies=make_companies(25))
        err = exc_info.value
        assert err.batch_number == 1
        assert events == [("call", 1)]
        partial = err.partial_results.get("companies")
        assert partial is None or partial.num_rows == 0

    def test_on_error_continue(self, make_companies, events, terminator) -> None:
        errors: list[int] = []

        @af.intelligent_streaming(
            10,
            over="companies",
            on_error="continue",
            on_stream_error=lambda k, total, error, context: errors.append(k),
        )
        class QuickFit(af.Agent):
            def call(self, context: Any) -> None:
                return None

        member = _failing_member(events, {2})
        result = (QuickFit >> member >> terminator).run(companies=make_companies(25))
        expected_ids = [0, 2, 4, 6, 8, 20, 22, 24]
        assert result["companies"]["id"].to_pylist() == expected_ids
        assert errors == [2]
        assert events == [("call", 1), ("call", 2), ("call", 3), ("end", 8)]
        (stats,) = result.stats
        assert stats["total_batches"] == 3
        assert stats["successful_batches"] == 2
        assert stats["failed_batches"] == 1
        assert stats["total_items"] == 25
        assert stats["processed_items"] == 15
        streams = stats["streams"]
        assert streams["status"].to_pylist() == ["ok", "failed", "ok"]
        assert streams["rows_in"].to_pylist() == [10, 10, 5]
        assert streams["rows_out"].to_pylist()[0] == 5
        assert streams["rows_out"].to_pylist()[2] == 3
        error_texts = streams["error"].to_pylist()
        assert error_texts[0] is None
        assert error_texts[2] is None
        assert "boom in stream 2" in error_texts[1]

    def test_on_error_continue_final_complete_hook(self, make_companies, events) -> None:
        @af.intelligent_streaming(
            10,
            over="companies",
            on_error="continue",
            on_stream_complete=lambda k, total, results: events.append(
                ("complete", k, total, results["id"].to_pylist())
            ),
        )
        class QuickFit(af.Agent):
            def call(self, context: Any) -> None:
                return None

        (QuickFit >> _failing_member(events, {2})).run(companies=make_companies(25))
        assert events == [
            ("call", 1),
            ("call", 2),
            ("call", 3),
            ("complete", 3, 3, [0, 2, 4, 6, 8, 20, 22, 24]),
        ]

    def test_partial_results_hold_the_merged_context(self, make_companies, events) -> None:
        @af.intelligent_streaming(10, over="companies")
        class Count(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                return {"count": context["companies"].num_rows}

        with pytest.raises(af.BatchExecutionError) as exc_info:
            (Count >> _failing_member(events, {3})).run(companies=make_companies(30), query="tech")
        partial = exc_info.value.partial_results
        assert partial["companies"]["id"].to_pylist() == list(range(0, 20, 2))
        assert partial["count"] == [10, 10]
        assert partial["query"] == "tech"
        assert "_batch_metadata" not in partial


# --------------------------------------------------------------------------- retries


def _flaky(failures: int, error: type[Exception] = ConnectionError):
    """An agent class that raises ``error`` on its first ``failures`` calls."""

    class Flaky(af.Agent):
        calls: list[int] = []
        raised: list[BaseException] = []

        def call(self, context: Any) -> None:
            k = context["_batch_metadata"]["batch_number"]
            type(self).calls.append(k)
            if len(type(self).calls) <= failures:
                exc = error(f"transient {len(type(self).calls)}")
                type(self).raised.append(exc)
                raise exc

    Flaky.calls = []
    Flaky.raised = []
    return Flaky


class TestRetries:
    def test_transient_error_recovers(self, make_companies, passthrough) -> None:
        errors: list[int] = []
        flaky = _flaky(2)
        flaky.intelligent_streaming(
            10,
            over="companies",
            retries=2,
            backoff=0,
            on_stream_error=lambda *args: errors.append(args[0]),
        )
        result = (flaky >> passthrough).run(companies=make_companies(25))
        assert flaky.calls == [1, 1, 1, 2, 3]
        assert errors == []
        assert result["companies"].equals(make_companies(25))
        (stats,) = result.stats
        assert stats["failed_batches"] == 0
        assert stats["successful_batches"] == 3
        assert stats["streams"]["attempts"].to_pylist() == [3, 1, 1]
        assert stats["streams"]["status"].to_pylist() == ["ok", "ok", "ok"]

    def test_retries_exhausted(self, make_companies, passthrough) -> None:
        errors: list[tuple[int, BaseException]] = []
        flaky = _flaky(100)
        flaky.intelligent_streaming(
            10,
            over="companies",
            retries=2,
            backoff=0,
            on_stream_error=lambda k, total, error, context: errors.append((k, error)),
        )
        with pytest.raises(af.BatchExecutionError) as exc_info:
            (flaky >> passthrough).run(companies=make_companies(25))
        assert flaky.calls == [1, 1, 1]
        assert exc_info.value.original_error is flaky.raised[-1]
        assert exc_info.value.__cause__ is flaky.raised[-1]
        assert len(errors) == 1
        assert errors[0][0] == 1
        assert errors[0][1] is flaky.raised[-1]

    def test_retry_on_restricts_retried_errors(self, make_companies, passthrough) -> None:
        flaky = _flaky(1, error=ValueError)
        flaky.intelligent_streaming(
            10, over="companies", retries=3, backoff=0, retry_on=(ConnectionError,)
        )
        with pytest.raises(af.BatchExecutionError) as exc_info:
            (flaky >> passthrough).run(companies=make_companies(25))
        assert flaky.calls == [1]
        assert isinstance(exc_info.value.original_error, ValueError)

    def test_retry_on_matching_error_is_retried(self, make_companies, passthrough) -> None:
        flaky = _flaky(1, error=ConnectionResetError)
        flaky.intelligent_streaming(
            10, over="companies", retries=1, backoff=0, retry_on=(ConnectionError,)
        )
        result = (flaky >> passthrough).run(companies=make_companies(25))
        assert flaky.calls == [1, 1, 2, 3]
        assert result.stats[0]["streams"]["attempts"].to_pylist() == [2, 1, 1]

    def test_not_retried_attempts_recorded(self, make_companies, passthrough) -> None:
        flaky = _flaky(1, error=ValueError)
        flaky.intelligent_streaming(
            10,
            over="companies",
            retries=3,
            backoff=0,
            retry_on=(ConnectionError,),
            on_error="continue",
        )
        result = (flaky >> passthrough).run(companies=make_companies(25))
        assert flaky.calls == [1, 2, 3]
        streams = result.stats[0]["streams"]
        assert streams["attempts"].to_pylist() == [1, 1, 1]
        assert streams["status"].to_pylist() == ["failed", "ok", "ok"]
        assert result["companies"]["id"].to_pylist() == list(range(10, 25))

    def test_retry_reruns_the_whole_stream(self, make_companies, events) -> None:
        @af.intelligent_streaming(10, over="companies", retries=1, backoff=0)
        class QuickFit(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                events.append(("trigger", context["_batch_metadata"]["batch_number"]))
                return {"companies": _with_double(context["companies"])}

        flaky = _flaky(1)
        result = (QuickFit >> flaky).run(companies=make_companies(15))
        assert events == [("trigger", 1), ("trigger", 1), ("trigger", 2)]
        assert result["companies"].equals(_with_double(make_companies(15)))


# --------------------------------------------------------------------------- statistics


class TestStats:
    def test_execution_stats(self, make_companies, terminator) -> None:
        @af.intelligent_streaming(10, over="companies")
        class QuickFit(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                return {"companies": _evens(context["companies"])}

        before = dt.datetime.now(dt.UTC)
        result = (QuickFit >> terminator).run(companies=make_companies(25))
        after = dt.datetime.now(dt.UTC)
        assert isinstance(result.stats, list)
        (stats,) = result.stats
        assert set(stats) == STATS_KEYS
        assert stats["total_batches"] == 3
        assert stats["successful_batches"] == 3
        assert stats["failed_batches"] == 0
        assert stats["total_items"] == 25
        assert stats["processed_items"] == 25
        assert stats["skipped_items"] == 0
        assert stats["loaded_items"] == 0
        for key in ("start_time", "end_time"):
            value = stats[key]
            assert isinstance(value, dt.datetime)
            assert value.tzinfo is not None
            assert value.utcoffset() == dt.timedelta(0)
        assert before <= stats["start_time"] <= stats["end_time"] <= after

        streams = stats["streams"]
        assert isinstance(streams, pa.Table)
        assert streams.column_names == STREAM_COLUMNS
        assert streams["stream_num"].to_pylist() == [1, 2, 3]
        assert streams["rows_in"].to_pylist() == [10, 10, 5]
        assert streams["rows_out"].to_pylist() == [5, 5, 3]
        assert streams["skipped"].to_pylist() == [0, 0, 0]
        assert streams["loaded"].to_pylist() == [0, 0, 0]
        assert streams["attempts"].to_pylist() == [1, 1, 1]
        assert streams["status"].to_pylist() == ["ok", "ok", "ok"]
        assert streams["error"].to_pylist() == [None, None, None]
        assert all(s >= 0 for s in streams["seconds"].to_pylist())

    def test_no_scope_no_stats(self, passthrough) -> None:
        assert (passthrough >> passthrough).run(x=1).stats == []

    def test_one_entry_per_scope_in_flow_order(self, make_companies) -> None:
        @af.intelligent_streaming(10, over="companies")
        class First(af.Agent):
            def call(self, context: Any) -> None:
                return None

        @af.ends_batching
        class Middle(af.Agent):
            def call(self, context: Any) -> None:
                return None

        @af.intelligent_streaming(4, over="companies")
        class Second(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                return {"companies": _evens(context["companies"])}

        result = (First >> Middle >> Second).run(companies=make_companies(25))
        assert [s["total_batches"] for s in result.stats] == [3, 7]
        assert [s["total_items"] for s in result.stats] == [25, 25]
        assert result["companies"]["id"].to_pylist() == list(range(0, 25, 2))

    # --------------------------------------------------------------------------- merging

    def test_what_a_run_keeps_per_stream_is_not_walked_by_the_garbage_collector(
        self, make_companies
    ) -> None:
        """A run keeps each stream's output and statistics to its end. Were they objects the
        garbage collector tracks, a run of millions of streams would make every full
        collection walk them all (and trigger more of them)."""
        tracked: dict[int, int] = {}

        @af.intelligent_streaming(2, over="companies", incremental=True)
        class Tag(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                rows = context["companies"]
                return {"companies": rows, "note": "seen"}

            def on_stream_complete(self, num: int, total: int, results: Any) -> None:
                if num in (20, 220):
                    gc.collect()
                    tracked[num] = len(gc.get_objects())

        result = af.Flow(Tag).run(companies=make_companies(500))
        assert result["companies"].num_rows == 500
        assert result.stats[0]["total_batches"] == 250
        # 200 streams in between: a tracked object per stream would add 200.
        assert tracked[220] - tracked[20] < 20


class TestMerge:
    def test_null_typed_column_is_unified(self, make_companies, passthrough) -> None:
        @af.intelligent_streaming(10, over="companies")
        class Score(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                companies = context["companies"]
                k = context["_batch_metadata"]["batch_number"]
                if k == 2:
                    score = pa.nulls(companies.num_rows)
                else:
                    score = pa.array([k] * companies.num_rows, pa.int64())
                return {"companies": companies.append_column("score", score)}

        result = (Score >> passthrough).run(companies=make_companies(25))
        out = result["companies"]
        assert out.schema.field("score").type == pa.int64()
        assert out["score"].to_pylist() == [1] * 10 + [None] * 10 + [3] * 5
        assert out["id"].to_pylist() == list(range(25))

    def test_missing_column_is_unified(self, make_companies, passthrough) -> None:
        @af.intelligent_streaming(10, over="companies")
        class Score(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                companies = context["companies"]
                if context["_batch_metadata"]["batch_number"] == 1:
                    return None
                return {"companies": companies.append_column("extra", companies["id"])}

        result = (Score >> passthrough).run(companies=make_companies(25))
        out = result["companies"]
        assert out.num_rows == 25
        assert out["extra"].to_pylist() == [None] * 10 + list(range(10, 25))

    def test_incompatible_schemas_name_the_stream(self, make_companies, passthrough) -> None:
        @af.intelligent_streaming(10, over="companies")
        class Score(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                companies = context["companies"]
                k = context["_batch_metadata"]["batch_number"]
                if k == 2:
                    score = pa.array(["high"] * companies.num_rows, pa.string())
                else:
                    score = pa.array([k] * companies.num_rows, pa.int64())
                return {"companies": companies.append_column("score", score)}

        with pytest.raises(af.ExecutionError) as exc_info:
            (Score >> passthrough).run(companies=make_companies(25))
        message = str(exc_info.value)
        assert re.search(r"stream\W+2", message, re.IGNORECASE)
        assert "score" in message

    def test_other_values_collected_per_stream(self, make_companies, passthrough) -> None:
        @af.intelligent_streaming(10, over="companies")
        class Count(af.Agent):
            def call(self, context: Any) -> dict[str, Any] | None:
                k = context["_batch_metadata"]["batch_number"]
                if k == 2:
                    return None
                return {"count": context["companies"].num_rows, "label": f"s{k}"}

        result = (Count >> passthrough).run(
            companies=make_companies(25), label="before", untouched="kept"
        )
        assert result["count"] == [10, 5]
        assert result["label"] == ["s1", "s3"]
        assert result["untouched"] == "kept"
        assert "_batch_metadata" not in result

    def test_other_tabular_fields_concatenated(self, make_companies, passthrough) -> None:
        @af.intelligent_streaming(10, over="companies")
        class Split(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                companies = context["companies"]
                rejected = companies.filter(pc.field("employees") >= 50)
                return {
                    "companies": companies.filter(pc.field("employees") < 50),
                    "rejected": rejected.to_batches()[0] if rejected.num_rows else rejected,
                }

        table = make_companies(25)
        result = (Split >> passthrough).run(companies=table)
        assert isinstance(result["rejected"], pa.Table)
        assert result["rejected"]["id"].to_pylist() == (
            table.filter(pc.field("employees") >= 50)["id"].to_pylist()
        )
        assert result["companies"]["id"].to_pylist() == (
            table.filter(pc.field("employees") < 50)["id"].to_pylist()
        )

    def test_mixed_tabular_and_other_values_are_listed(self, make_companies, passthrough):
        @af.intelligent_streaming(10, over="companies")
        class Mixed(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                k = context["_batch_metadata"]["batch_number"]
                if k == 2:
                    return {"extra": "not a table"}
                return {"extra": context["companies"].select(["id"])}

        result = (Mixed >> passthrough).run(companies=make_companies(25))
        extra = result["extra"]
        assert isinstance(extra, list)
        assert len(extra) == 3
        assert extra[0]["id"].to_pylist() == list(range(10))
        assert extra[1] == "not a table"
        assert extra[2]["id"].to_pylist() == list(range(20, 25))

    def test_expanding_agent(self, make_companies, passthrough) -> None:
        @af.intelligent_streaming(10, over="companies")
        class Twice(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                companies = context["companies"]
                return {"companies": pa.concat_tables([companies, companies])}

        result = (Twice >> passthrough).run(companies=make_companies(25))
        ids = result["companies"]["id"].to_pylist()
        assert ids == [*range(10)] * 2 + [*range(10, 20)] * 2 + [*range(20, 25)] * 2
        assert result.stats[0]["streams"]["rows_out"].to_pylist() == [20, 20, 10]


# --------------------------------------------------------------------------- PipelineBatchExecutor


class TestPipelineBatchExecutor:
    @pytest.fixture
    def scope(self, events):
        @af.intelligent_streaming(10, over="companies")
        class QuickFit(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                events.append(("QuickFit", context["_batch_metadata"]["batch_number"]))
                return {"companies": _with_double(context["companies"])}

        class DeepIntel(af.Agent):
            def call(self, context: Any) -> dict[str, Any]:
                events.append(("DeepIntel", context["_batch_metadata"]["batch_number"]))
                return {"companies": _evens(context["companies"])}

        scope = af.BatchingScope(QuickFit)
        scope.add_agent(DeepIntel)
        return scope

    def test_execute_in_batches(self, scope, make_companies, events) -> None:
        executor = af.PipelineBatchExecutor(scope)
        table = make_companies(25)
        merged = executor.execute_in_batches({"companies": table, "query": "tech"})
        assert isinstance(merged, dict)
        assert merged["companies"].equals(_evens(_with_double(table)))
        assert merged["query"] == "tech"
        assert "_batch_metadata" not in merged
        assert events == [
            ("QuickFit", 1),
            ("DeepIntel", 1),
            ("QuickFit", 2),
            ("DeepIntel", 2),
            ("QuickFit", 3),
            ("DeepIntel", 3),
        ]
        assert len(executor.accumulated_results) == 3
        stats = executor.execution_stats
        assert set(stats) == STATS_KEYS
        assert stats["total_batches"] == 3
        assert stats["total_items"] == 25
        assert stats["streams"]["rows_out"].to_pylist() == [5, 5, 3]

    def test_does_not_mutate_the_context(self, scope, make_companies) -> None:
        table = make_companies(25)
        context = {"companies": table, "query": "tech"}
        af.PipelineBatchExecutor(scope).execute_in_batches(context)
        assert context == {"companies": table, "query": "tech"}
        assert table.equals(make_companies(25))

    def test_agent_results_laid_over_context(self, scope, make_companies) -> None:
        executor = af.PipelineBatchExecutor(scope)
        merged = executor.execute_in_batches(
            {"companies": make_companies(5), "query": "old"},
            agent_results={"companies": make_companies(12), "query": "new"},
        )
        assert merged["companies"].num_rows == 6
        assert merged["query"] == "new"
        assert executor.execution_stats["total_batches"] == 2

    def test_accumulated_results_reset_per_call(self, scope, make_companies) -> None:
        executor = af.PipelineBatchExecutor(scope)
        executor.execute_in_batches({"companies": make_companies(25)})
        assert len(executor.accumulated_results) == 3
        executor.execute_in_batches({"companies": make_companies(15)})
        assert len(executor.accumulated_results) == 2
        assert executor.execution_stats["total_batches"] == 2
        assert executor.execution_stats["total_items"] == 15

    def test_scope_chunk_size_wins(self, make_companies, events) -> None:
        @af.intelligent_streaming(10, over="companies")
        class QuickFit(af.Agent):
            def call(self, context: Any) -> None:
                events.append(context["_batch_metadata"]["batch_size"])

        scope = af.BatchingScope(QuickFit, chunk_size=4)
        merged = af.PipelineBatchExecutor(scope).execute_in_batches(
            {"companies": make_companies(10)}
        )
        assert events == [4, 4, 2]
        assert merged["companies"].equals(make_companies(10))

    def test_empty_table(self, scope, make_companies, events) -> None:
        executor = af.PipelineBatchExecutor(scope)
        table = make_companies(0)
        merged = executor.execute_in_batches({"companies": table})
        assert events == []
        assert merged["companies"].num_rows == 0
        assert merged["companies"].schema.equals(table.schema)
        assert executor.accumulated_results == []
        assert executor.execution_stats["total_batches"] == 0
        assert executor.execution_stats["streams"].num_rows == 0

    def test_failure_raises_batch_execution_error(self, make_companies, events) -> None:
        trigger = af.intelligent_streaming(10, over="companies")(_failing_member(events, {2}))
        executor = af.PipelineBatchExecutor(af.BatchingScope(trigger))
        with pytest.raises(af.BatchExecutionError) as exc_info:
            executor.execute_in_batches({"companies": make_companies(25)})
        assert exc_info.value.batch_number == 2
        assert exc_info.value.partial_results["companies"]["id"].to_pylist() == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("retries", [0, 1])
def test_a_stuck_attempt_times_out_close_to_the_configured_timeout(
    make_companies: Any, retries: int
) -> None:
    # Imported here: this test is appended to a module others edit, leaving its imports alone.
    import threading
    import time

    timeout = 0.5
    never = threading.Event()

    @af.intelligent_streaming(5, over="companies", timeout=timeout, retries=retries, backoff=0)
    class Stuck(af.Agent):
        def call(self, context: Any) -> None:
            if context["_batch_metadata"]["batch_number"] == 2:
                never.wait(60)  # a generous bound: the event is set when the test ends

    started = time.monotonic()
    try:
        with pytest.raises(af.BatchExecutionError) as info:
            af.Flow(Stuck).run(companies=make_companies(15))
        elapsed = time.monotonic() - started
    finally:
        never.set()

    assert info.value.batch_number == 2
    assert type(info.value.original_error) is TimeoutError
    attempts = retries + 1
    assert elapsed >= attempts * timeout, "an attempt was abandoned before its timeout"
    # Far from the 10 x timeout per attempt a wrong unit or a lost timeout would take.
    assert elapsed < attempts * timeout + 2.0
