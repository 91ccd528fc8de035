"""``craft-table``, the report's former name: an alias of ``craft-report`` (:mod:`craft_runner.report.cli`).

:func:`load_results` and :func:`paper_table` keep the old Python API: the records of a directory, and its
generic table (one row per training, one column per compression) as a DataFrame of strings.
"""

from __future__ import annotations

import sys
from pathlib import Path

from craft_runner.report.cli import main
from craft_runner.report.labels import compression_label

__all__ = ["compression_label", "load_results", "main", "paper_table"]


def load_results(root) -> list:
    from craft_runner.report.records import collect

    return collect(Path(root)).records


def paper_table(records):
    import pandas as pd

    from craft_runner.report.engine import build
    from craft_runner.report.papers import GENERIC
    from craft_runner.report.render import table_rows

    headers, rows = table_rows(build(GENERIC, records))
    return pd.DataFrame(rows, columns=headers)


if __name__ == "__main__":
    sys.exit(main())
