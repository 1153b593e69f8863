"""Muon for the hidden matrices, AdamW for everything else, as one torch optimizer (`optim.name: muon`).

    opt = MuonAdamW(muon_adamw_groups(model, weight_decay=0.1, muon_lr=0.02, lr=6e-4), betas=(0.9, 0.95))

Muon (Keller Jordan, 2024; torch.optim.Muon since torch 2.9) keeps SGD momentum per weight matrix and
steps along that momentum's nearest semi-orthogonal matrix, found by a few Newton-Schulz iterations. On
small GPTs it reaches a given loss in far fewer tokens than AdamW (the char-level Shakespeare recipe:
1.88 after 320 instead of 540 steps of batch 24, measured in BENCHMARKS.md "Training"). It is only for
the 2-D weights inside the blocks: embeddings, biases and LayerNorm gains keep AdamW.

Why not torch.optim.Muon as it is: its Newton-Schulz runs in bf16, which a CPU without AVX512-BF16 / AMX
emulates ~40x slower than fp32 (a 2 x 192 model's 8 matrices: 1.5 s a step in bf16, 37 ms in fp32, on the
AMD EPYC host; the whole step is ~145 ms). This class runs the same update with the iteration in bf16 where the device runs bf16 natively and
faster than fp32 (measured on a CPU), and in fp32 elsewhere; with `ns_dtype=torch.bfloat16` it matches torch.optim.Muon's step to the bit
(tests/pipelines/train/test_muon.py). The AdamW half calls torch's own functional AdamW (fused on request).
Why one optimizer and not two: DeepSpeed takes one client optimizer, and its checkpoint saves that one's
state_dict. Does not: work under ZeRO >= 1 or DeepSpeed's bf16 / fp16 optimizers (they hand the optimizer
flat partitions, and Muon needs whole matrices; TrainConfig refuses those combinations).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.adam import adam as _functional_adam

from pipelines.train.bf16 import BF16_MIN_SPEEDUP, cpu_bf16_speedup

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # the quintic of Muon's reference implementation (and torch's)


def newton_schulz(g: torch.Tensor, steps: int, dtype: torch.dtype, eps: float = 1e-7) -> torch.Tensor:
    """~U V^T of g = U S V^T: singular values pushed into roughly [0.7, 1.2], in `dtype`. (..., rows, cols) ->
    same; a stack (n, rows, cols) is n independent matrices in one batched product per iteration."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix x @ x.T is then the small one
        x = x.mT
    # spectral norm <= Frobenius norm <= 1: inside NS's convergence region
    x = x.div(torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps))
    mm = torch.addmm if x.dim() == 2 else torch.baddbmm
    for _ in range(steps):
        gram = x @ x.mT  # (..., r, r)
        x = mm(x, mm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively and faster than fp32 here (then Newton-Schulz runs in bf16, as Muon's
    authors do). On a CPU this is measured (pipelines/train/bf16.py): a flag for
    AVX512-BF16 does not promise that oneDNN's bf16 is the faster one."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return cpu_bf16_speedup(torch.get_num_threads()) >= BF16_MIN_SPEEDUP


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """Muon takes the blocks' 2-D weights (attention and MLP projections); not wte / wpe / the tied head."""
    return p.dim() == 2 and ".h." in f".{name}"


def muon_adamw_groups(model: torch.nn.Module, *, weight_decay: float, lr: float, muon_lr: float,
                      momentum: float = 0.95, ns_steps: int = 5) -> list[dict[str, Any]]:
    """Three groups: Muon (block matrices), AdamW with decay (embeddings), AdamW without (biases, norms)."""
    muon, decay, no_decay, seen = [], [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # the tied wte/lm_head weight appears once
            continue
        seen.add(id(p))
        if is_muon_param(name, p):
            muon.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": muon, "muon": True, "lr": muon_lr, "weight_decay": weight_decay, "momentum": momentum,
               "ns_steps": ns_steps},
              {"params": decay, "muon": False, "lr": lr, "weight_decay": weight_decay},
              {"params": no_decay, "muon": False, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class MuonAdamW(torch.optim.Optimizer):
    """Groups with `muon: True` step with Muon (momentum, nesterov, Newton-Schulz, decoupled weight decay,
    lr scaled by sqrt(max(1, rows / cols)) as torch's default); the others with AdamW."""

    def __init__(self, groups: list[dict[str, Any]], *, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, fused: bool = False, ns_dtype: torch.dtype | None = None) -> None:
        for g in groups:
            if g.get("muon") and any(p.dim() != 2 for p in g["params"]):
                shapes = [tuple(p.shape) for p in g["params"] if p.dim() != 2]
                raise ValueError(f"Muon groups take 2-D weight matrices only, got shapes {shapes}; put 1-D "
                                 f"parameters (biases, norms) in an AdamW group (muon: False)")
        defaults = dict(lr=1e-3, weight_decay=0.0, muon=False, momentum=0.95, nesterov=True, ns_steps=5,
                        betas=betas, eps=eps)
        super().__init__(groups, defaults)
        self.fused = fused
        self.ns_dtype = ns_dtype  # None: bf16 where native_bf16(the parameters' device), else fp32

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if params:
                (self._muon_step if g["muon"] else self._adamw_step)(g, params)
        return loss

    def _muon_step(self, g: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, mom = g["lr"], g["momentum"]
        # momentum + nesterov per matrix; then Newton-Schulz on stacks of same-shaped updates (in the wide
        # orientation: c_fc's (4C, C) joins c_proj's (C, 4C)), one batched product per iteration and stack
        # instead of one per matrix: a 2 x 128 model's 8 small products a step cost less than half as batched
        stacks: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, bool]]] = {}
        for p in params:
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p)
            buf = st["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mom)
            update = p.grad.lerp(buf, mom) if g["nesterov"] else buf
            tall = p.size(0) > p.size(1)
            wide = update.mT if tall else update
            dtype = self.ns_dtype or (torch.bfloat16 if native_bf16(p.device) else torch.float32)
            stacks.setdefault((tuple(wide.shape), p.device, dtype), []).append((p, wide, tall))
        for (_, _, dtype), items in stacks.items():
            if len(items) == 1:
                outs = [newton_schulz(items[0][1], g["ns_steps"], dtype)]
            else:
                outs = list(newton_schulz(torch.stack([w for _, w, _ in items]), g["ns_steps"], dtype).unbind(0))
            for (p, _, tall), o in zip(items, outs):
                p.mul_(1 - lr * g["weight_decay"])
                # shape scaling as torch's default (adjust_lr_fn="original"): tall matrices step further
                p.add_(o.mT if tall else o, alpha=-lr * math.sqrt(max(1.0, p.size(0) / p.size(1))))

    def _adamw_step(self, g: dict[str, Any], params: list[torch.Tensor]) -> None:
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            st = self.state[p]
            if "step" not in st:
                st["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device if self.fused else "cpu")
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
        beta1, beta2 = g["betas"]
        _functional_adam(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps,
                         fused=self.fused or None, decoupled_weight_decay=True, amsgrad=False, beta1=beta1,
                         beta2=beta2, lr=g["lr"], weight_decay=g["weight_decay"], eps=g["eps"], maximize=False)
