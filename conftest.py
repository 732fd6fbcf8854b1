"""Suite-wide fixtures: doctests run in a fresh temporary directory."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _doctest_in_tmp_path(request: pytest.FixtureRequest) -> None:
    """Run each doctest in its own empty working directory, so examples that write files by
    relative name write nothing in the repository; other tests keep the working directory."""
    if isinstance(request.node, pytest.DoctestItem):
        monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
        monkeypatch.chdir(request.getfixturevalue("tmp_path"))
