"""Host memory allocator settings for the processes `xlnet` runs (glibc malloc on Linux).

A training or inference step on CPU allocates and frees tens of megabytes of temporaries (scores, dropout masks,
gradients). By default glibc hands blocks above a moving threshold (128 KiB, raised up to 32 MiB as such blocks
are freed) back to the kernel on free, and trims the top of the heap once more than twice that is free there, so
the next step's buffers arrive as fresh pages: each 4 KiB page is a fault that the kernel zero-fills. On the
2-core CPUs here that was 10-30 thousand faults per step and up to a quarter of an inference forward (tiny preset,
seq 256, batch 8: 77-95 ms a step, 66 ms without the faults). Keeping blocks up to 32 MiB in the heap and
trimming only past 1 GiB free leaves freed memory mapped for the next step; peak RSS did not change (it is the
same high-water mark), though a process holds its peak until it exits.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for it on 64-bit
TRIM_THRESHOLD = 2**30
# set by the user: their choice stands
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def tune_host_allocator() -> bool:
    """Keep freed blocks of up to 32 MiB mapped between steps (see the module docstring). A no-op, returning
    False, off glibc, with XLNET_TUNE_MALLOC=0, or where the user set malloc's own variables."""
    if os.environ.get("XLNET_TUNE_MALLOC", "1") == "0" or any(os.environ.get(k) for k in USER_SETTINGS):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only (musl has mallopt as a stub)
    except (OSError, AttributeError):
        return False
    # both, even if the first fails (mallopt returns 1 on success)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
