"""Process-wide settings of a training process (the ``craft-run`` entry and ``make bench`` call them)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """On glibc, serve tensors up to 1 GiB from the heap and keep freed memory for the next allocation.

    By default glibc maps every block over 128 KiB fresh from the kernel and unmaps it on free, so each
    activation tensor of a CPU training step costs page faults on first touch: on the default job this
    was 40 s of kernel time in 4 minutes, and 10x the time of a ReLU on a 4 MB tensor. The price is a
    resident size that stays at its peak. Results do not change. ``CRAFT_MALLOC=default`` leaves glibc's
    settings alone; returns whether they were changed.
    """
    if os.environ.get("CRAFT_MALLOC", "") == "default":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    ok = all(mallopt(p, v) == 1 for p, v in ((_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, 1 << 30),
                                              (_M_TOP_PAD, 256 << 20)))
    if not ok:
        log.debug("mallopt refused a setting: glibc's defaults partly kept")
    return ok
