"""A layout (rows and columns of a paper table) applied to records: mean ± std over seeds, n, notes.

A :class:`Layout` names its row fields (:class:`Row`: config paths and how to label them) and its columns
(:class:`Col`: a value per record, optionally a drop, optionally one column per distinct key — e.g. per
compression setting). :func:`build` then

- keys rows by the layout's row fields plus every other field of the weights' cache key that varies in the
  records (so two different trainings never share a row: a sweep over ``optimizer.lr`` gives one row per
  rate), except the fields the columns split on;
- splits a column when records of one row, column and seed differ in a compression field its label does not
  show (``[calib_size=128]`` is appended);
- refuses (:class:`MergeError`) to put two different configurations into one cell: records of one cell and
  seed that differ in a field neither the layout's rows nor the column show (e.g. QAT's ``act_quant`` where no
  row or column names it) would otherwise leave the newest record in the cell and drop the other silently;
- aggregates each cell over seeds: the mean, the sample standard deviation and n (a value that belongs to the
  training, such as the full-precision accuracy, counts once per training);
- puts "—" where no seed finished and lists why under the table (failed: the error; unfinished; missing);
- adds the real artifact's columns (:mod:`.export_cols`) to any layout whose records exported one;
- compares each compressed (and λmax, time, share) cell with its baseline — the same column in the row that
  differs only in the layout's ``baseline`` fields and whose records are the reference (ADAM on the base
  architecture), or the column a ``Col.versus`` names — by a 95 % t interval over seeds (:mod:`.stats`).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Optional

from craft_runner import identity
from craft_runner.identity import DIAGNOSTICS
from craft_runner.report import export_cols, stats
from craft_runner.report.records import Record, environment_note, flatten

DASH = "—"


class MergeError(ValueError):
    """Records of one cell and seed that are different configurations: the layout must show what differs."""


@dataclasses.dataclass
class Row:
    """A row field: its header, the config paths it reads and how they become a label."""

    label: str
    paths: tuple
    fmt: Callable[..., str] = lambda *v: ", ".join(str(x) for x in v)
    order: Sequence[str] = ()

    def value(self, r: Record) -> str:
        return self.fmt(*(r.get(p) for p in self.paths))


@dataclasses.dataclass
class Col:
    """A column, or (``pivot``) one column per distinct ``pivot(record)`` value.

    ``value(record)`` → number (None: not recorded); ``drop(record)`` → the drop shown in parentheses;
    ``per="training"``: the value belongs to the trained weights and counts once per training and seed.
    ``where`` keeps only some records (e.g. only Adam's for an "ADAM" column); ``paths``: config paths (or
    prefixes ending in ".") the column splits rows on, so they do not key the rows. ``kind`` picks the number
    format (acc, lam, time, ratio, diff, share, text). ``relative``: (op, is_reference, context_paths): the
    value divided by (op="ratio") or minus (op="diff") the same seed's value in the reference row — the row
    with the same fields except ``context_paths`` whose records satisfy ``is_reference``.
    """

    label: Optional[str] = None
    value: Callable[[Record], Any] = lambda r: None
    drop: Optional[Callable[[Record], Any]] = None
    per: str = "cell"
    where: Callable[[Record], bool] = lambda r: True
    pivot: Optional[Callable[[Record], Optional[str]]] = None
    order: Sequence[str] = ()
    paths: tuple = ()
    kind: str = "acc"
    relative: Optional[tuple] = None
    paper: bool = True  # the published table has this column
    # What the verdict against the baseline compares: "drop" (per-seed compressed − FP32), "value", None (no
    # verdict); "auto": the drop where the column has one, the value for kinds lam/time/share, else none.
    compare: Optional[str] = "auto"
    versus: Optional[str] = None  # the baseline is this column of the same row (Table 5's CrAFT vs ADAM)
    # (mark, test(Stat) -> bool, legend): a cell whose stat passes the test gets the mark, the table the legend.
    flag: Optional[tuple] = None

    def compared(self) -> Optional[str]:
        if self.compare != "auto":
            return self.compare
        if self.relative is not None:
            return None
        return "drop" if self.drop else "value" if self.kind in ("lam", "time", "share") else None


def is_adam(r: Record) -> bool:
    """The papers' baseline: Adam on the base architecture."""
    return r.get("optimizer.name") == "adam" and not r.get("arch.preact") and not r.get("arch.rprelu")


@dataclasses.dataclass
class Layout:
    name: str
    title: str
    rows: list
    cols: list
    figures: list = dataclasses.field(default_factory=list)  # fn(table, out_dir) -> [paths]
    paper_csv: Optional[str] = None
    note: str = ""
    # The verdicts' baseline row: (is_reference(record), the config paths it differs in) and how to name it.
    baseline: tuple = (is_adam, ("optimizer.", "arch."))
    baseline_label: str = "ADAM's row (Adam on the base architecture)"


@dataclasses.dataclass
class Stat:
    values: list  # per seed, in seed order
    seeds: list
    drops: list = dataclasses.field(default_factory=list)
    text: Optional[str] = None
    drop_seeds: list = dataclasses.field(default_factory=list)  # the seeds of ``drops``
    # λmax columns: the seeds whose estimate did not meet its tolerance (the record's certificate, converged=false)
    uncertified: list = dataclasses.field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else float("nan")

    @property
    def std(self) -> float:
        return _std(self.values)

    @property
    def drop_mean(self) -> Optional[float]:
        return sum(self.drops) / len(self.drops) if self.drops else None

    @property
    def drop_std(self) -> float:
        return _std(self.drops)

    def per_seed(self, metric: str) -> dict:
        """{seed: value} of ``metric`` ("drop" or "value")."""
        if metric == "drop":
            return dict(zip(self.drop_seeds, self.drops))
        return dict(zip(self.seeds, self.values))


def _std(v: Sequence[float]) -> float:
    if len(v) < 2:
        return float("nan")
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


@dataclasses.dataclass
class Cell:
    stat: Optional[Stat]
    problems: list  # Record with status != ok
    notes: list = dataclasses.field(default_factory=list)  # footnote numbers
    verdict: Optional[stats.Verdict] = None  # against ``baseline``
    baseline: Optional[tuple] = None  # (row key, column label) of the cell it is compared with
    flags: list = dataclasses.field(default_factory=list)  # marks of the column's flag


@dataclasses.dataclass
class Table:
    layout: Layout
    row_headers: list  # labels of the row fields (layout's, then the varying extra fields)
    col_labels: list
    col_specs: list  # the Col each label came from
    rows: OrderedDict  # row key tuple -> {col label: Cell}
    row_records: dict  # row key -> [Record]
    notes: list  # lines under the table
    n: dict  # row key -> number of seeds with a finished training
    incomplete: bool
    experiment: Optional[str] = None
    test: str = "welch"
    # {row label: cost per step / Adam's} measured side by side by `make bench --json` (craft-report --step-costs)
    step_costs: Optional[dict] = None

    def cell(self, row, col) -> Optional[Cell]:
        return self.rows.get(row, {}).get(col)


# ------------------------------------------------------------------------------------------------ helpers


def _covered(path: str, paths: Sequence[str]) -> bool:
    return any(path == p or (p.endswith(".") and path.startswith(p)) for p in paths)


def _seed_derived(path: str, recs: Sequence[Record]) -> bool:
    """A field that equals the run's seed wherever it is set (random SAM's optimizer.seed: ${seed})."""
    have = [r for r in recs if path in r.fields]
    return bool(have) and all(r.fields[path] == r.seed for r in have)


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v)


def _extra_fields(recs: Sequence[Record], layout: Layout) -> list[str]:
    """Training fields outside the layout that vary and split some row (greedy, in name order): they key rows too.

    A field that follows from the rest of the key (model.checkpoint_path with model.name, optimizer.rho with
    optimizer.name) adds nothing and stays out.
    """
    row_paths = [p for row in layout.rows for p in row.paths]
    col_paths = [p for c in layout.cols for p in c.paths]
    train = sorted({p for r in recs for p in r.train_fields})
    candidates = [p for p in train if p != "seed" and not _covered(p, row_paths + col_paths)
                  and not _seed_derived(p, recs) and len({r.fields.get(p) for r in recs}) > 1]

    def col_part(r: Record) -> tuple:
        return tuple(sorted((k, v) for k, v in r.fields.items() if _covered(k, col_paths)))

    extra: list[str] = []
    for p in candidates:
        groups = defaultdict(set)
        for r in recs:
            key = (tuple(r.get(q) for q in row_paths), col_part(r), tuple(r.fields.get(q) for q in extra))
            groups[key].add(r.fields.get(p))
        if any(len(v) > 1 for v in groups.values()):
            extra.append(p)
    return extra


def _row_sort_key(layout: Layout, key: tuple):
    out = []
    for i, v in enumerate(key):
        order = layout.rows[i].order if i < len(layout.rows) else ()
        out.append((order.index(v) if v in order else len(order), _natural(v)))
    return out


def _natural(v):
    try:
        return (0, float(str(v).rstrip("%")), "")
    except ValueError:
        return (1, 0.0, str(v))


# ------------------------------------------------------------------------------------------------ build


def build(layout: Layout, records: Sequence[Record], test: str = "welch") -> Table:
    """The table of ``records``; ``test``: how cells are compared with their baseline (:data:`stats.TESTS`)."""
    if test not in stats.TESTS:
        raise ValueError(f"test {test!r} is not known: expected one of {', '.join(stats.TESTS)}")
    layout, export_notes = _with_export(layout, records)
    placed = [r for r in records if r.status != "missing"]
    missing = [r for r in records if r.status == "missing"]
    extra = _extra_fields(placed, layout)
    row_headers = [row.label for row in layout.rows] + extra

    def row_key(r: Record) -> tuple:
        return tuple(row.value(r) for row in layout.rows) + tuple(_fmt_value(r.fields.get(p)) for p in extra)

    by_row: dict = defaultdict(list)
    for r in placed:
        by_row[row_key(r)].append(r)
    keys = sorted(by_row, key=lambda k: _row_sort_key(layout, k))

    # Column labels: fixed columns, then each pivot's keys in its order (split by hidden compression fields).
    col_labels: list[str] = []
    col_specs: list[Col] = []
    assign: dict = {}  # (id(record), label) for pivot membership
    for spec in layout.cols:
        if spec.pivot is None:
            col_labels.append(spec.label)
            col_specs.append(spec)
            continue
        labels = _pivot_labels(spec, placed, row_key, assign)
        ordered = sorted(labels, key=lambda lab: (_order_index(spec.order, lab), _natural(lab)))
        col_labels += ordered
        col_specs += [spec] * len(ordered)

    notes: list[str] = []
    rows: OrderedDict = OrderedDict()
    n_seeds: dict = {}
    for key in keys:
        recs = by_row[key]
        n_seeds[key] = len({r.seed for r in recs if r.ok})
        cells = {}
        for label, spec in zip(col_labels, col_specs):
            if spec.pivot is None:
                members = [r for r in recs if spec.where(r)]
            else:
                members = [r for r in recs if assign.get((id(r), id(spec))) == label]
            _check_merge(layout, spec, members, key, label)
            cells[label] = _cell(spec, members)
        rows[key] = cells
    _relative(layout, rows, col_labels, col_specs, by_row)
    _verdicts(layout, extra, rows, col_labels, col_specs, by_row, test)

    # Notes: one per run that did not finish (a failed training shows in every cell of its seed), in reading order.
    numbers: dict = {}
    for key, cells in rows.items():
        for label, cell in cells.items():
            for r in cell.problems:
                if r.path not in numbers:
                    numbers[r.path] = len(numbers) + 1
                    what = " ".join(r.overrides) if r.overrides else str(r.path)
                    why = r.error if (r.error or "").startswith(r.status) else \
                        f"{r.status}{': ' + r.error if r.error else ''}"  # "unreadable results.json: ..."
                    notes.append(f"[{numbers[r.path]}] {' / '.join(key)}, seed {r.seed}: {why} ({what})")
                if numbers[r.path] not in cell.notes:
                    cell.notes.append(numbers[r.path])
            spec = col_specs[col_labels.index(label)]
            if cell.stat is None and not cell.problems and spec.pivot is not None:
                notes.append(f"[{len(numbers) + 1}] {' / '.join(key)} / {label}: not run (no results for this cell)")
                numbers[(key, label)] = len(numbers) + 1
                cell.notes.append(numbers[(key, label)])
    k = len(numbers)
    for r in missing[:5]:
        k += 1
        notes.append(f"[{k}] missing job: {' '.join(r.overrides) or r.path}: {r.error}")
    if len(missing) > 5:
        k += 1
        notes.append(f"[{k}] and {len(missing) - 5} more missing jobs")
    incomplete = k > 0
    if any(c.verdict is not None for cells in rows.values() for c in cells.values()):
        notes.append(legend(layout, test))
    notes += export_notes + _flags(rows, col_labels, col_specs) + _uncertified(rows, col_labels, col_specs)
    if (mixed := environment_note(placed)) is not None:
        notes.append(mixed)
    return Table(layout, row_headers, col_labels, col_specs, rows, dict(by_row), notes, n_seeds, incomplete,
                 experiment=next((r.experiment for r in records if r.experiment), None), test=test)


def _with_export(layout: Layout, records: Sequence[Record]) -> tuple[Layout, list]:
    """``layout`` with the export columns when some record exported, split like its compression column."""
    base = next((c for c in layout.cols if c.pivot is not None and c.drop is not None), None)
    specs, notes = export_cols.columns(records, base.pivot if base else None, base.order if base else ())
    if specs:
        layout = dataclasses.replace(layout, cols=[*layout.cols, *(Col(**s) for s in specs)])
    return layout, notes


def _flags(rows: OrderedDict, labels: list, specs: list) -> list[str]:
    """Marks the cells whose column flags them; returns the legends of the flags used."""
    used = []
    for label, spec in zip(labels, specs):
        if spec.flag is None:
            continue
        mark, test, text = spec.flag
        for cells in rows.values():
            cell = cells[label]
            if cell.stat is not None and cell.stat.text is None and test(cell.stat):
                cell.flags.append(mark)
                if text not in used:
                    used.append(text)
    return used


MARK = "†"


def legend(layout: Layout, test: str) -> str:
    how = ("Welch's t interval (Welch–Satterthwaite df) over the seeds of both cells" if test == "welch"
           else "paired t interval of the per-seed differences")
    versus = [c.label for c in layout.cols if c.versus]
    base = layout.baseline_label + (f"; {', '.join(versus)}: against the column named in the layout" if versus
                                    else "")
    return (f"{MARK}: the 95 % {how} of the difference to the baseline, {base}, excludes 0; compared: the drop "
            f"(compressed − FP32) in compressed cells, the value in λmax / time / share columns, λmax, times and "
            f"ranges on the log scale (the ratio of geometric means); a side without spread or with 2 seeds: the "
            f"exact permutation test; n<2 on a side: no verdict")


def _order_index(order: Sequence[str], label: str) -> int:
    base = label.split(" [", 1)[0]
    return order.index(base) if base in order else len(order)


def _pivot_labels(spec: Col, recs: Sequence[Record], row_key, assign: dict) -> list[str]:
    groups = defaultdict(list)
    for r in recs:
        if not spec.where(r):
            continue
        lab = spec.pivot(r)
        if lab is not None:
            groups[(row_key(r), lab)].append(r)
    labels = set()
    for (_, lab), members in groups.items():
        comp = sorted({p for r in members for p in r.fields if p.startswith("compress.")})
        varying = [p for p in comp if len({r.fields.get(p) for r in members}) > 1
                   and not _seed_derived(p, members)]
        for r in members:
            full = lab
            if varying:
                full += " [" + ",".join(f"{p.split('.', 1)[1]}={_fmt_value(r.fields.get(p))}" for p in varying) + "]"
            assign[(id(r), id(spec))] = full
            labels.add(full)
    return sorted(labels)


def _check_merge(layout: Layout, spec: Col, members: Sequence[Record], key: tuple, label: str) -> None:
    """Raise :class:`MergeError` when finished records of one seed in this cell differ in a field that neither
    the layout's rows nor the column cover. A value of the training (``per="training"``) is shared by every
    compression of it: there only a diagnostic (λmax, share) is checked, on the settings it was measured with."""
    shown = [p for row in layout.rows for p in row.paths] + list(spec.paths)
    by_seed = defaultdict(list)
    for r in members:
        if r.ok:
            by_seed[r.seed].append(r)
    for seed, recs in sorted(by_seed.items(), key=lambda kv: str(kv[0])):
        if len(recs) < 2:
            continue
        if spec.per == "training":  # one training's value; a diagnostic also depends on how it was measured
            if spec.kind not in ("lam", "share"):
                continue
            fields = [_diagnostics_settings(r) for r in recs]
        else:
            fields = [r.fields for r in recs]
        for p in sorted({p for f in fields for p in f}):
            if p == "seed" or _covered(p, shown) or _seed_derived(p, recs):
                continue
            values = sorted({_fmt_value(f[p]) for f in fields if p in f})  # absent: a record of an older schema
            if len(values) > 1:
                exp = next((r.experiment for r in recs if r.experiment), layout.name)
                raise MergeError(f"{exp}: cell {' / '.join(key)} / {label}, seed {seed}: {len(recs)} records differ in "
                                 f"{p} ({', '.join(values)}); the layout {layout.name} shows no row or column for "
                                 f"it, so one would replace the others: add {p} to the layout (or report the "
                                 f"records separately)")




def _diagnostics_settings(r: Record) -> dict:
    """The settings a recorded λmax (and the other diagnostics) depends on, flattened (``sharpness.n_samples``):
    the fields of role diagnostics (craft_runner.identity), as the diagnostics key."""
    return flatten(identity.inputs(r.config, DIAGNOSTICS))


def _cell(spec: Col, members: Sequence[Record]) -> Cell:
    """Mean ± std over seeds of ``spec.value``; records that did not finish, for seeds with no value, as problems."""
    per_seed: dict = {}
    # a rerun of a seed (the same configuration: _check_merge refused any other): the newest wins
    for r in sorted((r for r in members if r.ok), key=lambda r: -r.mtime):
        v = spec.value(r)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        per_seed.setdefault(r.seed, (v, spec.drop(r) if spec.drop else None, _lam_certificate(r, v)))
    problems = [r for r in members if not r.ok and r.seed not in per_seed]
    if not per_seed:
        return Cell(None, problems)
    seeds = sorted(per_seed, key=lambda s: (s is None, s))
    if spec.kind == "text":
        texts = list(OrderedDict.fromkeys(str(per_seed[s][0]) for s in seeds))
        return Cell(Stat([], seeds, text=", ".join(texts)), problems)
    vals = [float(per_seed[s][0]) for s in seeds]
    drop_seeds = [s for s in seeds if per_seed[s][1] is not None]
    drops = [float(per_seed[s][1]) for s in drop_seeds]
    uncertified = [s for s in seeds if spec.kind == "lam" and per_seed[s][2] is False]
    return Cell(Stat(vals, seeds, drops, drop_seeds=drop_seeds, uncertified=uncertified), problems)


def _lam_certificate(r: Record, value) -> Optional[bool]:
    """The convergence certificate of the λmax measurement whose value ``value`` is (after or before training),
    as the record's diagnostics state it; None when the value is not a recorded λmax."""
    for when in ("after", "before"):
        lam = (r.sharpness.get(when) or {}).get("lambda_max")
        if isinstance(lam, dict) and lam.get("value") == value:
            return lam.get("converged")
    return None


UNCERTIFIED = "‡"


def _uncertified(rows: OrderedDict, labels: list, specs: list) -> list[str]:
    """Marks λmax cells with a seed whose estimate did not converge; a note per such cell names the seeds."""
    notes = []
    for key, cells in rows.items():
        for label, spec in zip(labels, specs):
            st = cells[label].stat
            if spec.kind == "lam" and st is not None and st.uncertified:
                cells[label].flags.append(UNCERTIFIED)
                notes.append(f"{UNCERTIFIED} {' / '.join(k for k in key if k)} / {label}: the λmax estimate of seed"
                             f"{'s' if len(st.uncertified) > 1 else ''} {', '.join(map(str, st.uncertified))} did not "
                             f"meet its tolerance (converged: false in results.json's sharpness record): a value "
                             f"from below, not the top eigenvalue; raise sharpness.max_iter")
    return notes


def _relative(layout: Layout, rows: OrderedDict, labels: list, specs: list, by_row: dict) -> None:
    """Columns relative to a reference row (overhead vs Adam, accuracy boost vs the baseline)."""
    for label, spec in zip(labels, specs):
        if spec.relative is None:
            continue
        op, is_ref, context = spec.relative
        n_rows = len(layout.rows)
        ctx_idx = [i for i, row in enumerate(layout.rows) if not any(_covered(p, context) for p in row.paths)]

        def ctx(key, ctx_idx=ctx_idx, n_rows=n_rows):
            return tuple(key[i] for i in ctx_idx) + key[n_rows:]

        refs = defaultdict(list)
        for key in rows:
            if by_row[key] and all(is_ref(r) for r in by_row[key] if r.ok) and any(r.ok for r in by_row[key]):
                refs[ctx(key)].append(key)
        absolute = {key: cells[label] for key, cells in rows.items()}
        for key, cells in rows.items():
            cell = absolute[key]
            ref = refs.get(ctx(key), [])
            base = absolute[ref[0]].stat if len(ref) == 1 else None
            if cell.stat is None or base is None:
                cells[label] = Cell(None, cell.problems)
                continue
            mine = dict(zip(cell.stat.seeds, cell.stat.values))
            theirs = dict(zip(base.seeds, base.values))
            common = [s for s in cell.stat.seeds if s in theirs]
            if not common:  # no paired seeds: compare the means
                vals = [_apply(op, cell.stat.mean, base.mean)]
                common = [None]
            else:
                vals = [_apply(op, mine[s], theirs[s]) for s in common]
            cells[label] = Cell(Stat(vals, common), cell.problems)


def _apply(op: str, a: float, b: float) -> float:
    if op == "ratio":
        return a / b if b else float("nan")
    return a - b


def _verdicts(layout: Layout, extra: list, rows: OrderedDict, labels: list, specs: list, by_row: dict,
              test: str) -> None:
    """Each comparable cell against its baseline cell: the same column of the reference row, or ``versus``."""
    is_ref, context = layout.baseline
    n_rows = len(layout.rows)
    keep = [i for i, row in enumerate(layout.rows) if not any(_covered(p, context) for p in row.paths)]
    keep += [n_rows + j for j, p in enumerate(extra) if not _covered(p, context)]

    def ctx(key):
        return tuple(key[i] for i in keep)

    refs = defaultdict(list)
    for key in rows:
        done = [r for r in by_row[key] if r.ok]
        if done and all(is_ref(r) for r in done):
            refs[ctx(key)].append(key)
    for label, spec in zip(labels, specs):
        metric = spec.compared()
        if metric is None:
            continue
        for key, cells in rows.items():
            cell = cells[label]
            if spec.versus is not None:
                base_key, base_label = key, spec.versus
            else:
                ref = refs.get(ctx(key), [])
                if len(ref) != 1 or ref[0] == key:
                    continue
                base_key, base_label = ref[0], label
            base = rows[base_key].get(base_label)
            if cell.stat is None or base is None or base.stat is None or cell.stat.text is not None:
                continue
            cell.baseline = (base_key, base_label)
            mine, theirs = cell.stat.per_seed(metric), base.stat.per_seed(metric)
            scale = stats.scale_of(label) if metric == "value" else "raw"
            if scale == "log" and not all(v > 0 for v in [*mine.values(), *theirs.values()]):
                scale = "raw"  # a zero time or λmax: nothing to take the log of
            cell.verdict = stats.compare(mine, theirs, test, metric, scale)
