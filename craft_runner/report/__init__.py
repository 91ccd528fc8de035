"""Results → the papers' tables and figures (``craft-report``).

:mod:`.records` reads a sweep directory (results.json, unfinished runs, the sweep's expected jobs),
:mod:`.engine` aggregates records into a table (mean ± std over seeds), :mod:`.papers` holds one layout per
experiment, :mod:`.render` writes Markdown / CSV / LaTeX, :mod:`.figures` the PNGs, :mod:`.cli` the command;
``paper/`` holds the published numbers.
"""
