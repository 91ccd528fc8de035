"""The real artifact's columns, which any layout gains when its records carry an ``export`` record with status ok.

Per compression column of the layout (its pivot's label, else the compression's): the accuracy ONNX Runtime
measured (real − simulated in parentheses), the artifact's bytes and its latency at batch 1 and 64, each as a
ratio to the fp32 ONNX file; mean ± std over seeds like every cell. A cell whose real accuracy is more than
:data:`MAX_GAP` points below the simulated one (mean over seeds) is flagged. Plain ``Col`` keyword arguments
are returned (:func:`craft_runner.report.engine.build` makes the columns), so this module imports no engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

from craft_runner.report.labels import compression_label
from craft_runner.report.records import Record

FLAG = "‡"
MAX_GAP = 1.0  # points of accuracy the real model may lose to the simulated one before its cell is flagged

# (label prefix, record key, number format)
COLUMNS = (("real", "accuracy", "acc"), ("bytes", "bytes_ratio", "ratio"), ("lat b1", "latency_ratio_b1", "ratio"),
           ("lat b64", "latency_ratio_b64", "ratio"))


def exported(r: Record) -> bool:
    return r.ok and (r.export or {}).get("status") == "ok"


def _compression(r: Record) -> str:
    c = r.config.get("compress") or {}
    return "fp32" if c.get("name", "none") == "none" else compression_label(c)


def _gap(stat) -> bool:
    return stat.drop_mean is not None and stat.drop_mean < -MAX_GAP


def columns(records: Sequence[Record], pivot: Optional[Callable] = None, order: Sequence[str] = ()
            ) -> tuple[list[dict], list[str]]:
    """``Col`` keyword arguments of the export columns (none when no record exported) and the lines under the
    table: what the columns are, and each compression the format could only simulate, with the reason."""
    done = [r for r in records if exported(r)]
    formats = sorted({str(r.export.get("format")) for r in done})

    def base(r: Record) -> str:
        label = pivot(r) if pivot is not None else None
        return label if label is not None else _compression(r)

    def named(prefix: str, fmt: str, b: str) -> str:
        return f"{prefix} {fmt} {b}" if len(formats) > 1 else f"{prefix} {b}"

    specs = []
    for prefix, key, kind in COLUMNS:
        def value(r: Record, key=key):
            return r.export.get(key)

        def label(r: Record, prefix=prefix) -> Optional[str]:
            return named(prefix, str(r.export.get("format")), base(r)) if exported(r) else None

        spec = dict(value=value, pivot=label, kind=kind, compare=None, paper=False,
                    order=[named(prefix, f, o) for f in formats for o in order])
        if key == "accuracy":
            spec["drop"] = lambda r: r.export["accuracy"] - r.export["simulated_accuracy"]
            spec["flag"] = (FLAG, _gap, f"{FLAG}: the real model's accuracy is more than {MAX_GAP:g} point below "
                                        f"the simulated one (mean over seeds)")
        specs.append(spec)
    notes = []
    if done:
        threads = sorted({r.export.get("threads") for r in done if r.export.get("threads") is not None})
        notes.append(f"real / bytes / lat b1 / lat b64: the export={', '.join(formats)} artifact run by ONNX Runtime "
                     f"(threads: {', '.join(map(str, threads)) or '?'}): its top-1 (real − simulated in "
                     f"parentheses), its bytes and its latency at batch 1 and 64 as ratios to the fp32 ONNX file")
    skipped = {}
    for r in records:
        e = r.export or {}
        if r.ok and e.get("status") in ("simulated only", "failed", "nothing to pack"):
            skipped.setdefault((base(r), e.get("format"), e["status"]), e.get("reason"))
    notes += [f"{b}: export={fmt} {status}: {why}" for (b, fmt, status), why in sorted(skipped.items(), key=str)]
    return (specs if done else []), notes
