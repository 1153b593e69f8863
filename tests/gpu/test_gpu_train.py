"""ZeRO-2 and ZeRO-3 training steps on CUDA through raygpt's trainer (Ray Train use_gpu=true, DeepSpeed),
tiny model, a few steps; the GPU lane: `pytest -m gpu tests/gpu` (skips without CUDA)."""

from __future__ import annotations

import math

import pytest


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_train_steps_on_cuda(ray_session, char_data, tmp_path, stage):
    from gpu_testlib import cuda_count
    from train_testlib import base_config, train_losses

    from pipelines.train.trainer import run

    workers = min(2, cuda_count())
    rd = tmp_path / f"zero{stage}"
    cfg = base_config(char_data, rd, use_gpu=True, num_workers=workers, zero_stage=stage, precision="bf16",
                      max_steps=6, ckpt_interval=3, eval_interval=3)
    run(cfg)
    losses = train_losses(rd)
    assert len(losses) == 6, losses
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[max(losses)] < losses[min(losses)], losses
