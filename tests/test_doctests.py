"""Doctests write only under a temporary directory (the root ``conftest.py``)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "arrowflow"

# A line of a doctest example: its source (``>>>``) or a continuation (``...``).
_EXAMPLE_LINE = re.compile(r"^\s*(?:>>>|\.\.\.)(?:\s|$)")


def _example_lines(path: Path) -> list[tuple[int, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(number, line) for number, line in enumerate(lines, 1) if _EXAMPLE_LINE.match(line)]


def test_src_has_doctest_examples() -> None:
    assert any(_example_lines(path) for path in SRC.rglob("*.py"))


def test_no_doctest_example_names_the_system_temp_dir() -> None:
    temp_dirs = {"/tmp", tempfile.gettempdir()}
    offending = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted(SRC.rglob("*.py"))
        for number, line in _example_lines(path)
        if any(temp_dir in line for temp_dir in temp_dirs)
    ]
    assert offending == [], "doctests must write relative names (they run in a tmp dir)"


def test_doctests_run_in_a_fresh_tmp_dir_and_other_tests_do_not(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest((ROOT / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(
        example='''
        def write():
            """Write a file by a relative name, in an empty directory that is not the project's.

            >>> import os
            >>> from pathlib import Path
            >>> os.listdir()
            []
            >>> Path("written.txt").write_text("x")
            1
            >>> Path.cwd() != Path(__file__).resolve().parent
            True
            """


        def write_again():
            """Another doctest gets another directory.

            >>> import os
            >>> os.listdir()
            []
            """
        ''',
        test_cwd="""
        from pathlib import Path

        def test_cwd_is_kept(pytestconfig):
            assert Path.cwd() == pytestconfig.rootpath
        """,
    )

    result = pytester.runpytest("--doctest-modules", "-p", "no:cacheprovider")

    result.assert_outcomes(passed=3)
    assert not (pytester.path / "written.txt").exists()
