"""pandas is not a dependency of arrowflow: a run with a state store, and its resume, work
where pandas cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class NoPandas(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "pandas":
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, NoPandas())  # as if pandas were not installed

    import pyarrow as pa
    import arrowflow as af

    store = af.DuckDBState(sys.argv[1], table="t", key="id")

    @af.intelligent_streaming(5, over="rows", state=store)
    class Tag(af.Agent):
        def call(self, context):
            return {"rows": context["rows"]}

    rows = pa.table({"id": range(12)})
    af.Flow(Tag).run(rows=rows, progress=False)
    again = af.Flow(Tag).run(rows=rows, progress=False)
    assert "pandas" not in sys.modules
    print(again.stats[0]["skipped_items"], again["rows"].equals(rows))
    """
)


def test_a_run_and_its_resume_need_no_pandas(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "state.duckdb")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["12", "True"]
