"""The diagnostics of the weights of one training cache entry, measured once per diagnostics key and kept beside
them (``<cache_dir>/<key>/diagnostics/<digest>/diagnostics.json``, with the plots); what a run records and
logs of them. The measuring itself is :func:`craft_runner.diagnostics.run_diagnostics`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from craft_runner.atomic import atomic_write_json
from craft_runner.cache import cache_entry, diagnostics_key, digest, read_json, uncertified_lambda_min_dropped
from craft_runner.diagnostics import run_diagnostics

log = logging.getLogger("craft_runner.pipeline")  # what a run logs reads as one logger's, as before


class Diagnostics:
    """The diagnostics of ``p`` (a :class:`craft_runner.pipeline.Prepared`: its config, cache entry, data,
    device and model), read from its cache entry when measured before."""

    def __init__(self, p: Any):
        self.p = p
        s = p.rc.sharpness
        inputs = diagnostics_key(p.rc)
        self.dir = p.cache_dir / "diagnostics" / digest(inputs)
        self._inputs = inputs
        self.path = self.dir / "diagnostics.json"
        self.results: dict = uncertified_lambda_min_dropped(read_json(self.path)) if self.path.exists() else {}
        self._batches = None
        self.enabled = s.enabled

    def measure(self, when: str) -> None:
        """Measure ``when`` ("before" or "after" training) unless switched off or already cached."""
        s = self.p.rc.sharpness
        if not (self.enabled and getattr(s, when)) or when in self.results:
            return
        if self._batches is None:
            self._batches = self.p.data.calib_batches(s.n_samples, s.batch_size, s.seed, self.p.device)
            used = sum(len(y) for _, y in self._batches)
            if used < s.n_samples:  # the training set is smaller: all of it, said and recorded
                log.warning("sharpness.n_samples=%d is more than the training split holds: %d used", s.n_samples,
                            used)
        cache_entry(self.dir, self._inputs)
        self.results[when] = run_diagnostics(self.p.model, self._batches, s, self.dir, tag=when)
        self.results[when]["n_samples_used"] = sum(len(y) for _, y in self._batches)
        atomic_write_json(self.results, self.path)

    def metrics(self) -> dict:
        """λmax and every diagnostic scalar, as ``lambda_max_{when}`` and ``{when}/{name}``."""
        out = {}
        for when in ("before", "after"):
            d = self.results.get(when)
            if d is None or not getattr(self.p.rc.sharpness, when):
                continue
            if "lambda_max" in d:
                out[f"lambda_max_{when}"] = d["lambda_max"]["value"]
                out[f"lambda_max_{when}_iterations"] = d["lambda_max"]["iterations"]
            out.update({f"{when}/{k}": v for k, v in d.get("scalars", {}).items()})
        return out

    def record(self) -> dict:
        """results.json's ``sharpness``: what was asked for (a cached entry may hold more)."""
        s = self.p.rc.sharpness
        return {when: d for when, d in self.results.items() if getattr(s, when)}

    def figures(self) -> dict:
        """The recorded diagnostics' PNG plots that exist, as ``{"diagnostics/<when>/<name>": path}``."""
        out = {}
        for when, d in self.record().items():
            plots = d.get("plots") or {}
            items = plots.items() if isinstance(plots, dict) else ((Path(p).stem, p) for p in plots)
            out.update({f"diagnostics/{when}/{name}": path for name, path in items if Path(path).exists()})
        return out
