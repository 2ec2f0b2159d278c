"""Process-level allocator tuning: each setting changes what glibc does, checked in a fresh interpreter."""

import platform
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc's")

MALLOC_INFO = """
import ctypes, tempfile
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
def malloc_info() -> str:
    with tempfile.NamedTemporaryFile(suffix=".xml") as report:
        stream = ctypes.c_void_p(libc.fopen(report.name.encode(), b"w"))
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        return open(report.name).read()
"""


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", MALLOC_INFO + textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


THREADS_ALLOCATING = """
import threading
from fashion_hf.runtime import limit_malloc_arenas
TUNE
together = threading.Barrier(6)
def allocate():
    buffers = [bytearray(40_000) for _ in range(50)]  # above pymalloc's sizes: glibc malloc serves these
    together.wait()  # every thread alive at once, so none inherits an arena a finished thread left
threads = [threading.Thread(target=allocate) for _ in range(6)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(malloc_info().count("<heap nr="))
"""


@pytest.mark.slow
def test_limit_malloc_arenas_keeps_threads_to_that_many_arenas():
    default = int(run_python(THREADS_ALLOCATING.replace("TUNE", "")))
    limited = int(run_python(THREADS_ALLOCATING.replace("TUNE", "assert limit_malloc_arenas(2)")))
    assert default > 2, "glibc gave the six threads fewer arenas than expected; the test proves nothing here"
    assert limited == 2


LARGE_ALLOCATION = """
from fashion_hf.runtime import keep_freed_memory
TUNE
import re
def mmapped_bytes() -> int:
    return int(re.search(r'<total type="mmap" count="\\d+" size="(\\d+)"/>', malloc_info()).group(1))
before = mmapped_bytes()
activation = bytearray(48 << 20)  # above the 32 MiB that glibc's own threshold can rise to
print(mmapped_bytes() - before)
"""


@pytest.mark.slow
def test_keep_freed_memory_serves_large_buffers_from_the_heap():
    default = int(run_python(LARGE_ALLOCATION.replace("TUNE", "")))
    tuned = int(run_python(LARGE_ALLOCATION.replace("TUNE", "assert keep_freed_memory()")))
    assert default >= 48 << 20  # glibc maps buffers this large on their own and unmaps them when freed
    assert tuned == 0
