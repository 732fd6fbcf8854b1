"""A progress bar per streaming scope: streams done, rows per second, failures.

``progress=None`` (the default) shows a bar only when someone is watching (a notebook, or a
terminal on stderr) and tqdm is installed; ``True`` asks for one (tqdm must be installed:
``pip install 'arrowflow[progress]'``); ``False`` never shows one. tqdm is imported only
when a bar is shown.
"""

from __future__ import annotations

import sys
from typing import Any

from arrowflow._compat import import_optional, is_installed

__all__ = ["ProgressBar", "open_progress"]


def _in_notebook() -> bool:
    # An IPython kernel is loaded only inside Jupyter-like front ends.
    return "ipykernel" in sys.modules


def _is_interactive() -> bool:
    return _in_notebook() or (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())


class ProgressBar:
    """A tqdm bar counting a scope's streams, with rows/s and failures as postfix."""

    def __init__(self, description: str, total: int | None) -> None:
        tqdm = import_optional("tqdm.auto", extra="progress")
        self._bar: Any = tqdm.tqdm(total=total, desc=description, unit="stream", leave=True)
        self._rows = 0
        self._failed = 0

    def update(self, rows_in: int, failed: bool, total: int | None) -> None:
        """Count one more stream, of ``rows_in`` rows; ``total`` fills in once a lazy input's
        length is known."""
        if total is not None and self._bar.total != total:
            self._bar.total = total
        self._rows += rows_in
        self._failed += failed
        elapsed = self._bar.format_dict.get("elapsed") or 0.0
        rate = self._rows / elapsed if elapsed else 0.0
        self._bar.set_postfix(rows_per_s=f"{rate:,.0f}", failed=self._failed, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def open_progress(progress: bool | None, description: str, total: int | None) -> ProgressBar | None:
    """The bar asked for by a run's ``progress=`` option, or ``None``."""
    if progress is False or (progress is None and not (_is_interactive() and is_installed("tqdm"))):
        return None
    return ProgressBar(description, total)
