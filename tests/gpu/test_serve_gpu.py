"""Serve with one GPU per replica (`num_gpus=1`); the GPU lane: `pytest -m gpu tests/gpu` (skips without CUDA).

A replica reserves a GPU from Ray (ServeConfig.num_gpus -> ray_actor_options), its engine runs on CUDA
(ServeConfig.device), and a greedy completion over real HTTP equals the CPU engine's tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines" / "serve"))

from serve_testlib import deploy, free_port, undeploy

TEXT = "To be, or not to be, that is the question: whether tis nobler in the mind to suffer. " * 4


def test_config_reserves_a_gpu_and_runs_on_cuda():
    from pipelines.serve.config import ServeConfig, deployment_options

    cfg = ServeConfig(checkpoint="unused", num_gpus=1)
    assert deployment_options(cfg)["ray_actor_options"]["num_gpus"] == 1
    assert cfg.device == "cuda"
    assert ServeConfig(checkpoint="unused").device == "cpu"


def test_serve_replica_on_a_gpu_answers_like_the_cpu_engine(ray_session, tmp_path):
    import torch
    from ray import serve

    from gptcore.checkpoint import load_checkpoint, save_checkpoint
    from gptcore.config import preset
    from gptcore.engine import Engine
    from gptcore.model import GPT
    from gptcore.sampling import SamplingParams
    from gptcore.tokenizer import train_bpe

    tok = train_bpe([TEXT] * 20, vocab_size=320)
    torch.manual_seed(0)
    ckpt = Path(save_checkpoint(tmp_path / "ckpt", GPT(preset("debug", vocab_size=tok.vocab_size, block_size=128)),
                                tok, {"step": 0}))
    ck = load_checkpoint(ckpt, device="cpu")
    want = Engine(ck.model.eval(), ck.tokenizer, device="cpu").generate(
        [tok.encode("To be")], SamplingParams(max_new_tokens=8, temperature=0))[0].outputs[0].text

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        base = deploy("gpu", {"checkpoint": str(ckpt), "num_gpus": 1, "engine_process": False}, port)
        r = httpx.post(f"{base}/v1/completions", json={"model": "ckpt", "prompt": "To be", "max_tokens": 8,
                                                         "temperature": 0}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
        undeploy("gpu")
    finally:
        serve.shutdown()
