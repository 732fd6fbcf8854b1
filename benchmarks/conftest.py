"""Shared fixtures and the overhead report of the benchmarks.

The input size is ``ARROWFLOW_BENCH_ROWS`` rows (10,000,000 by default; set it lower for a quick
run). After the run, the terminal summary prints arrowflow's time over the hand-written loop's for
each stream size, both measured in this same session, then the sections other benchmarks leave in
the ``figures`` fixture (concurrency, memory).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pytest

ROWS = int(os.environ.get("ARROWFLOW_BENCH_ROWS", "10000000"))
ROUNDS = int(os.environ.get("ARROWFLOW_BENCH_ROUNDS", "20"))
SEED = 20240601

# Goal figures: reported beside the measurements, never asserted (timings are not tests).
GOAL_RATIO = 1.10
GOAL_OVERHEAD_US = 50.0


@dataclass
class OverheadReport:
    """Best and median seconds per stream size and runner, left by the benchmarks as they end.

    Ratios and per-stream overheads are computed on the best round (the one least disturbed by
    the rest of the machine); the ratio of medians is shown beside it as a check on noise.
    """

    rows: int
    best: dict[int, dict[str, float]] = field(default_factory=dict)
    median: dict[int, dict[str, float]] = field(default_factory=dict)
    rounds: int = 0

    def add(self, stream_size: int, runner: str, best: float, median: float, rounds: int) -> None:
        self.best.setdefault(stream_size, {})[runner] = best
        self.median.setdefault(stream_size, {})[runner] = median
        self.rounds = max(self.rounds, rounds)

    def lines(self) -> list[str]:
        """The report as table rows, for the stream sizes where both runners were measured."""
        out = [
            f"{'stream size':>11}  {'streams':>8}  {'hand loop':>10}  {'arrowflow':>10}  "
            f"{'ratio':>6}  {'(median)':>8}  {'overhead/stream':>15}  goal"
        ]
        for size in sorted(self.best):
            best, median = self.best[size], self.median[size]
            if {"hand_loop", "arrowflow"} - best.keys():
                continue
            hand, flow = best["hand_loop"], best["arrowflow"]
            streams = -(-self.rows // size)
            ratio = flow / hand
            median_ratio = median["arrowflow"] / median["hand_loop"]
            per_stream_us = (flow - hand) / streams * 1e6
            if size <= 1_000:
                goal = f"<= {GOAL_OVERHEAD_US:.0f} us/stream: "
                goal += "met" if per_stream_us <= GOAL_OVERHEAD_US else "missed"
            else:
                goal = f"<= {GOAL_RATIO:.2f}x: " + ("met" if ratio <= GOAL_RATIO else "missed")
            out.append(
                f"{size:>11,}  {streams:>8,}  {hand:>9.3f}s  {flow:>9.3f}s  {ratio:>5.2f}x  "
                f"{median_ratio:>7.2f}x  {per_stream_us:>12.1f} us  {goal}"
            )
        return out


_REPORT_KEY = pytest.StashKey[OverheadReport]()


@dataclass
class Figures:
    """Lines for the terminal summary, by section title, in the order benchmarks add them.

    A section's heading lines (given once, when it is first added to) come before its lines.
    """

    sections: dict[str, list[str]] = field(default_factory=dict)

    def add(self, title: str, heading: str, *lines: str) -> None:
        section = self.sections.setdefault(title, [heading])
        section.extend(lines)


_FIGURES_KEY = pytest.StashKey[Figures]()


def _uniform_words(rng: random.Random, n: int) -> pa.UInt64Array:
    # Bytes from one seeded generator, reinterpreted as uint64: n random words without a loop.
    return pa.Array.from_buffers(pa.uint64(), n, [None, pa.py_buffer(rng.randbytes(8 * n))])


def make_table(rows: int, seed: int = SEED) -> pa.Table:
    """``id`` (int64, 1..rows), ``x`` (float64 in [0, 1)) and ``k`` (int64 in 0..1023)."""
    rng = random.Random(seed)
    ids = pc.cumulative_sum(pa.repeat(pa.scalar(1, pa.int64()), rows))
    mantissa = pc.shift_right(_uniform_words(rng, rows), pa.scalar(11, pa.uint64()))
    x = pc.multiply(pc.cast(mantissa, pa.float64()), 2.0**-53)
    k = pc.cast(pc.shift_right(_uniform_words(rng, rows), pa.scalar(54, pa.uint64())), pa.int64())
    return pa.table({"id": ids, "x": x, "k": k})


@pytest.fixture(scope="session")
def table() -> pa.Table:
    """The benchmark input, built once per session."""
    return make_table(ROWS)


@pytest.fixture(scope="session")
def rounds() -> int:
    """Timed rounds per benchmark (``ARROWFLOW_BENCH_ROUNDS``), after one warm-up round."""
    return ROUNDS


@pytest.fixture(scope="session")
def overhead_report(pytestconfig: pytest.Config) -> OverheadReport:
    """Where the benchmarks leave their timings for the terminal summary."""
    report = OverheadReport(rows=ROWS)
    pytestconfig.stash[_REPORT_KEY] = report
    return report


@pytest.fixture(scope="session")
def figures(pytestconfig: pytest.Config) -> Figures:
    """Where benchmarks leave figures for their own sections of the terminal summary."""
    return pytestconfig.stash.setdefault(_FIGURES_KEY, Figures())


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    report = config.stash.get(_REPORT_KEY, None)
    if report is not None and len(report.lines()) > 1:
        terminalreporter.section("arrowflow overhead against the hand-written loop")
        terminalreporter.write_line(
            f"{report.rows:,} rows, best of {report.rounds} rounds each, both in this session"
        )
        for line in report.lines():
            terminalreporter.write_line(line)
    for title, lines in config.stash.get(_FIGURES_KEY, Figures()).sections.items():
        terminalreporter.section(title)
        for line in lines:
            terminalreporter.write_line(line)
