"""Keep freed memory inside the process (glibc's malloc), so that large tensors are not page-faulted in anew.

Why: glibc serves blocks above its mmap threshold with fresh mmap()s and returns freed heap tops to the system,
so every UNet call on a CPU touched its activation and gradient buffers as new pages: 25 000-30 000 minor
page faults a call on the bundled prior at 256², a fifth of the call's time (docs/speed.md "Channels-last bf16 and
page faults"). Raising the mmap threshold and the trim threshold makes the freed blocks reusable. The cost is
memory kept by the process: the same peak at 256², +26 % peak RSS on a 1200×690 photo (for 1.7x the speed;
bench/measured/large_photo_malloc_epyc.txt).
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 256 * 2**20  # blocks below 256 MiB from the heap: every activation of the FFHQ net at 256², of the bundled one at 1024²
MMAP_THRESHOLD_OLD_GLIBC = 32 * 2**20  # glibc before 2.35 refuses more than HEAP_MAX_SIZE / 2 (32 MiB on 64-bit)
TRIM_THRESHOLD = 2**31 - 1   # never hand the heap's free top back


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # glibc's; musl has neither
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Set glibc's thresholds (idempotent); False where the C library is not glibc (macOS, musl, Windows) or
    refused them. An older glibc gets the largest mmap threshold it accepts (32 MiB: the bundled prior's
    activations at 256² fit; the FFHQ net's largest do not)."""
    libc = _libc()
    if libc is None:
        return False
    mmap_ok = (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
               or libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_OLD_GLIBC) == 1)
    trim_ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return mmap_ok and trim_ok


def release_freed_memory() -> None:
    """Hand the freed memory kept by `keep_freed_memory` back to the system now (glibc's malloc_trim): after an
    image ran out of memory, so that the next one does not start short of it."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
