"""Paired timing of two variants of one computation: their speed ratio with a confidence interval.

Used for the speed-ups that compressors record (:mod:`craft_runner.compress.tokens`). The two variants
run alternately on one thread, the order swapped every round (A B, B A, A B, ...; as ``make bench``
does), so load from elsewhere on the machine hits both sides alike; each round gives one pair and one
ratio r_i = t_A,i / t_B,i (> 1: B is faster). Ratios multiply, so the estimate is their geometric mean
exp(mean log r_i) and the interval a Student t-interval on the log ratios, mapped back:
exp(m ± t_{(1+c)/2, n−1} · s / √n), with m and s the mean and sample standard deviation of log r_i.
The geometric mean of the ratios is the ratio of the two sides' geometric-mean times, so the recorded
throughputs and the speed-up agree exactly. Rounds continue until the interval's half-width
(high − low) / 2 is at most ``rel_halfwidth`` of the estimate, or the round cap or the time budget is
reached (after the minimum number of rounds), and the result says which.

Load: :class:`ForeignLoad` measures how many CPU cores other processes kept busy, on average, while the
timing ran (Linux ``/proc/stat`` minus this process's CPU time); where that is not readable, the 1-minute
load average minus the one timing thread.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Optional

import torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block; the previous count restored afterwards, also on error."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ratio_ci(ratios: Sequence[float], confidence: float = 0.95) -> tuple[float, Optional[float], Optional[float]]:
    """(geometric mean, low, high) of positive ``ratios``: a t-interval on their logs, mapped back by exp.
    With a single ratio the interval is undefined: (ratio, None, None)."""
    if not ratios:
        raise ValueError("ratio_ci needs at least one ratio")
    if any(not (r > 0 and math.isfinite(r)) for r in ratios):
        raise ValueError(f"ratios must be finite and > 0, got {list(ratios)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    logs = [math.log(r) for r in ratios]
    m = statistics.fmean(logs)
    n = len(logs)
    if n < 2:
        return math.exp(m), None, None
    from scipy.stats import t

    half = float(t.ppf((1 + confidence) / 2, n - 1)) * statistics.stdev(logs) / math.sqrt(n)
    return math.exp(m), math.exp(m - half), math.exp(m + half)


def rel_halfwidth(center: float, low: Optional[float], high: Optional[float]) -> float:
    """(high − low) / 2 over the estimate; inf while the interval is undefined."""
    if low is None or high is None:
        return math.inf
    return (high - low) / 2 / center


class ForeignLoad:
    """CPU cores kept busy by other processes between construction and :meth:`cores` (average over the
    wall time), from Linux ``/proc/stat`` (busy ticks of the whole machine) minus this process's CPU time;
    else ``os.getloadavg()[0]`` minus ``own_threads`` at the end; else None. :attr:`source` says which."""

    def __init__(self, own_threads: int = 1):
        self.own_threads = own_threads
        self.busy0, self.ours0, self.wall0 = self._busy(), time.process_time(), time.perf_counter()
        self.source: Optional[str] = None

    @staticmethod
    def _busy() -> Optional[float]:
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:]]
            return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
        except (OSError, ValueError, IndexError):
            return None

    def cores(self) -> Optional[float]:
        busy, wall = self._busy(), time.perf_counter() - self.wall0
        if busy is not None and self.busy0 is not None and wall > 0:
            self.source = "proc_stat"
            foreign = (busy - self.busy0) - (time.process_time() - self.ours0)
            return max(0.0, foreign / wall)
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):
            self.source = None
            return None
        self.source = "loadavg"
        return max(0.0, load - self.own_threads)


@dataclass
class PairedTiming:
    """The outcome of :func:`interleaved_ratio`; times in seconds, one entry per round."""

    times_a: list
    times_b: list
    ratio: float  # geometric mean of t_a / t_b
    ci_low: Optional[float]
    ci_high: Optional[float]
    confidence: float
    rel_halfwidth: float  # (high − low) / 2 / ratio; inf with fewer than 2 rounds
    target_halfwidth: float
    reps: int  # timed rounds (pairs)
    stop: str  # "ci" (target met), "max_reps", or "budget"
    threads: int
    foreign_load: Optional[float]  # cores busy with other processes, see ForeignLoad
    foreign_load_source: Optional[str]
    seconds: float  # wall time of the whole timing, warm-up included

    @property
    def gmean_a(self) -> float:
        return math.exp(statistics.fmean(math.log(t) for t in self.times_a))

    @property
    def gmean_b(self) -> float:
        return math.exp(statistics.fmean(math.log(t) for t in self.times_b))

    def to_dict(self) -> dict:
        return asdict(self)


def interleaved_ratio(run_a: Callable[[], object], run_b: Callable[[], object], *, warmup: int = 3,
                      min_reps: int = 10, max_reps: int = 100, target_halfwidth: float = 0.05,
                      confidence: float = 0.95, budget_s: Optional[float] = None, threads: int = 1,
                      clock: Callable[[], float] = time.perf_counter) -> PairedTiming:
    """Time ``run_a`` and ``run_b`` alternately (order swapped every round) on ``threads`` torch threads.

    ``warmup`` untimed rounds first; then at least ``min_reps`` timed rounds, and more until the
    ``confidence`` interval of t_a / t_b has a relative half-width of at most ``target_halfwidth``, or
    ``max_reps`` rounds, or ``budget_s`` seconds since the start (checked after each round once
    ``min_reps`` are done). Each callable must block until its work is done (synchronise a GPU itself).
    """
    if min_reps < 1 or max_reps < min_reps:
        raise ValueError(f"need 1 <= min_reps <= max_reps, got min_reps={min_reps}, max_reps={max_reps}")
    if warmup < 0 or threads < 1 or target_halfwidth <= 0:
        raise ValueError(f"need warmup >= 0, threads >= 1, target_halfwidth > 0; got {warmup}, {threads}, "
                         f"{target_halfwidth}")
    start = clock()
    load = ForeignLoad(own_threads=threads)
    ta: list[float] = []
    tb: list[float] = []
    stop = "max_reps"
    with torch_threads(threads):
        for r in range(warmup + max_reps):
            got = {}
            for name, fn in (("a", run_a), ("b", run_b)) if r % 2 == 0 else (("b", run_b), ("a", run_a)):
                t0 = clock()
                fn()
                got[name] = clock() - t0
            if r < warmup:
                continue
            ta.append(got["a"])
            tb.append(got["b"])
            if len(ta) < min_reps:
                continue
            center, low, high = ratio_ci([a / b for a, b in zip(ta, tb)], confidence)
            if rel_halfwidth(center, low, high) <= target_halfwidth:
                stop = "ci"
                break
            if budget_s is not None and clock() - start >= budget_s and len(ta) < max_reps:
                stop = "budget"
                break
    foreign = load.cores()
    center, low, high = ratio_ci([a / b for a, b in zip(ta, tb)], confidence)
    return PairedTiming(ta, tb, center, low, high, confidence, rel_halfwidth(center, low, high), target_halfwidth,
                        len(ta), stop, threads, foreign, load.source, clock() - start)
