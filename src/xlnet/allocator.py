"""Host memory allocator settings for the processes `xlnet` runs (glibc malloc on Linux).

A training or inference step on CPU allocates and frees tens of megabytes to gigabytes of temporaries (scores,
dropout masks, activations, gradients). By default glibc maps blocks above a moving threshold (128 KiB, raised up
to 32 MiB as such blocks are freed) straight from the kernel and unmaps them on free, and trims the top of its
heap once more than twice that threshold is free there, so the next step's buffers arrive as fresh pages: each
4 KiB page is a fault that the kernel zero-fills. On the 2-core CPUs here that was 10-30 thousand faults per
step for the tiny preset (up to a quarter of an inference forward: 86 ms a step, 65 ms without) and over a
million for the base preset at seq 512 (a fine-tuning step of 8.3 s, 5.6 s without). Serving every block from
the heap and never trimming it keeps freed memory mapped for the next step; peak RSS grew by up to 5% (it is the
same high-water mark), and a process keeps its peak until it exits.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
# set by the user: their choice stands
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "GLIBC_TUNABLES")


def tune_host_allocator() -> bool:
    """Serve every block from the heap (no per-block mmap/munmap) and never trim it (see the module docstring).
    A no-op, returning False, off glibc, with XLNET_TUNE_MALLOC=0, or where the user set malloc's own variables."""
    if os.environ.get("XLNET_TUNE_MALLOC", "1") == "0" or any(os.environ.get(k) for k in USER_SETTINGS):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only (musl has mallopt as a stub)
    except (OSError, AttributeError):
        return False
    # both, even if the first fails (mallopt returns 1 on success); a trim threshold of -1 turns trimming off
    return bool(libc.mallopt(M_MMAP_MAX, 0)) & bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
