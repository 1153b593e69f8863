"""Train on the real output of `pipelines.data.run` (not the test helper's): an SFT dataset prepared from
../shared/data/xsum-frank, 1 worker, bf16 autocast on CPU, per-document masking."""

from __future__ import annotations

import json
import math

import pytest
from train_testlib import base_config, train_losses

from pipelines.config import load_config

pytestmark = pytest.mark.slow


def test_sft_training_on_real_prep_output(ray_session, shared_data, tmp_path):
    import torch

    from gptcore.checkpoint import load_checkpoint
    from pipelines.data import PrepConfig
    from pipelines.data import run as prep
    from pipelines.train.trainer import run

    src = shared_data / "xsum-frank" / "xsum_test_frank.jsonl"
    if not src.is_file():
        pytest.skip(f"{src} is absent")
    pcfg = load_config(PrepConfig, None, base={
        "name": "sft-test", "output": str(tmp_path / "data"), "kind": "sft", "progress": False,
        "inputs": [{"path": str(src), "format": "jsonl", "text_field": "article", "fields": ["article", "summary"]}],
        "tokenizer": {"kind": "char"}, "pack": {"block_size": 128, "val_fraction": 0.2},
        "sft": {"prompt_template": "{article}\n\nTL;DR: ", "completion_template": "{summary}<|endoftext|>"}})
    manifest = prep(pcfg)
    assert manifest["kind"] == "sft" and (tmp_path / "data" / "manifest.json").is_file()

    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    rd = tmp_path / "run"
    res = run(base_config(tmp_path / "data", rd, num_workers=1, max_steps=4, ckpt_interval=0, eval_interval=0,
                          eval_iters=2, doc_mask=True, precision="bf16" if bf16 else "fp32",
                          **{"log.peak_flops": 0.0}))  # measure the matmul peak once (cached)
    saved = json.loads((rd / "config.json").read_text())
    assert saved["sft"] is True and saved["data_manifest_id"] == manifest["id"]
    losses = train_losses(rd)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    assert res.final_val_loss is not None and math.isfinite(res.final_val_loss)
    ck = load_checkpoint(rd / "last")
    assert ck.meta["step"] == 4 and ck.tokenizer.id == manifest["tokenizer_id"]
    mfu = [json.loads(x).get("mfu") for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert any(isinstance(m, float) and 0 < m < 1 for m in mfu)
