"""Helpers for the training tests: small token datasets in the `raygpt prep` output format.

`make_dataset` writes the format directly (pyarrow + write_manifest) so these tests do not depend on
the prep pipeline; test_real_prep.py trains once on a real `pipelines.data.run` output as well.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gptcore.tokenizer import train_char
from pipelines.data.manifest import sha256_file, write_manifest

EOT = "<|endoftext|>"


def _list_col(a: np.ndarray, typ) -> pa.ListArray:
    n, w = a.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * w + 1, w, dtype=np.int32)),
                                    pa.array(a.reshape(-1), type=typ))


def _windows(ids: np.ndarray, docs: np.ndarray, mask: np.ndarray | None, block_size: int):
    """Cut a token stream into rows of block_size+1 with stride block_size (as raygpt prep does)."""
    n = (len(ids) - 1) // block_size
    rows = [slice(i * block_size, i * block_size + block_size + 1) for i in range(n)]
    I = np.stack([ids[s] for s in rows]).astype(np.int32)
    D = np.stack([docs[s] for s in rows]).astype(np.int32)
    D = D - D[:, :1]  # document index within the window, from 0
    M = np.stack([mask[s] for s in rows]).astype(np.int8) if mask is not None else None
    return I, D, M


def make_dataset(out: Path, docs: list[str] | list[tuple[str, str]], *, block_size: int = 32,
                 kind: str = "pretrain", val_fraction: float = 0.1, tokenizer=None, write_manifest_file=True,
                 manifest_overrides: dict | None = None) -> Path:
    """docs: texts (pretrain) or (prompt, completion) pairs (sft). The last val_fraction of the token
    stream (by position) is val, like nanoGPT's split."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = [d if isinstance(d, str) else d[0] + d[1] for d in docs]
    tok = tokenizer or train_char(texts, special_tokens=(EOT,))
    eos = tok.eos_id
    ids, did, mask = [], [], []
    for i, d in enumerate(docs):
        if kind == "sft":
            p, c = tok.encode(d[0]), tok.encode(d[1]) + [eos]
            ids += p + c
            mask += [0] * len(p) + [1] * len(c)
            did += [i] * (len(p) + len(c))
        else:
            t = tok.encode(d) + [eos]
            ids += t
            did += [i] * len(t)
    ids, did = np.array(ids), np.array(did)
    m = np.array(mask) if kind == "sft" else None
    cut = int(len(ids) * (1 - val_fraction))
    splits = {}
    for split, sl in (("train", slice(0, cut)), ("val", slice(cut, None))):
        I, D, M = _windows(ids[sl], did[sl], None if m is None else m[sl], block_size)
        cols = {"input_ids": _list_col(I, pa.int32()), "doc_ids": _list_col(D, pa.int32())}
        if M is not None:
            cols["loss_mask"] = _list_col(M, pa.int8())
        (out / split).mkdir(exist_ok=True)
        path = out / split / "part-00000.parquet"
        pq.write_table(pa.table(cols), path)
        splits[split] = {"rows": int(len(I)), "tokens": int(I.size),
                         "shards": [{"path": f"{split}/part-00000.parquet", "rows": int(len(I)),
                                     "bytes": path.stat().st_size, "sha256": sha256_file(path)}]}
    tok.save(out / "tokenizer.json")
    manifest = {"kind": kind, "tokenizer_id": tok.id, "vocab_size": tok.vocab_size, "eos_id": eos,
                "block_size": block_size, "splits": splits, "ledger": [], "config": {"test": True},
                "code_version": "test", "created_at": "2026-01-01T00:00:00Z", **(manifest_overrides or {})}
    if write_manifest_file:
        write_manifest(out, manifest)
    return out


def shakespeare_text(shared: Path | None, n_chars: int = 120_000) -> str:
    p = shared / "tinyshakespeare" / "input.txt" if shared else None
    if p is not None and p.is_file():
        return p.read_text(encoding="utf-8")[:n_chars]
    # synthetic fallback: a small repetitive grammar (still learnable, so losses drop)
    rng = random.Random(0)
    words = "the king and queen of rome shall speak to my lord with good heart and true".split()
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(n_chars // 40))


def base_config(data: Path, run_dir: Path, **kw) -> TrainConfig:  # noqa: F821
    """A debug-preset TrainConfig for fast tests (overrides as dotted keys: base_config(d, r, **{"optim.lr": 1e-2}))."""
    from pipelines.config import load_config
    from pipelines.train.config import TrainConfig

    base = {"data": str(data), "run_dir": str(run_dir), "name": run_dir.name,
            "model": {"preset": "debug"}, "max_steps": 8, "eval_interval": 4, "eval_iters": 2,
            "ckpt_interval": 4, "seed": 7, "batch": {"micro_batch_size": 4},
            "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "fused": False},
            "log": {"progress": False, "tensorboard": True, "peak_flops": 1e11, "plot": True}}
    return load_config(TrainConfig, None, [f"{k}={json.dumps(v)}" for k, v in kw.items()], base=base)


def train_losses(run_dir: Path) -> dict[int, float]:
    from pipelines.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


def reference_losses(cfg, steps: int) -> dict[int, float]:
    """The same training math in one process with plain PyTorch (no Ray, no DeepSpeed): seeded init,
    AdamW with the same param groups, warmup+cosine LR, the global batch as grad_accum micro batches of
    the same rows, clipping. What ZeRO runs with N workers must reproduce (up to fp32 summation order)."""
    import torch

    from pipelines.train.data import TrainStream, open_dataset
    from pipelines.train.deepspeed import lr_at, param_groups
    from pipelines.train.loop import build_model, lm_loss

    ds = open_dataset(cfg.data)
    model_cfg = cfg.model_config(vocab_size=int(ds.manifest["vocab_size"]), block_size=ds.block_size)
    model = build_model(cfg, model_cfg, None)
    o = cfg.optim
    if o.name == "muon":  # the trainer's optimizer class (its parity with torch.optim.Muon: test_muon.py)
        from pipelines.train.muon import MuonAdamW, muon_adamw_groups

        opt = MuonAdamW(muon_adamw_groups(model, weight_decay=o.weight_decay, lr=o.lr, muon_lr=o.muon_lr,
                                          momentum=o.muon_momentum, ns_steps=o.muon_ns_steps),
                        betas=(o.beta1, o.beta2), eps=o.eps)
    else:
        opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    accum = cfg.grad_accum * cfg.num_workers  # all ranks' micro batches, in one process
    stream = TrainStream(ds.split_rows("train"), seed=cfg.seed, micro_batch=cfg.batch.micro_batch_size,
                         grad_accum=accum, world=1, rank=0)
    out = {}
    for step in range(steps):
        for g in opt.param_groups:  # Muon's groups: the same schedule, scaled to muon_lr (written out here)
            g["lr"] = lr_at(cfg, step) * (o.muon_lr / o.lr if g.get("muon") else 1.0)
        tot = 0.0
        for m in range(accum):
            x, y, _ = stream.micro_batch(step, m)
            logits, _ = model(torch.from_numpy(x))
            loss = lm_loss(logits, torch.from_numpy(y))
            (loss / accum).backward()
            tot += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out[step + 1] = tot / accum
    return out
