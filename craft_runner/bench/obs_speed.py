"""make bench's GPTQ row: GPTQ's seconds on one layer over BasePTQ's on the same layer.

Both weight-only at 4 bits on the 10th Conv2d of ResNet-20 (the layer the PTQ search row times) with 32 random 32x32
calibration images: GPTQ is the layer's Hessian from its captured input plus the OBS sweep
(:func:`craft_runner.compress.gptq.gptq_matrix`); BasePTQ is its weight-scale search
(:func:`craft_runner.compress.search.search_layer`, cosine, 100 candidates, one round). One thread, interleaved,
medians.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from craft_runner.compress import search as S
from craft_runner.compress.gptq import gptq_matrix
from craft_runner.compress.obs import HessianAccumulator, weight_matrix

# GPTQ's sweep is one small update per weight column where BasePTQ scores 100 candidate convolutions: measured
# (2 shared cores) 0.03; the target leaves room for a busy machine.
GPTQ_TARGET = 0.25


def bench_gptq(model: nn.Module, rounds: int = 3, n_images: int = 32):
    """A :class:`craft_runner.bench.speed.Row`-shaped tuple (name, ratio, target, detail)."""
    m = copy.deepcopy(model).eval().to(memory_format=torch.contiguous_format)
    conv = [c for c in m.modules() if isinstance(c, nn.Conv2d)][9]
    x = torch.randn(n_images, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with S.frozen(m):
            (xin,), out, _ = S.capture(m, [(conv, 1)], [(x, None)], False)[conv]
        ratios = S.candidate_ratios(0.5, 1.2, 100)

        def base():
            S.search_layer(conv, xin, out, None, 4, 16, ratios, 1, "cosine", 1)

        def gptq():
            acc = HessianAccumulator(conv)
            acc.add(xin)
            gptq_matrix(weight_matrix(conv), acc.H, 4)

        tb, tg = [], []
        for r in range(rounds):
            for f in ((base, gptq) if r % 2 == 0 else (gptq, base)):
                t0 = time.perf_counter()
                f()
                (tb if f is base else tg).append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    g, b = statistics.median(tg), statistics.median(tb)
    return ("GPTQ / BasePTQ seconds per layer", g / b, GPTQ_TARGET,
            f"{1e3 * g:.1f} ms vs {1e3 * b:.1f} ms, W4A16 (GPTQ: Hessian + OBS sweep of {conv.weight[0].numel()} "
            f"columns; BasePTQ: cosine weight-scale search, 100 candidates), ResNet-20 {conv.in_channels}->"
            f"{conv.out_channels} {'x'.join(map(str, conv.kernel_size))} on {n_images} images, 1 thread, "
            f"{rounds} pairs")
