"""The prospect pipeline of ``make demo``, on the committed sample data."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from arrowflow import demo

SAMPLE = Path(__file__).parent.parent / "data" / "companies.parquet"


def run_demo(tmp_path: Path, *extra: str) -> int:
    argv = ["--input", str(SAMPLE), "--output", str(tmp_path / "prospects.parquet")]
    return demo.main([*argv, "--state", str(tmp_path / "state.duckdb"), *extra])


def test_demo_writes_scored_prospects_and_a_state_file(tmp_path, capsys) -> None:
    assert run_demo(tmp_path) == 0
    prospects = pq.read_table(tmp_path / "prospects.parquet")
    companies = pq.read_table(SAMPLE)
    assert 0 < prospects.num_rows < companies.num_rows
    assert pc.min(prospects["employees"]).as_py() >= demo.MIN_EMPLOYEES
    scores = prospects["score"].to_pylist()
    assert scores == sorted(scores, reverse=True)
    printed = capsys.readouterr().out
    assert "stream 1/10: 1,000 rows in" in printed
    stored = duckdb.connect(str(tmp_path / "state.duckdb"), read_only=True)
    assert stored.sql("select count(*) from quick_fit").fetchall() == [(prospects.num_rows,)]


def test_rerun_loads_everything_from_the_state_file(tmp_path, capsys) -> None:
    assert run_demo(tmp_path) == 0
    first = pq.read_table(tmp_path / "prospects.parquet")
    assert run_demo(tmp_path, "--stream-size", "3000") == 0
    assert "10,000 companies were already analysed" in capsys.readouterr().out
    assert pq.read_table(tmp_path / "prospects.parquet").equals(first)


def test_bad_stream_size_is_a_one_line_error(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_demo(tmp_path, "--stream-size", "0")
    assert exit_info.value.code == 2
    assert "--stream-size must be a positive integer" in capsys.readouterr().err
