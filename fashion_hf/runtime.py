"""Process-level tuning that CNN inference and training on CPU need."""

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
KEEP_BYTES = 1 << 30


def _mallopt(*settings: tuple[int, int]) -> bool:
    """glibc's `mallopt` for each (parameter, value); False where the C library has none (not glibc)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name)
    if not hasattr(libc, "mallopt"):
        return False
    return all([bool(libc.mallopt(parameter, value)) for parameter, value in settings])


def keep_freed_memory() -> bool:
    """Stop glibc from returning large activation buffers to the kernel after every layer.

    By default glibc serves allocations above a few MB with fresh mmap pages and unmaps them on free, so every
    forward pass page-faults its activations in again. On sandboxed kernels that dominates: a tf_efficientnet_lite0
    trunk measured 23-96 img/s before and ~640 img/s after on the 2-core dev machine (benchmarks/README.md).
    Returns False where the C library has no `mallopt` (not glibc).
    """
    return _mallopt((M_MMAP_THRESHOLD, KEEP_BYTES), (M_TRIM_THRESHOLD, KEEP_BYTES))


def limit_malloc_arenas(count: int = 2) -> bool:
    """Let at most `count` glibc malloc arenas serve all threads (glibc's default: 8 per core).

    A server runs its handlers on a pool of worker threads; each thread that allocates may get an arena of its own,
    and the image and activation buffers freed in one are not reused by the others, so resident memory climbs with
    the number of threads that ever ran a request. Call it before those threads start.
    """
    return _mallopt((M_ARENA_MAX, count))


def cpu_threads_per_process(local_processes: int = 1) -> int:
    """This machine's usable cores shared evenly among the processes that run on it (at least 1 each)."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, local_processes))
