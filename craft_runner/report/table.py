"""``craft-table``, the report's former name: an alias of ``craft-report`` (:mod:`craft_runner.report.cli`)."""

from __future__ import annotations

import sys

from craft_runner.report.cli import main
from craft_runner.report.labels import compression_label

__all__ = ["compression_label", "main"]

if __name__ == "__main__":
    sys.exit(main())
