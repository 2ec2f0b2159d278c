"""Process-level tuning that CNN inference and training on CPU need."""

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Stop glibc from returning large activation buffers to the kernel after every layer.

    By default glibc serves allocations above a few MB with fresh mmap pages and unmaps them on free, so every
    forward pass page-faults its activations in again. On sandboxed kernels that dominates: a tf_efficientnet_lite0
    trunk measured 23-96 img/s before and ~640 img/s after on the 2-core dev machine (benchmarks/README.md).
    Returns False where the C library has no `mallopt` (not glibc).
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name)
    if not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))


def cpu_threads_per_process(local_processes: int = 1) -> int:
    """This machine's usable cores shared evenly among the processes that run on it (at least 1 each)."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, local_processes))
