"""Whether bf16 is worth it on this CPU: supported by oneDNN, and measured faster than fp32.

    from pipelines.train.bf16 import cpu_bf16_ok, cpu_bf16_speedup, BF16_MIN_SPEEDUP
    cpu_bf16_ok()                 # oneDNN runs bf16 matmuls natively here (AVX512-BF16 or AMX)
    cpu_bf16_speedup(threads=2)   # fp32 time / bf16 time of one 512 x 512 product (0.0: unsupported)

Used by `precision: auto` (pipelines/train/deepspeed.py) and Muon's Newton-Schulz dtype (muon.py). Does not:
look at GPUs (torch.cuda.is_bf16_supported() answers there).
"""

from __future__ import annotations

import functools
import math


def cpu_bf16_ok() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


BF16_MIN_SPEEDUP = 1.25  # bf16 must beat fp32 by this much to be chosen: a margin against timing noise


@functools.cache
def cpu_bf16_speedup(threads: int, n: int = 512, trials: int = 5) -> float:
    """bf16 / fp32 matmul speed on this CPU at `threads` threads, measured (~20 ms; once per process).

    Why measure instead of reading CPU flags: a CPU (or a VM's view of it) can report AVX512-BF16 while
    oneDNN's bf16 kernels run at half fp32's speed (seen on an Intel Xeon VM with AVX512-BF16 and no AMX
    exposed: 160 vs 320 GFLOP/s, and the nanoGPT recipe's step 1.7x slower under bf16 autocast). Where AMX
    runs bf16 the ratio is several x, where bf16 is emulated it is ~1/40: the margin decides, not noise.
    Returns 0.0 where bf16 matmuls are not supported at all."""
    import time

    import torch

    if not cpu_bf16_ok():
        return 0.0
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        best = {}
        for dt in (torch.float32, torch.bfloat16):
            a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
            for _ in range(2):
                a @ b
            t = math.inf
            for _ in range(trials):
                t0 = time.perf_counter()
                a @ b
                t = min(t, time.perf_counter() - t0)
            best[dt] = t
        return best[torch.float32] / best[torch.bfloat16]
    finally:
        torch.set_num_threads(before)
