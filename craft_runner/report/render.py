"""A built table as text: Markdown (pipes), plain, LaTeX or CSV, with its notes and the published numbers.

A cell reads ``mean ± std (drop mean ± std)`` over seeds; ``n`` (seeds) is a column of its own, and a cell
with fewer seeds than its row says ``n=k``. "—" marks a cell no seed finished, ``[k]`` the note under the
table that says why; "n/a" a value the runs did not record (e.g. λmax with the diagnostics off); "†" a cell
whose 95 % interval of the difference to its baseline excludes 0 (the legend under the table says which test
and baseline); a column's own flag (e.g. "‡", an exported model well below its simulation) adds its mark. CSV has
no mark but, after each column with verdicts, its ``diff_mean``, ``diff_ci_low``, ``diff_ci_high`` and
``separated``.
"""

from __future__ import annotations

import csv
import io
import math
from importlib import resources
from typing import Optional

from craft_runner.report.engine import DASH, MARK, Cell, Table

FORMATS = ("md", "plain", "latex", "csv")


def _num(v: float, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    if kind == "lam":
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    if kind == "time":
        return f"{v:.3g}"
    if kind == "ratio":
        return f"{v:.2f}x"
    if kind == "share":
        return f"{v:.3f}"
    if kind == "diff":
        return f"{v:+.2f}"
    return f"{v:.2f}"


def _pm(mean: float, std: float, n: int, kind: str) -> str:
    s = _num(mean, kind)
    if n > 1 and not math.isnan(std):
        s += f" ± {_num(std, kind).lstrip('+').rstrip('x')}"
    return s


def format_cell(cell: Optional[Cell], kind: str, row_n: int, mark: bool = True) -> str:
    if cell is None:
        return ""
    refs = f" [{','.join(map(str, cell.notes))}]" if cell.notes else ""
    if mark and cell.verdict is not None and cell.verdict.separated:
        refs += MARK
    if mark:
        refs += "".join(cell.flags)
    st = cell.stat
    if st is None:
        return (DASH if cell.notes else "n/a") + refs
    if st.text is not None:
        return st.text + refs
    s = _pm(st.mean, st.std, st.n, kind)
    if st.drops:
        s += f" ({_pm(st.drop_mean, st.drop_std, len(st.drops), 'diff')})"
    if st.n != row_n and st.seeds != [None]:
        s += f" n={st.n}"
    return s + refs


VERDICT_COLS = ("diff_mean", "diff_ci_low", "diff_ci_high", "separated")


def verdict_fields(cell: Optional[Cell]) -> list:
    """diff_mean, diff_ci_low, diff_ci_high, separated of a cell ("" without a verdict; "n<2" without an interval)."""
    v = cell.verdict if cell is not None else None
    if v is None:
        return ["", "", "", ""]
    if v.separated is None:
        return [_g(v.diff_mean), "", "", v.reason or "n<2"]
    return [_g(v.diff_mean), _g(v.low), _g(v.high), str(v.separated).lower()]


def table_rows(table: Table, paper: Optional[dict] = None, verdicts: bool = False) -> tuple[list, list]:
    """Headers and rows of strings; ``paper``: {row labels: {column: published}} adds "(paper)" columns;
    ``verdicts`` (CSV): no marks, and the four verdict columns after each column that has verdicts."""
    n_layout = len(table.layout.rows)
    paper_cols = []
    if paper:
        known = {c for v in paper.values() for c in v}
        paper_cols = [c for c in table.col_labels if c in known
                      and any(tuple(k[:n_layout]) in paper for k in table.rows)]
    judged = {c for c in table.col_labels if verdicts
              and any(cells.get(c) is not None and cells[c].verdict is not None for cells in table.rows.values())}
    headers = list(table.row_headers) + ["n"]
    for c in table.col_labels:
        headers.append(c)
        if c in paper_cols:
            headers.append(f"{c} (paper)")
        if c in judged:
            headers += [f"{c} {v}" for v in VERDICT_COLS]
    rows = []
    for key, cells in table.rows.items():
        row = list(key) + [str(table.n.get(key, 0))]
        for c, spec in zip(table.col_labels, table.col_specs):
            row.append(format_cell(cells.get(c), spec.kind, table.n.get(key, 0), mark=not verdicts))
            if c in paper_cols:
                row.append((paper.get(tuple(key[:n_layout])) or {}).get(c, ""))
            if c in judged:
                row += verdict_fields(cells.get(c))
        rows.append(row)
    return headers, rows


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{",
          "}": r"\}", "±": r"$\pm$", "λ": r"$\lambda$", "—": "---", "↓": r"$\downarrow$", "×": r"$\times$",
          "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "†": r"$^\dagger$", "‡": r"$^\ddagger$"}


def _latex_escape(s: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in str(s))


def render(headers: list, rows: list, fmt: str, notes: list = (), title: str = "") -> str:
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not allowed: expected one of {', '.join(FORMATS)}")
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(headers)
        w.writerows(rows)
        return buf.getvalue()
    from tabulate import tabulate

    if fmt == "latex":
        body = tabulate([[_latex_escape(c) for c in r] for r in rows], headers=[_latex_escape(h) for h in headers],
                        tablefmt="latex_raw", disable_numparse=True)
        head = f"% {title}\n" if title else ""
        return head + body + "".join(f"\n% {n}" for n in notes) + "\n"
    text = tabulate(rows, headers=headers, tablefmt="github" if fmt == "md" else "simple", disable_numparse=True)
    if fmt == "md":
        out = (f"### {title}\n\n" if title else "") + text + "\n"
        if notes:
            out += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
        return out
    return (f"{title}\n" if title else "") + text + "\n" + "".join(f"{n}\n" for n in notes)


# ------------------------------------------------------------------------------------------------ paper


def read_paper(name: Optional[str]) -> Optional[tuple[list, list]]:
    """The published table shipped with the package (``craft_runner/report/paper/<name>``): headers, rows."""
    if not name:
        return None
    f = resources.files("craft_runner.report").joinpath("paper", name)
    if not f.is_file():
        return None
    rows = list(csv.reader(io.StringIO(f.read_text(encoding="utf-8"))))
    return rows[0], rows[1:]


def paper_lookup(table: Table) -> Optional[dict]:
    """{row labels: {column: published cell}} keyed like the layout's row fields."""
    p = read_paper(table.layout.paper_csv)
    if p is None:
        return None
    headers, rows = p
    n = len(table.layout.rows)
    return {tuple(r[:n]): dict(zip(headers[n:], r[n:])) for r in rows}


def cells_csv(table: Table) -> str:
    """Every cell as numbers, one line each (for plotting elsewhere): row fields, column, n, mean, std, drops,
    and the verdict against its baseline (which cell, what was compared, by which test, the difference, its
    interval and whether it excludes 0; the test says "(log)" where the difference is of logarithms)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(table.row_headers) + ["column", "n", "mean", "std", "drop_mean", "drop_std", "seeds", "values",
                                          "text", "notes", "baseline", "compared", "test", "n_baseline",
                                          *VERDICT_COLS])
    for key, cells in table.rows.items():
        for c, cell in cells.items():
            st = cell.stat
            v = cell.verdict
            test = v.test + (" (log)" if v.scale == "log" else "") if v is not None else ""
            judged = ([" / ".join([*cell.baseline[0], cell.baseline[1]]), v.metric, test, v.n_base]
                      if v is not None else ["", "", "", ""]) + verdict_fields(cell)
            if st is None:
                w.writerow(list(key) + [c, 0, "", "", "", "", "", "", "", " ".join(map(str, cell.notes)), *judged])
                continue
            w.writerow(list(key) + [c, st.n, _g(st.mean) if st.values else "", _g(st.std) if st.values else "",
                                    _g(st.drop_mean), _g(st.drop_std) if st.drops else "",
                                    " ".join(map(str, st.seeds)), " ".join(_g(x) for x in st.values), st.text or "",
                                    " ".join(map(str, cell.notes)), *judged])
    return buf.getvalue()


def _g(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"
