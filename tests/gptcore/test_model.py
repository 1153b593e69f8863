"""gptcore.model attention paths: the bf16-on-CPU paths (batched matmuls for short sequences, fp32 flash for
long ones) agree with fp32 scaled-dot-product attention, forward and backward, causal and document masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptcore.config import GPTConfig
from gptcore.model import GPT, CausalSelfAttention


def _qkv(B, nh, T, hs, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, nh, T, hs, generator=g) for _ in range(3)]


def _doc_mask(B, T):
    # two documents per row, split at a different point in each row; causal inside each
    doc = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        doc[b, (b + 1) * T // (B + 1):] = 1
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]  # (B, 1, T, T)


@pytest.mark.parametrize("T", [64, 300])  # 64: the batched-matmul path; 300 (> 256): fp32 flash
@pytest.mark.parametrize("masked", [False, True])
def test_bf16_cpu_attention_matches_fp32_forward_and_backward(T, masked):
    B, nh, hs = 3, 2, 16
    q, k, v = _qkv(B, nh, T, hs)
    mask = _doc_mask(B, T) if masked else None
    ref_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = (F.scaled_dot_product_attention(*ref_in, attn_mask=mask) if masked
           else F.scaled_dot_product_attention(*ref_in, is_causal=True))
    bf_in = [t.to(torch.bfloat16).requires_grad_(True) for t in (q, k, v)]
    out = CausalSelfAttention._attend(*bf_in, mask, 0.0)
    assert out.dtype == torch.bfloat16 and out.shape == (B, nh, T, hs)
    assert (out.float() - ref).abs().max().item() < 0.05  # bf16 inputs: ~3 significant digits
    g = torch.randn(B, nh, T, hs, generator=torch.Generator().manual_seed(1))
    ref.backward(g)
    out.float().backward(g)
    for a, b in zip(bf_in, ref_in):
        err = (a.grad.float() - b.grad).abs().max().item()
        assert err < 0.05 * max(1.0, b.grad.abs().max().item()), err


def test_bf16_attention_sees_no_future_token():
    # changing the last position's key/value must not move any earlier output
    q, k, v = [t.to(torch.bfloat16) for t in _qkv(2, 2, 16, 8)]
    a = CausalSelfAttention._attend(q, k, v, None, 0.0)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 5
    v2[:, :, -1] -= 5
    b = CausalSelfAttention._attend(q, k2, v2, None, 0.0)
    assert torch.equal(a[:, :, :-1], b[:, :, :-1])
    assert not torch.equal(a[:, :, -1], b[:, :, -1])


def test_bf16_attention_dropout_only_in_training():
    q, k, v = [t.to(torch.bfloat16) for t in _qkv(2, 2, 32, 8)]
    base = CausalSelfAttention._attend(q, k, v, None, 0.0)
    torch.manual_seed(0)
    d1 = CausalSelfAttention._attend(q, k, v, None, 0.5)
    torch.manual_seed(0)
    d2 = CausalSelfAttention._attend(q, k, v, None, 0.5)
    assert torch.equal(d1, d2) and not torch.equal(d1, base)


def test_model_loss_under_bf16_autocast_tracks_fp32():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0, bias=False))
    x = torch.randint(0, 65, (4, 64))
    y = torch.randint(0, 65, (4, 64))
    _, l32 = m(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, l16 = m(x, y)
    assert l16.dtype == torch.float32  # the loss is computed in fp32
    assert abs(l16.item() - l32.item()) < 0.02
