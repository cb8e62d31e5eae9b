"""Keep freed memory inside the process (glibc's malloc), so that large tensors are not page-faulted in anew.

Why: glibc serves blocks above its mmap threshold with fresh mmap()s and returns freed heap tops to the system,
so every UNet call on a CPU touched its activation and gradient buffers as new pages: ~30 000 minor page
faults a call on the bundled prior at 256², a fifth of the call's time (docs/speed.md "Page faults").
Raising the mmap threshold and the trim threshold makes the freed blocks reusable; the peak memory is the same
(it is what a call needs), only it is not handed back between calls.
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 64 * 2**20  # blocks up to 64 MiB from the heap: every activation of a 512² image in fp32
TRIM_THRESHOLD = 2**31 - 1   # never hand the heap's free top back


def keep_freed_memory() -> bool:
    """Set glibc's thresholds (idempotent); False where the C library is not glibc (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
