"""``python -m arrowflow``: the ``arrowflow`` command (see :mod:`arrowflow.cli`)."""

from __future__ import annotations

import sys

from arrowflow.cli import main

if __name__ == "__main__":
    sys.exit(main())
