"""How ToMe / token pruning time their speed-up (craft_runner.timing): one thread, interleaved pairs, a t-interval
on the per-pair ratios, and r=0 / keep rate 1 as exactly x1 without timing. No test asserts a measured time."""

import itertools
import math

import numpy as np
import pytest
import timm
import torch
from scipy import stats

import craft_runner.compress.tokens as tokens
import craft_runner.timing as timing
from craft_runner.compress import CompressContext
from craft_runner.compress.tokens import TokenPruneConfig, ToMeConfig, token_prune, tome
from craft_runner.config import ConfigError
from craft_runner.timing import interleaved_ratio, ratio_ci, rel_halfwidth, torch_threads

CPU = torch.device("cpu")


def _vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=5, img_size=32, patch_size=8).eval()


def _ctx(n=2):
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return CompressContext(device=CPU, calib_batches=[(x, torch.zeros(n, dtype=torch.long))])


class _FakeClock:
    """A clock that advances only when a timed callable says so: deterministic 'durations'."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def work(self, dt):
        def run():
            self.now += dt
        return run


# ------------------------------------------------------------------- r=0 / keep rate 1: x1 by definition


def _timer_must_not_run(*a, **k):
    raise AssertionError("the timer ran")


@pytest.mark.parametrize("fn, cfg", [
    (tome, ToMeConfig(r=0, speed_reps=5)),
    (tome, ToMeConfig(r=3, r_schedule=[0, 0, 0], speed_reps=5)),
    (token_prune, TokenPruneConfig(keep_rate=1.0, speed_reps=5)),
    (token_prune, TokenPruneConfig(keep_rate_schedule=[1.0, 1.0], speed_reps=5)),
])
def test_no_change_is_exactly_x1_without_timing(monkeypatch, fn, cfg):
    monkeypatch.setattr(tokens, "_paired_throughput", _timer_must_not_run)
    monkeypatch.setattr(tokens, "interleaved_ratio", _timer_must_not_run)
    monkeypatch.setattr(timing, "interleaved_ratio", _timer_must_not_run)
    info = fn(_vit(), None, cfg, _ctx())
    assert info["speedup"] == 1.0 and type(info["speedup"]) is float
    assert info["speedup_ci_low"] == info["speedup_ci_high"] == 1.0
    assert info["timed"] is False and info["timing_note"].startswith("not timed:")
    assert info["timing_reps"] == 0 and info["timing_threads"] is None
    assert info["throughput_before"] is None and info["throughput_after"] is None
    assert info["tokens_per_block"] == [17] * 6


def test_a_real_change_goes_through_the_timer(monkeypatch):
    monkeypatch.setattr(tokens, "_paired_throughput", _timer_must_not_run)
    with pytest.raises(AssertionError, match="the timer ran"):
        tome(_vit(), None, ToMeConfig(r=1, speed_reps=2), _ctx())
    with pytest.raises(AssertionError, match="the timer ran"):
        token_prune(_vit(), None, TokenPruneConfig(keep_rate=0.5, speed_reps=2), _ctx())


def test_speed_reps_0_records_no_speedup(monkeypatch):
    monkeypatch.setattr(tokens, "_paired_throughput", _timer_must_not_run)
    info = tome(_vit(), None, ToMeConfig(r=2, speed_reps=0), _ctx())
    assert info["speedup"] is None and info["timed"] is False and "speed_reps=0" in info["timing_note"]


# ------------------------------------------------------------------- the interval


@pytest.mark.parametrize("confidence", [0.95, 0.9, 0.99])
def test_ratio_ci_is_a_t_interval_on_the_log_ratios(confidence):
    ratios = [1.10, 0.95, 1.30, 1.02, 1.18, 1.07]
    logs = np.log(ratios)
    n = len(logs)
    sem = logs.std(ddof=1) / math.sqrt(n)
    lo, hi = stats.t.interval(confidence, n - 1, loc=logs.mean(), scale=sem)
    center, low, high = ratio_ci(ratios, confidence)
    assert center == pytest.approx(math.exp(logs.mean()), rel=1e-12)
    assert center == pytest.approx(stats.gmean(ratios), rel=1e-12)
    assert (low, high) == pytest.approx((math.exp(lo), math.exp(hi)), rel=1e-12)
    assert rel_halfwidth(center, low, high) == pytest.approx((high - low) / 2 / center)


def test_ratio_ci_edge_cases():
    assert ratio_ci([1.25]) == (1.25, None, None)
    assert rel_halfwidth(1.25, None, None) == math.inf
    assert ratio_ci([2.0, 2.0, 2.0]) == pytest.approx((2.0, 2.0, 2.0))
    for bad in ([], [1.0, 0.0], [1.0, -2.0], [1.0, math.inf]):
        with pytest.raises(ValueError):
            ratio_ci(bad)
    with pytest.raises(ValueError, match="confidence"):
        ratio_ci([1.0, 1.1], confidence=1.0)


# ------------------------------------------------------------------- the loop (fake clock: no real times)


def test_interleaved_alternates_and_stops_when_the_interval_is_narrow():
    clock, order = _FakeClock(), []
    a, b = clock.work(2.0), clock.work(1.0)

    def run_a():
        order.append("a")
        a()

    def run_b():
        order.append("b")
        b()

    tm = interleaved_ratio(run_a, run_b, warmup=1, min_reps=4, max_reps=50, clock=clock)
    assert order[:8] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # order swapped every round
    assert tm.stop == "ci" and tm.reps == 4 and len(order) == 2 * (1 + 4)  # zero spread: the minimum suffices
    assert tm.ratio == pytest.approx(2.0) and tm.ci_low == pytest.approx(2.0) and tm.threads == 1
    assert tm.gmean_a / tm.gmean_b == pytest.approx(tm.ratio)


def test_interleaved_stops_at_the_cap_or_the_budget_when_the_interval_stays_wide():
    clock = _FakeClock()
    k = iter(range(10 ** 6))
    noisy = [3.0, 0.5]

    def run_b():
        clock.now += noisy[next(k) % 2]

    tm = interleaved_ratio(clock.work(1.0), run_b, warmup=0, min_reps=3, max_reps=7, clock=clock)
    assert tm.stop == "max_reps" and tm.reps == 7 and tm.rel_halfwidth > 0.05
    tm = interleaved_ratio(clock.work(1.0), run_b, warmup=0, min_reps=3, max_reps=1000, budget_s=20.0, clock=clock)
    assert tm.stop == "budget" and 3 <= tm.reps < 1000


def test_bad_timing_settings_are_refused():
    for kw in (dict(min_reps=0), dict(min_reps=5, max_reps=4), dict(threads=0), dict(target_halfwidth=0)):
        with pytest.raises(ValueError):
            interleaved_ratio(lambda: None, lambda: None, **kw)
    for kw, key in ((dict(speed_reps=20, speed_max_reps=10), "compress.speed_max_reps"),
                    (dict(speed_ci=0.0), "compress.speed_ci"), (dict(speed_budget_s=0), "compress.speed_budget_s")):
        with pytest.raises(ConfigError, match=f"^{key}="):
            ToMeConfig(**kw)


# ------------------------------------------------------------------- one thread, restored


def test_timing_runs_on_one_thread_and_restores_the_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen = []
        interleaved_ratio(lambda: seen.append(torch.get_num_threads()), lambda: seen.append(torch.get_num_threads()),
                          warmup=1, min_reps=2, max_reps=2, clock=itertools.count().__next__)
        assert set(seen) == {1} and torch.get_num_threads() == 2

        def boom():
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            interleaved_ratio(boom, boom)
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"), torch_threads(1):
            assert torch.get_num_threads() == 1
            boom()
        assert torch.get_num_threads() == 2

        model = _vit()
        info = tome(model, None, ToMeConfig(r=2, speed_batch=2, speed_warmup=0, speed_reps=2, speed_max_reps=2),
                    _ctx())
        assert torch.get_num_threads() == 2 and model._tok_state.active
    finally:
        torch.set_num_threads(before)
    # what is recorded beside the figure (its shape, not its value)
    assert info["timed"] is True and info["timing_note"] is None
    assert info["timing_threads"] == 1 and info["timing_reps"] == 2 and info["timing_stop"] in ("ci", "max_reps")
    assert info["speedup"] == pytest.approx(info["throughput_after"] / info["throughput_before"], rel=1e-9)
    assert info["speedup_ci_low"] <= info["speedup"] <= info["speedup_ci_high"]
    assert info["speedup_confidence"] == 0.95 and info["timing_ci_target"] == 0.05
    assert info["foreign_load_source"] in ("proc_stat", "loadavg", None)
    assert info["foreign_load"] is None or info["foreign_load"] >= 0
