"""Bounded memory: the same 20 training steps on a token dataset 1x and 16x as large (16 and 256 chunks of
1,024 rows of 129 tokens: 2.1 M and 33.8 M tokens). Each size trains in a fresh process (a 1-layer GPT, AdamW,
streamed input) that reports its peak RSS (VmHWM); the 16x dataset holds the 1x dataset's rows where its
own order schedules the first 20 steps, so both runs train on the same rows and their losses and micro
batches must be identical. Peak RSS at 16x is within 1.2x of 1x. A control run reads the 16x split into RAM
(read_split, 12 bytes a token) and must exceed that bound: the measurement sees what streaming saves."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from test_train_stream import write_tokens

from pipelines.train.data import CHUNK_ROWS, SampleOrder

pytestmark = pytest.mark.slow

STEPS, B, SEED, BLOCK = 20, 8, 11, 128
ROWS_PER_SHARD = 4 * CHUNK_ROWS

CHILD = """
import hashlib, json, sys
import numpy as np, torch, torch.nn.functional as F
from gptcore.config import preset
from gptcore.model import GPT
from pipelines.train.data import SplitRows, TrainStream, open_dataset, read_split
torch.set_num_threads(1)
torch.manual_seed(0)
def hwm_kb():
    # VmHWM: this process's own peak RSS. Not ru_maxrss: Linux carries a forking parent's peak across exec,
    # so under a big pytest process every child would report the parent's size
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
base = hwm_kb()
ds = open_dataset(sys.argv[1])
rows = read_split(ds.manifest, "train") if sys.argv[2] == "ram" else ds.split_rows("train")
stream = TrainStream(rows, seed=int(sys.argv[3]), micro_batch=int(sys.argv[4]), grad_accum=1, world=1, rank=0,
                     doc_mask=True)
model = GPT(preset("debug", vocab_size=int(ds.manifest["vocab_size"]), block_size=ds.block_size, n_layer=1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
losses, h = [], hashlib.sha256()
for step in range(int(sys.argv[5])):
    x, y, d = stream.micro_batch(step, 0)
    for a in (x, y, d):
        h.update(np.ascontiguousarray(a).tobytes())
    logits, _ = model(torch.from_numpy(x))
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), torch.from_numpy(y).view(-1), ignore_index=-1)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(loss.item())
peak = hwm_kb()
print("RESULT " + json.dumps({"losses": losses, "batches": h.hexdigest(), "base_mb": base / 1024,
                              "peak_mb": peak / 1024}))
"""


def _train(data, mode: str) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, str(data), mode, str(SEED), str(B), str(STEPS)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.split("RESULT ", 1)[1])


def test_peak_rss_does_not_grow_with_the_dataset(tmp_path):
    n1, n16 = 16 * CHUNK_ROWS, 256 * CHUNK_ROWS
    first = np.arange(STEPS * B)
    rows1 = SampleOrder([ROWS_PER_SHARD] * (n1 // ROWS_PER_SHARD)).rows_at((SEED, 0), first)
    rows16 = SampleOrder([ROWS_PER_SHARD] * (n16 // ROWS_PER_SHARD)).rows_at((SEED, 0), first)
    same = np.full(n16, -1, dtype=np.int64)
    same[rows16] = rows1  # the 16x dataset's first scheduled rows hold the 1x dataset's first scheduled rows

    def content16(r):
        return np.where(same[r] >= 0, same[r], 10**8 + r)

    d1 = write_tokens(tmp_path / "x1", n1, block_size=BLOCK, rows_per_shard=ROWS_PER_SHARD)
    d16 = write_tokens(tmp_path / "x16", n16, block_size=BLOCK, rows_per_shard=ROWS_PER_SHARD, content=content16)
    one, sixteen = _train(d1, "stream"), _train(d16, "stream")
    ram16 = _train(d16, "ram")
    report = {"tokens": {"1x": n1 * (BLOCK + 1), "16x": n16 * (BLOCK + 1)},
              "peak_rss_mb": {"1x": one["peak_mb"], "16x": sixteen["peak_mb"], "16x_in_ram": ram16["peak_mb"]},
              "rss_after_imports_mb": {"1x": one["base_mb"], "16x": sixteen["base_mb"], "16x_in_ram": ram16["base_mb"]}}
    print("bounded-memory:", json.dumps(report))
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert one["batches"] == sixteen["batches"] == ram16["batches"]  # the same rows, in the same order
    assert one["losses"] == sixteen["losses"] == ram16["losses"]
    assert sixteen["peak_mb"] <= 1.2 * one["peak_mb"], report
    assert ram16["peak_mb"] > 1.2 * one["peak_mb"], report  # the control: holding the split in RAM shows
