"""The built-in prospect pipeline, run by ``make demo`` or ``python -m arrowflow.demo``.

``CompanyDiscovery >> QuickFitAnalyzer >> DeepIntel >> Scoring`` over the company register in
``data/companies.parquet`` (see ``data/README.md``):

- ``CompanyDiscovery`` reads the Parquet file into the field ``companies``.
- ``QuickFitAnalyzer`` starts the streaming scope: ``companies`` is cut into streams of 1,000
  rows, and each stream keeps the companies with at least 10 employees in a target industry.
- ``DeepIntel`` runs inside the scope, on each filtered stream, and adds
  ``revenue_per_employee``, ``age`` and ``segment``.
- ``Scoring`` ends the scope: it sees every stream merged in order, adds ``score`` and sorts by
  it, best prospects first.

Every step is vectorised with ``pyarrow.compute``; no Python code runs per row.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import arrowflow as af

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "CompanyDiscovery",
    "DeepIntel",
    "ProspectPipeline",
    "QuickFitAnalyzer",
    "Scoring",
    "main",
    "missing_input",
    "pipeline_for",
    "run_demo",
]

DEFAULT_INPUT = Path("data/companies.parquet")
DEFAULT_OUTPUT = Path("out/prospects.parquet")
DEFAULT_STATE = Path("out/state.duckdb")
STREAM_SIZE = 1_000
MIN_EMPLOYEES = 10
MAX_EMPLOYEES = 50_000
TARGET_INDUSTRIES = ("Software", "Fintech", "Cybersecurity", "Healthcare", "E-commerce", "Biotech")
# The register's reference year, fixed so that reruns give the same ages and scores.
REFERENCE_YEAR = 2025


class CompanyDiscovery(af.Agent):
    """Load the register named by the context field ``input_path`` into ``companies``."""

    def call(self, context: Mapping[str, Any]) -> dict[str, Any]:
        return {"companies": af.read_parquet(context["input_path"])}


@af.intelligent_streaming(stream_size=STREAM_SIZE, over="companies", incremental=True)
class QuickFitAnalyzer(af.Agent):
    """Keep companies of a workable size in a target industry, one stream at a time."""

    _rows_in: int | None = None

    def call(self, context: Mapping[str, Any]) -> dict[str, Any]:
        companies: pa.Table = context["companies"]
        fits = pc.and_(
            pc.greater_equal(companies["employees"], pa.scalar(MIN_EMPLOYEES)),
            pc.is_in(companies["industry"], value_set=pa.array(TARGET_INDUSTRIES)),
        )
        return {"companies": companies.filter(fits)}

    def on_stream_start(
        self, stream_num: int, total: int | None, context: Mapping[str, Any]
    ) -> None:
        # One stream at a time (max_concurrency=1): one slot carries the size to the next hook.
        self._rows_in = context["_batch_metadata"]["batch_size"]

    def on_stream_complete(self, stream_num: int, total: int | None, results: pa.Table) -> None:
        print(f"stream {stream_num}/{total}: {self._rows_in:,} rows in -> {results.num_rows:,} out")


class DeepIntel(af.Agent):
    """Enrich each stream with revenue per employee, company age and a size segment."""

    def call(self, context: Mapping[str, Any]) -> dict[str, Any]:
        companies: pa.Table = context["companies"]
        employees = companies["employees"]
        per_employee = pc.round(pc.divide(companies["revenue"], pc.cast(employees, pa.float64())))
        segment = pc.case_when(
            pc.make_struct(
                pc.greater_equal(employees, pa.scalar(1_000)),
                pc.greater_equal(employees, pa.scalar(100)),
                field_names=["enterprise", "mid_market"],
            ),
            "enterprise",
            "mid-market",
            "smb",
        )
        return {
            "companies": companies.append_column("revenue_per_employee", per_employee)
            .append_column("age", pc.subtract(REFERENCE_YEAR, companies["founded"]))
            .append_column("segment", segment)
        }


@af.ends_batching
class Scoring(af.Agent):
    """Score the merged prospects out of 100 and sort them, best first (ties by id)."""

    def call(self, context: Mapping[str, Any]) -> dict[str, Any]:
        companies: pa.Table = context["companies"]
        employees = pc.cast(companies["employees"], pa.float64())
        # Size (40): log scale, so 100 employees already count for 43 % of the points.
        size = pc.divide(pc.log10(employees), math.log10(MAX_EMPLOYEES))
        # Efficiency (30): revenue per employee up to $300k; unknown revenue earns nothing.
        ratio = pc.divide(companies["revenue_per_employee"], 300_000.0)
        capped = pc.min_element_wise(ratio, 1.0, skip_nulls=False)
        efficiency = pc.coalesce(capped, pa.scalar(0.0))
        # Momentum (15): younger companies grow faster; 50 years and older earn nothing.
        momentum = pc.subtract(1.0, pc.divide(pc.min_element_wise(companies["age"], 50), 50.0))
        # Reachability (15): a known website.
        reachable = pc.cast(pc.is_valid(companies["website"]), pa.float64())
        score = pc.add(
            pc.add(pc.multiply(size, 40.0), pc.multiply(efficiency, 30.0)),
            pc.add(pc.multiply(momentum, 15.0), pc.multiply(reachable, 15.0)),
        )
        scored = companies.append_column("score", pc.round(score, 1))
        return {"companies": scored.sort_by([("score", "descending"), ("id", "ascending")])}


class ProspectPipeline(af.Pipeline):
    """Discovery, streamed quick fit and enrichment, then scoring of the merged prospects."""

    flow = CompanyDiscovery >> QuickFitAnalyzer >> DeepIntel >> Scoring


def pipeline_for(
    stream_size: int = STREAM_SIZE, state: af.DuckDBState | None = None
) -> type[af.Pipeline]:
    """The prospect pipeline, with QuickFitAnalyzer's stream size and state store replaced.

    The derived analyser keeps one qualified name whatever the stream size, so the state
    store's fingerprint, and the work it remembers, survive a change of stream size.
    """
    if stream_size == STREAM_SIZE and state is None:
        return ProspectPipeline

    @af.intelligent_streaming(
        stream_size, over="companies", incremental=True, override=True, state=state
    )
    class ConfiguredQuickFitAnalyzer(QuickFitAnalyzer):
        pass

    class ConfiguredProspectPipeline(ProspectPipeline):
        flow = CompanyDiscovery >> ConfiguredQuickFitAnalyzer >> DeepIntel >> Scoring

    return ConfiguredProspectPipeline


def run_demo(
    input_path: Path = DEFAULT_INPUT,
    output: Path = DEFAULT_OUTPUT,
    state_path: Path = DEFAULT_STATE,
    *,
    stream_size: int = STREAM_SIZE,
    fresh: bool = False,
) -> None:
    """Run the prospect pipeline over ``input_path``, print a summary, write the prospects.

    The state file remembers the companies analysed, so a rerun loads them; ``fresh`` removes
    it and the previous output first.

    Raises:
        ArrowflowError: the pipeline could not run (the message says why).
    """
    state_path.parent.mkdir(parents=True, exist_ok=True)
    if fresh:
        # DuckDB's journal goes too: replayed into a new database, it would bring back the old.
        for stale in (state_path, state_path.with_name(state_path.name + ".wal"), output):
            stale.unlink(missing_ok=True)
    state = af.DuckDBState(state_path, table="quick_fit", key="id")
    started = time.perf_counter()
    result = pipeline_for(stream_size, state)(input_path=str(input_path)).run()
    seconds = time.perf_counter() - started
    prospects: pa.Table = result["companies"]
    output.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(prospects, output)

    stats = result.stats[0]
    streams: pa.Table = stats["streams"]
    failed = f" ({stats['failed_batches']} failed)" if stats["failed_batches"] else ""
    print(
        f"\n{stats['total_batches']} streams of {stream_size:,} rows{failed}: "
        f"{stats['total_items']:,} companies in, {prospects.num_rows:,} prospects out "
        f"in {seconds:.3f}s ({pc.sum(streams['seconds']).as_py() or 0.0:.3f}s inside streams)"
    )
    if stats["skipped_items"]:
        print(
            f"{stats['skipped_items']:,} companies were already analysed: their results came "
            f"from {state_path} (--fresh to start over)"
        )
    for row in prospects.select(["name", "industry", "country", "score"]).slice(0, 5).to_pylist():
        print(f"  {row['score']:5.1f}  {row['name']} ({row['industry']}, {row['country']})")
    print(f"wrote {output} and {state_path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the prospect pipeline, print a summary and write the prospects as Parquet.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        The process exit code, 0 on success.
    """
    parser = argparse.ArgumentParser(
        prog="python -m arrowflow.demo", description="Score prospects from a company register."
    )
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="%(default)s")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="%(default)s")
    parser.add_argument("--stream-size", type=int, default=STREAM_SIZE, help="%(default)s")
    parser.add_argument(
        "--state",
        type=Path,
        default=DEFAULT_STATE,
        help="DuckDB file remembering the companies already analysed (%(default)s)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="forget the stored state and the previous output, and analyse everything",
    )
    args = parser.parse_args(argv)
    if not args.input.is_file():
        parser.error(missing_input(args.input))
    if args.stream_size < 1:
        parser.error(f"--stream-size must be a positive integer, got {args.stream_size}")
    try:
        run_demo(
            args.input, args.output, args.state, stream_size=args.stream_size, fresh=args.fresh
        )
    except af.ArrowflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def missing_input(path: Path) -> str:
    """The message for a company register that is not there, saying how to make one."""
    return f"no such file: {path} (make one with: python data/generate.py)"


if __name__ == "__main__":
    sys.exit(main())
