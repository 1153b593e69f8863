"""Keep a training process's freed large buffers for reuse instead of handing them back to the OS (glibc).

    from pipelines.train.malloc import keep_freed_buffers
    keep_freed_buffers()          # True where it took effect (glibc); process-wide, from then on

Why: PyTorch on a CPU has no caching allocator, so every step allocates and frees the same large tensors
(logits, their gradient, softmax outputs, activations). glibc serves any block above its mmap threshold (at
most 32 MiB on 64-bit) with a fresh mmap and unmaps it on free, so the next step touches new pages: one page
fault per 4 KiB, every step. For the demo's model (4,096 tokens x 4,096 vocabulary per step: 64 MiB of
logits) that made `F.cross_entropy` forward + backward 63 ms instead of 26, and the whole step 294 ms instead
of 253 (Intel Xeon x2, BENCHMARKS.md "Training"). With mmap off (M_MMAP_MAX = 0) every block comes from
the heap, and with a high trim threshold a freed block stays mapped for the next step.

The cost: the process keeps its high-water mark of heap memory mapped until it exits, instead of returning
freed large blocks at once. A training step's working set is the same every step, so that mark is reached in
the first steps and does not grow with the run's length (tests/pipelines/train/test_malloc.py). TrainConfig's
`malloc_reuse: false` leaves glibc's defaults. Does nothing under another C library (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # free space at the heap's top kept mapped before glibc trims it


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def keep_freed_buffers() -> bool:
    """Turn glibc's mmap allocations off and raise its trim threshold for this process; True if both took."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
