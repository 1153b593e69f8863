"""`optim.name: muon`: bit-equal to torch's Muon + AdamW, fp32 Newton-Schulz, refusals, a real run resumed.

pipelines/train/muon.py against torch.optim.Muon and torch.optim.AdamW, its Newton-Schulz iteration in
fp32, the config's refusals, and training through the real trainer (Ray Train's local mode + DeepSpeed
ZeRO-0), stopped at a checkpoint and resumed.

    .venv/bin/python -m pytest tests/pipelines/train/test_muon.py -q
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from train_testlib import base_config, reference_losses, train_losses

from gptcore.config import GPTConfig
from gptcore.model import GPT
from pipelines.config import ConfigError
from pipelines.train.deepspeed import set_lr
from pipelines.train.muon import MuonAdamW, muon_adamw_groups, newton_schulz


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11))


def _train(model, opts, steps: int, seed: int = 1) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randint(0, 11, (4, 8), generator=g)
        _, loss = model(x, x)  # predict the token itself: learnable in a few steps
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


@pytest.mark.parametrize("fused", [False, True])
def test_matches_torch_muon_and_adamw_to_the_bit(fused):
    """With Newton-Schulz in bf16 (what torch.optim.Muon always uses) the combined optimizer is exactly
    torch.optim.Muon on the block matrices plus torch.optim.AdamW on the rest."""
    ours, ref = _model(), _model()
    opt = MuonAdamW(muon_adamw_groups(ours, weight_decay=0.1, lr=1e-3, muon_lr=0.02), betas=(0.9, 0.95),
                    fused=fused, ns_dtype=torch.bfloat16)
    g = muon_adamw_groups(ref, weight_decay=0.1, lr=1e-3, muon_lr=0.02)
    assert [x["muon"] for x in g] == [True, False, False]
    torch_opts = [torch.optim.Muon(g[0]["params"], lr=0.02, weight_decay=0.1, momentum=0.95),
                  torch.optim.AdamW([{"params": x["params"], "weight_decay": x["weight_decay"]} for x in g[1:]],
                                    lr=1e-3, betas=(0.9, 0.95), fused=fused)]
    a, b = _train(ours, [opt], 5), _train(ref, torch_opts, 5)
    assert a == b and a[-1] < a[0]
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name


def test_groups_put_block_matrices_in_muon_and_the_rest_in_adamw():
    m = _model()
    groups = muon_adamw_groups(m, weight_decay=0.1, lr=1e-3, muon_lr=0.02, momentum=0.9, ns_steps=3)
    names = {id(p): n for n, p in m.named_parameters()}
    muon, decay, no_decay = ([names[id(p)] for p in g["params"]] for g in groups)
    assert muon == [f"transformer.h.{i}.{w}.weight" for i in range(2)
                    for w in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert decay == ["transformer.wte.weight", "transformer.wpe.weight"]  # the head is tied to wte: once
    assert no_decay and all(".bias" in n or "ln_" in n for n in no_decay)
    assert (groups[0]["lr"], groups[0]["momentum"], groups[0]["ns_steps"]) == (0.02, 0.9, 3)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.1, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
def test_newton_schulz_in_fp32_flattens_the_spectrum(shape):
    """Singular values spread over 5 decades come out in Muon's band (~0.7-1.2, not exactly 1: the quintic
    trades exactness for speed), and fp32 agrees with a float64 run of the same iteration."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], dtype=torch.float64))
    k = min(shape)
    s = torch.logspace(-3, 2, k, dtype=torch.float64)
    g = u[:, :k] @ torch.diag(s) @ v[:, :k].T
    out = newton_schulz(g.float(), 5, torch.float32)
    assert out.shape == shape and out.dtype == torch.float32
    sv = torch.linalg.svdvals(out.double())
    # the smallest input singular values (1e-3 of the largest) are still on their way up after 5 steps
    assert sv[: k // 2].min() > 0.6 and sv.max() < 1.25, sv
    assert torch.allclose(out.double(), newton_schulz(g, 5, torch.float64), atol=1e-4)


def test_a_stack_is_its_matrices_one_by_one():
    """The optimizer stacks same-shaped updates (tall ones transposed to wide) into one batched iteration."""
    torch.manual_seed(1)
    gs = torch.randn(3, 16, 40)
    one_by_one = torch.stack([newton_schulz(g, 5, torch.float32) for g in gs])
    assert torch.allclose(newton_schulz(gs, 5, torch.float32), one_by_one, atol=1e-6)
    assert torch.allclose(newton_schulz(gs.mT, 5, torch.float32), one_by_one.mT, atol=1e-6)


def test_state_dict_round_trip_continues_exactly():
    """What DeepSpeed's checkpoint stores (state_dict) restores both halves' state: momentum buffers, Adam
    moments and step counts."""
    a = _model()
    opt = MuonAdamW(muon_adamw_groups(a, weight_decay=0.1, lr=1e-3, muon_lr=0.02), fused=True)
    _train(a, [opt], 3)
    b = _model(seed=5)
    b.load_state_dict(a.state_dict())
    opt_b = MuonAdamW(muon_adamw_groups(b, weight_decay=0.1, lr=1e-3, muon_lr=0.02), fused=True)
    buf = io.BytesIO()  # through bytes, as a checkpoint: state_dict() holds references to the live tensors
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt_b.load_state_dict(torch.load(buf))
    st = opt_b.state_dict()["state"]
    assert {"momentum_buffer"} <= set(st[0]) and {"exp_avg", "exp_avg_sq", "step"} <= set(st[len(st) - 1])
    assert _train(a, [opt], 3, seed=2) == _train(b, [opt_b], 3, seed=2)


def test_a_vector_in_a_muon_group_is_refused():
    m = _model()
    with pytest.raises(ValueError, match=r"2-D weight matrices only, got shapes \[\(16,\)\].*AdamW group"):
        MuonAdamW([{"params": [m.transformer.ln_f.weight], "muon": True}])


def test_set_lr_scales_the_muon_groups(tmp_path):
    cfg = base_config(tmp_path, tmp_path / "r", **{"optim.name": "muon", "optim.lr": 1e-3, "optim.muon_lr": 0.02})
    opt = MuonAdamW(muon_adamw_groups(_model(), weight_decay=0.1, lr=1e-3, muon_lr=0.02))
    set_lr(opt, 5e-4, cfg)  # half way down the schedule: both halves at half their peak
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 5e-4, 5e-4])


@pytest.mark.parametrize("over, words", [
    ({"zero_stage": 2}, r"optim.name=muon needs zero_stage=0, got zero_stage=2: ZeRO hands the optimizer flat "
                        r"partitions.*set zero_stage=0 or optim.name=adamw"),
    ({"use_gpu": True, "precision": "bf16"}, r"optim.name=muon with use_gpu=true needs precision=fp32, got "
                                             r"precision=bf16.*set precision=fp32 or optim.name=adamw"),
    ({"optim.muon_ns_steps": 0}, r"optim.muon_ns_steps must be in \[1, 20\].*got 0"),
    ({"optim.muon_lr": -1}, r"optim.muon_lr must be > 0, got -1"),
    ({"optim.muon_momentum": 1.0}, r"optim.muon_momentum must be in \[0, 1\), got 1.0"),
])
def test_config_refuses_what_muon_cannot_run(tmp_path, over, words):
    with pytest.raises(ConfigError, match=words):
        base_config(tmp_path, tmp_path / "r", **{"optim.name": "muon", **over})


def test_unknown_optimizer_name_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.name"):
        base_config(tmp_path, tmp_path / "r", **{"optim.name": "sgd"})


@pytest.mark.slow
def test_trainer_runs_muon_like_a_plain_loop_and_resumes_exactly(ray_session, char_data, tmp_path):
    """Through Ray Train's local mode and DeepSpeed ZeRO-0: the losses are the plain-PyTorch loop's with the
    same optimizer and schedule, and a run stopped at its step-4 checkpoint and resumed to step 8 repeats
    the uninterrupted run's steps 5-8."""
    from pipelines.config import from_dict
    from pipelines.train.config import TrainConfig
    from pipelines.train.trainer import run

    kw = {"num_workers": 1, "zero_stage": 0, "launcher": "local", "max_steps": 8, "ckpt_interval": 4,
          "optim.decay_steps": 16, "optim.name": "muon", "optim.muon_lr": 0.05, "batch.grad_accum": 2}
    full = base_config(char_data, tmp_path / "full", **kw)
    run(full)
    want = train_losses(tmp_path / "full")
    ref = reference_losses(base_config(char_data, tmp_path / "plain", **kw), 8)
    assert want[8] < want[1] - 0.3, want
    assert max(abs(want[s] - ref[s]) for s in range(1, 9)) < 1e-5, (want, ref)

    rd = tmp_path / "stopped"
    run(base_config(char_data, rd, **{**kw, "max_steps": 4}))
    saved = json.loads((rd / "config.json").read_text())["config"]
    res = run(from_dict(TrainConfig, {**saved, "max_steps": 8, "run_dir": str(rd)}), resume=rd)
    assert res.steps == 8
    got = train_losses(rd)
    assert sorted(got) == list(range(1, 9))
    assert all(abs(got[s] - want[s]) <= 1e-6 for s in range(1, 9)), (got, want)


@pytest.mark.slow
def test_two_workers_data_parallel_match_one_process(ray_session, char_data, tmp_path):
    """2 Ray Train workers, ZeRO-0: DeepSpeed averages the gradients, then each rank takes the same Muon step;
    the losses are one process's over the same global batch (up to the all-reduce's summation order)."""
    from pipelines.train.trainer import run

    kw = {"num_workers": 2, "zero_stage": 0, "launcher": "ray", "max_steps": 8, "ckpt_interval": 0,
          "eval_interval": 0, "optim.decay_steps": 16, "optim.name": "muon", "optim.muon_lr": 0.05}
    res = run(base_config(char_data, tmp_path / "dp", **kw))
    assert res.extra["launcher"] == "ray" and res.steps == 8
    got = train_losses(tmp_path / "dp")
    ref = reference_losses(base_config(char_data, tmp_path / "plain", **kw), 8)
    assert got[8] < got[1] - 0.3, got
    assert max(abs(got[s] - ref[s]) for s in range(1, 9)) < 1e-5, (got, ref)
