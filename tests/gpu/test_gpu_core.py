"""NCCL, bf16 and the gptcore engine on CUDA (the GPU lane: `pytest -m gpu tests/gpu`; skips without CUDA)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

from gpu_testlib import cuda_count

NCCL_WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    x = torch.full((1024,), float(rank + 1), device="cuda")
    dist.all_reduce(x)
    want = world * (world + 1) / 2
    assert torch.all(x == want).item(), (x[:4].tolist(), want)
    dist.destroy_process_group()
    print("ok", rank)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nccl_all_reduce():
    import torch.distributed as dist

    assert dist.is_nccl_available(), "this torch build has no NCCL"
    world = 2 if cuda_count() >= 2 else 1
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", NCCL_WORKER, str(r), str(world)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all(f"ok {r}" in o for r, o in enumerate(outs))


def _tiny_model(seed: int = 0):
    import torch

    from gptcore.config import preset
    from gptcore.model import GPT

    torch.manual_seed(seed)
    return GPT(preset("debug"))


def test_bf16_forward_backward():
    import torch

    model = _tiny_model().cuda()
    x = torch.randint(0, model.config.vocab_size, (4, 32), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, x)
    loss = out[1] if isinstance(out, tuple) else out.loss
    assert loss.dtype in (torch.float32, torch.bfloat16) and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_engine_greedy_on_cuda_equals_cpu_fp32():
    import torch

    from gptcore.engine import Engine
    from gptcore.sampling import SamplingParams

    prompts = [[1, 2, 3, 4], [10, 20, 30], [5]]
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    cpu = Engine(_tiny_model().eval(), device="cpu", dtype=torch.float32).generate(prompts, params)
    gpu = Engine(_tiny_model().eval(), device="cuda", dtype=torch.float32).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in gpu] == [o.outputs[0].token_ids for o in cpu]


def test_engine_bf16_on_cuda_runs():
    import torch

    from gptcore.engine import Engine
    from gptcore.sampling import SamplingParams

    out = Engine(_tiny_model().eval(), device="cuda", dtype=torch.bfloat16).generate([[1, 2, 3]],
                                                                                    SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8


def test_muon_on_cuda_runs_newton_schulz_in_bf16_and_tracks_torch_muon():
    """optim.name=muon on a GPU: Newton-Schulz in bf16 (native there), close to torch.optim.Muon + AdamW (batched
    cuBLAS products may round differently from one-by-one ones, hence a tolerance rather than bit equality)."""
    import torch

    from pipelines.train.muon import MuonAdamW, muon_adamw_groups, native_bf16

    assert native_bf16(torch.device("cuda")) == torch.cuda.is_bf16_supported()
    ours, ref = _tiny_model().cuda(), _tiny_model().cuda()
    opt = MuonAdamW(muon_adamw_groups(ours, weight_decay=0.1, lr=1e-3, muon_lr=0.02), fused=True)
    g = muon_adamw_groups(ref, weight_decay=0.1, lr=1e-3, muon_lr=0.02)
    torch_opts = [torch.optim.Muon(g[0]["params"], lr=0.02, weight_decay=0.1),
                  torch.optim.AdamW([{"params": x["params"], "weight_decay": x["weight_decay"]} for x in g[1:]],
                                    lr=1e-3, betas=(0.9, 0.95), fused=True)]
    x = torch.randint(0, ours.config.vocab_size, (4, 32), device="cuda")
    for model, opts in ((ours, [opt]), (ref, torch_opts)):
        for _ in range(5):
            model(x, x)[1].backward()
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=2e-3), (name, (p - q).abs().max().item())
