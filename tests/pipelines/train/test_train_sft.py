"""SFT: prompt tokens contribute exactly zero loss and exactly zero gradient; only completions train."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from train_testlib import make_dataset

from gptcore.config import preset
from gptcore.model import GPT
from pipelines.train.data import TrainStream, open_dataset
from pipelines.train.loop import lm_loss

PAIRS = [("Article: the king rode to rome.\nTL;DR: ", "king to rome"),
         ("Article: a queen spoke with her lords at dawn.\nTL;DR: ", "queen speaks"),
         ("Article: nothing happened in the city today.\nTL;DR: ", "quiet day")] * 20


def _batch(tmp_path):
    d = make_dataset(tmp_path / "sft", PAIRS, block_size=24, kind="sft")
    ds = open_dataset(str(d))
    stream = TrainStream(ds.split_rows("train"), seed=0, micro_batch=8, grad_accum=1, world=1, rank=0)
    x, y, _ = stream.micro_batch(0, 0)
    rows = ds.split_rows("train")
    return x, y, rows, ds


def test_prompt_positions_get_zero_loss_and_zero_gradient(tmp_path):
    x, y, rows, _ = _batch(tmp_path)
    prompt = y == -1
    assert prompt.any() and (~prompt).any()
    torch.manual_seed(0)
    model = GPT(preset("debug", vocab_size=int(max(x.max(), y.max())) + 1, block_size=24))
    logits, _ = model(torch.from_numpy(x))
    logits.retain_grad()
    loss = lm_loss(logits, torch.from_numpy(y))
    loss.backward()
    # the loss is the mean over completion targets only
    comp = torch.from_numpy(~prompt)
    ref = F.cross_entropy(logits[comp].float(), torch.from_numpy(y)[comp])
    assert torch.allclose(loss, ref, atol=0, rtol=1e-6)
    # exactly zero gradient flows from prompt positions, non-zero from completion positions
    g = logits.grad
    assert torch.count_nonzero(g[torch.from_numpy(prompt)]) == 0
    assert g[comp].abs().sum(-1).min() > 0
    # changing what a prompt position "should" predict changes nothing
    y2 = y.copy()
    y2[prompt] = 0
    logits2, _ = model(torch.from_numpy(x))
    assert lm_loss(logits2, torch.from_numpy(np.where(prompt, -1, y2))).item() == loss.item()


def test_prompt_only_batch_is_exactly_zero_loss_and_gradient(tmp_path):
    x, y, _, _ = _batch(tmp_path)
    torch.manual_seed(0)
    model = GPT(preset("debug", vocab_size=int(max(x.max(), y.max())) + 1, block_size=24))
    all_prompt = np.full_like(y, -1)
    logits, _ = model(torch.from_numpy(x))
    loss = lm_loss(logits, torch.from_numpy(all_prompt))
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_loss_mask_comes_from_the_dataset(tmp_path):
    _, y, rows, ds = _batch(tmp_path)
    assert ds.kind == "sft" and rows.loss_mask is not None
    # completion tokens (mask 1) are exactly the counted targets
    stream = TrainStream(rows, seed=0, micro_batch=8, grad_accum=1, world=1, rank=0)
    ix = stream.indices(0, 0)
    assert ((y != -1) == (rows.loss_mask[ix, 1:] == 1)).all()
