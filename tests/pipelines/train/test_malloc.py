"""malloc_reuse: a training process keeps freed large buffers mapped, so a step stops page-faulting them in again."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from pipelines.train.malloc import _libc

PROBE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from pipelines.train.malloc import keep_freed_buffers
    took = keep_freed_buffers() if sys.argv[1] == "1" else None
    def step():  # what a training step does to the allocator: the same large tensors made and dropped
        x = torch.empty(4096, 4096)  # 64 MiB, above glibc's largest mmap threshold (32 MiB)
        x.fill_(1.0)
        return float(x[0, 0])
    step(); step()
    faults, rss = [], []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"took": took, "faults": faults,
                      "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


def _probe(on: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if on else "0"], capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_libc() is None, reason="not glibc: keep_freed_buffers() does nothing under this C library")
def test_freed_large_buffers_are_reused_without_page_faults_and_memory_stays_flat():
    off, on = _probe(False), _probe(True)
    assert on["took"] is True
    # glibc's default: each 64 MiB tensor is a fresh mmap, 16,384 pages faulted in on every step
    assert min(off["faults"]) > 10_000, off
    # reused: the pages are still mapped from the step before (once the heap has settled: glibc may move the
    # block once in the first steps)
    assert max(on["faults"][-5:]) < 500, on
    # the price is bounded: at most a buffer or two more at the high-water mark (10 steps made 10 buffers)
    assert on["maxrss_kb"] < off["maxrss_kb"] + 150 * 1024, (on, off)


def test_train_config_key_defaults_on_and_can_be_turned_off():
    from pipelines.train.config import TrainConfig

    assert TrainConfig(data="d").malloc_reuse is True
    assert TrainConfig(data="d", malloc_reuse=False).malloc_reuse is False
