"""The C allocator's policy for tensor-sized blocks, set once per process that runs the model.

PyTorch's CPU tensors come from `malloc`. glibc serves blocks above a threshold (32 MiB at most,
adjusted as it goes) with a fresh `mmap` and unmaps them on free, and trims free memory off the
top of its heaps: every large activation, gradient and mask buffer of every step is then
page-faulted in and zeroed by the kernel again (a 51 MiB buffer: 11 ms to fault in, 1 ms to fill
once mapped, on a 2-core machine). Serving them from the heap and keeping freed memory there makes
the next step reuse it: the process keeps its peak, which the next step needs anyway. Measured
in `benchmarks/model_vs_torchvision.py` (which applies it to both models) and in the jobs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_BYTES = 1 << 30  # blocks up to this size come from the heap; this much free memory stays there


def reuse_large_blocks(limit: int = KEEP_BYTES) -> bool:
    """Serve blocks up to `limit` bytes from the heap and keep up to `limit` bytes of freed memory
    in it. Returns False where the C library is not glibc (nothing changed).

    Threads other than the main one allocate from their own arenas, whose heaps hold at most
    64 MiB: there, larger blocks are still mapped afresh."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, limit))
