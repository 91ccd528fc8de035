"""RPReLU's CPU kernels in C, built once per machine with the system compiler and loaded with ctypes.

Why not torch.compile on the CPU: its generated kernels for RPReLU cost ~2x a ReLU per call in a training
step (a symbolic shape per call, two passes in backward), which made an SNT ResNet-20 step 1.17x the base one.
These take one pass each way over a channels-last (rows, C) float32 tensor, as a ReLU does: the backward
writes ∂x and sums the three parameter gradients per channel in the same pass (float within blocks of rows,
double across them), then writes them out. Threads: OpenMP, resolved to the libgomp torch already loaded,
so ``torch.set_num_threads`` applies. Anything else (CUDA, float64, NCHW layout, no compiler) takes the
other paths of :mod:`snt`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* out = (y > 0 ? y : beta*y) + zeta, y = x - gamma, per channel c of a (rows, C) row-major array */
void rprelu_forward(const float* x, float* out, const float* gamma, const float* beta, const float* zeta,
                    int64_t rows, int64_t C) {
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const float* xr = x + i * C;
        float* o = out + i * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; c++) {
            float y = xr[c] - gamma[c];
            o[c] = (y > 0.f ? y : beta[c] * y) + zeta[c];
        }
    }
}

/* dx = g on y > 0, beta*g elsewhere; with S = sum g, N = sum g on y <= 0, P = sum g*y on y <= 0 per channel:
   dgamma = (1 - beta)*N - S, dbeta = P, dzeta = S, written to grads[0..C), [C..2C), [2C..3C) */
void rprelu_backward(const float* g, const float* x, const float* gamma, const float* beta, float* dx,
                     float* grads, int64_t rows, int64_t C) {
    const int64_t block = 64;
    double* sums = (double*)calloc(3 * C, sizeof(double));
    #pragma omp parallel
    {
        float* acc = (float*)calloc(3 * C, sizeof(float));
        double* tot = (double*)calloc(3 * C, sizeof(double));
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < rows; b += block) {
            int64_t end = b + block < rows ? b + block : rows;
            for (int64_t i = b; i < end; i++) {
                const float* gr = g + i * C;
                const float* xr = x + i * C;
                float* d = dx + i * C;
                #pragma omp simd
                for (int64_t c = 0; c < C; c++) {
                    float y = xr[c] - gamma[c];
                    float gv = gr[c];
                    float gn = y > 0.f ? 0.f : gv;
                    d[c] = gv + (beta[c] - 1.f) * gn;
                    acc[c] += gv;
                    acc[C + c] += gn;
                    acc[2 * C + c] += gn * y;
                }
            }
            for (int64_t k = 0; k < 3 * C; k++) {
                tot[k] += acc[k];
                acc[k] = 0.f;
            }
        }
        #pragma omp critical
        for (int64_t k = 0; k < 3 * C; k++) sums[k] += tot[k];
        free(acc);
        free(tot);
    }
    for (int64_t c = 0; c < C; c++) {
        grads[c] = (float)((1.0 - beta[c]) * sums[C + c] - sums[c]);
        grads[C + c] = (float)sums[2 * C + c];
        grads[2 * C + c] = (float)sums[c];
    }
    free(sums);
}
"""

def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "craft_runner"


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return platform.machine() + next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.machine() + platform.processor()


def _build() -> Optional[ctypes.CDLL]:
    """The kernels' library: built into ~/.cache/craft_runner/ the first time (about a second), then loaded."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise OSError("no C compiler (cc, gcc or clang) on PATH")
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99"]
    # -march=native: the file is keyed by this CPU's instruction sets too (a cache shared by different nodes)
    digest = hashlib.sha256((_SOURCE + " ".join(flags) + cc + _cpu_id()).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"rprelu-{digest}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            src, out = Path(tmp) / "rprelu.c", Path(tmp) / "rprelu.so"
            src.write_text(_SOURCE)
            p = subprocess.run([cc, *flags, str(src), "-o", str(out)], capture_output=True, text=True, timeout=120)
            if p.returncode != 0:
                raise OSError(f"{cc} failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
            os.replace(out, lib)  # atomic: concurrent jobs build the same file
    dll = ctypes.CDLL(str(lib))
    for fn in (dll.rprelu_forward, dll.rprelu_backward):
        fn.restype = None
    return dll


@functools.cache
def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, or None when they cannot be built here (a warning once; ``CRAFT_RPRELU_KERNEL=compile``
    skips them)."""
    if os.environ.get("CRAFT_RPRELU_KERNEL", "") == "compile":
        return None
    try:
        return _build()
    except Exception as e:  # noqa: BLE001 - any build or load failure: the torch.compile path
        log.warning("RPReLU: no C kernels (%s: %s); using torch.compile's", type(e).__name__, e)
        return None


def _rows(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``t`` as a (rows, C) row-major view with the channel last, or None when its memory is not laid out so."""
    if t.ndim == 4:
        t = t.permute(0, 2, 3, 1)
    if not t.is_contiguous():
        return None
    return t.reshape(-1, t.shape[-1])


def usable(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() > 0 and _rows(x) is not None
            and library() is not None)


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def forward(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, zeta: torch.Tensor) -> torch.Tensor:
    """Eq. (1) for a CPU float32 ``x`` that :func:`usable` accepts; the output has x's layout."""
    out = torch.empty_like(x)
    c = x.shape[1 if x.ndim == 4 else -1]  # channels: dim 1 of a channels-last 4-D tensor, else the last
    rows = x.numel() // c
    library().rprelu_forward(_ptr(x), _ptr(out), _ptr(gamma.contiguous()), _ptr(beta.contiguous()),
                             _ptr(zeta.contiguous()), ctypes.c_int64(rows), ctypes.c_int64(c))
    return out


def backward(g: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor):
    """(∂x, ∂γ, ∂β, ∂ζ) of eq. (1) for the output gradient ``g`` (brought to x's layout when it differs)."""
    if g.stride() != x.stride():
        g = g.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.contiguous_format)
    xr, gr = _rows(x), _rows(g)
    dx = torch.empty_like(x)
    rows, c = xr.shape
    grads = torch.empty(3, c)
    library().rprelu_backward(_ptr(gr), _ptr(xr), _ptr(gamma.contiguous()), _ptr(beta.contiguous()),
                              _ptr(dx), _ptr(grads), ctypes.c_int64(rows), ctypes.c_int64(c))
    return dx, grads[0], grads[1], grads[2]
