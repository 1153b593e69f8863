"""Reading prep output for training: refusals (no manifest, tokenizer / vocab / block mismatch) and the
deterministic, resumable, shardable sample order."""

from __future__ import annotations

import numpy as np
import pytest
from train_testlib import base_config, make_dataset

from gptcore.tokenizer import train_char
from pipelines.config import ConfigError
from pipelines.train.data import EvalSet, TrainStream, make_targets, open_dataset, read_split
from pipelines.train.trainer import validate

DOCS = ["first document about kings.", "second one, about queens!", "third: rome and its lords."] * 30


def test_refuses_dataset_without_manifest(tmp_path):
    d = make_dataset(tmp_path / "ds", DOCS, block_size=16, write_manifest_file=False)
    with pytest.raises(ConfigError) as e:
        open_dataset(str(d))
    assert "manifest.json" in str(e.value) and "unfinished" in str(e.value)
    with pytest.raises(ConfigError, match="manifest.json"):
        validate(base_config(d, tmp_path / "run"))


def test_refuses_block_and_vocab_mismatch(tmp_path):
    d = make_dataset(tmp_path / "ds", DOCS, block_size=16)
    validate(base_config(d, tmp_path / "run"))  # defaults: vocab and block size from the data
    with pytest.raises(ConfigError) as e:
        validate(base_config(d, tmp_path / "run", **{"model.block_size": 8}))
    assert "block_size" in str(e.value) and "16" in str(e.value) and "8" in str(e.value)
    with pytest.raises(ConfigError) as e:
        validate(base_config(d, tmp_path / "run", **{"model.vocab_size": 300}))
    assert "vocab_size" in str(e.value) and "300" in str(e.value)


def test_refuses_mismatched_tokenizer_id_of_init_checkpoint(tmp_path):
    from gptcore.checkpoint import save_checkpoint
    from gptcore.config import preset
    from gptcore.model import GPT

    d = make_dataset(tmp_path / "ds", DOCS, block_size=16)
    m = open_dataset(str(d)).manifest
    # same vocabulary size, different characters -> a different tokenizer (id)
    chars = sorted(set("".join(DOCS)))
    other = train_char(["".join(chr(ord(c) + 200) for c in chars)], special_tokens=("<|endoftext|>",))
    assert other.vocab_size == m["vocab_size"] and other.id != m["tokenizer_id"]
    ck = save_checkpoint(tmp_path / "ck", GPT(preset("debug", vocab_size=other.vocab_size, block_size=16)),
                         other, {})
    with pytest.raises(ConfigError) as e:
        validate(base_config(d, tmp_path / "run", init="raygpt", init_path=str(ck)))
    assert "tokenizer mismatch" in str(e.value) and m["tokenizer_id"][:16] in str(e.value)


def test_sft_kind_must_match(tmp_path):
    d = make_dataset(tmp_path / "ds", DOCS, block_size=16)
    with pytest.raises(ConfigError, match="sft=true needs a dataset of kind 'sft'"):
        validate(base_config(d, tmp_path / "run", sft=True))
    s = make_dataset(tmp_path / "sft", [("Q: hi? A:", " hello")] * 40, block_size=16, kind="sft")
    assert validate(base_config(s, tmp_path / "run2")).sft is True
    with pytest.raises(ConfigError, match="kind 'sft' but sft=false"):
        validate(base_config(s, tmp_path / "run2", sft=False))


def test_rows_roundtrip(tmp_path):
    d = make_dataset(tmp_path / "ds", DOCS, block_size=16)
    ds = open_dataset(str(d))
    rows = read_split(ds.manifest, "train")
    assert rows.input_ids.shape[1] == 17 and rows.doc_ids.shape == rows.input_ids.shape
    assert (rows.doc_ids[:, 0] == 0).all()  # document index within the window starts at 0
    assert len(rows) == ds.manifest["splits"]["train"]["rows"]


def _rows(n=50, t=9):
    from pipelines.train.data import SplitRows

    ids = np.arange(n * t).reshape(n, t) % 97
    return SplitRows(ids, np.zeros_like(ids, dtype=np.int32), None)


def test_order_deterministic_sharded_and_equal_to_single_worker_accumulation():
    rows = _rows()
    two = [TrainStream(rows, seed=3, micro_batch=4, grad_accum=1, world=2, rank=r) for r in range(2)]
    one = TrainStream(rows, seed=3, micro_batch=4, grad_accum=2, world=1, rank=0)
    for step in range(20):  # crosses several epochs (50 rows, 8 per step)
        a, b = two[0].indices(step, 0), two[1].indices(step, 0)
        if step * 8 // 50 == (step * 8 + 7) // 50:  # the step stays inside one epoch: ranks get disjoint rows
            assert not set(a) & set(b)
        assert (one.indices(step, 0) == a).all() and (one.indices(step, 1) == b).all()
    again = TrainStream(rows, seed=3, micro_batch=4, grad_accum=1, world=2, rank=0)
    assert all((again.indices(s, 0) == two[0].indices(s, 0)).all() for s in (17, 3, 0))  # random access
    other = TrainStream(rows, seed=4, micro_batch=4, grad_accum=1, world=2, rank=0)
    assert any((other.indices(s, 0) != two[0].indices(s, 0)).any() for s in range(3))
    # every row exactly once per epoch
    seen = np.concatenate([one.indices(s, m) for s in range(25) for m in range(2)])[:50]
    assert sorted(seen) == list(range(50))


def test_eval_set_is_fixed_and_split_over_ranks():
    rows = _rows(30)
    e0 = EvalSet(rows, seed=1, micro_batch=3, iters=4, world=2, rank=0)
    e1 = EvalSet(rows, seed=1, micro_batch=3, iters=4, world=2, rank=1)
    x0 = np.concatenate([b[0] for b in e0.batches])
    x1 = np.concatenate([b[0] for b in e1.batches])
    assert x0.shape == (12, 8) and not {tuple(r) for r in x0} & {tuple(r) for r in x1}


def test_targets_sft_and_doc_mask():
    ids = np.array([[1, 2, 3, 4, 5, 6]])
    mask = np.array([[0, 0, 1, 1, 0, 1]])
    docs = np.array([[0, 0, 0, 1, 1, 1]])
    x, y, d = make_targets(ids, docs, mask, doc_mask=False)
    assert x.tolist() == [[1, 2, 3, 4, 5]] and d is None
    assert y.tolist() == [[-1, 3, 4, -1, 6]]  # a target counts iff it is a completion token
    x, y, d = make_targets(ids, docs, None, doc_mask=True)
    assert y.tolist() == [[2, 3, -1, 5, 6]] and d.tolist() == [[0, 0, 0, 1, 1]]  # no loss across documents


def test_init_from_raygpt_and_hf_checkpoints(tmp_path):
    """init=raygpt / init=hf resolve the model shape from the checkpoint and start from its exact weights."""
    import torch

    from gptcore.checkpoint import export_hf, save_checkpoint
    from gptcore.config import preset
    from gptcore.model import GPT
    from gptcore.tokenizer import Tokenizer
    from pipelines.train.loop import build_model

    d = make_dataset(tmp_path / "ds", DOCS, block_size=16)
    tok = Tokenizer.load(d / "tokenizer.json")
    torch.manual_seed(123)
    src = GPT(preset("debug", vocab_size=tok.vocab_size, block_size=32, n_layer=1))
    ck = save_checkpoint(tmp_path / "ck", src, tok, {"step": 5})
    export_hf(ck, tmp_path / "hf")
    for init, path in (("raygpt", ck), ("hf", tmp_path / "hf")):
        cfg = base_config(d, tmp_path / f"run-{init}", init=init, init_path=str(path), **{"model.dropout": 0.1})
        plan = validate(cfg)
        assert plan.model_config.n_layer == 1 and plan.model_config.block_size == 32  # from the checkpoint
        assert plan.model_config.dropout == 0.1  # dropout may be overridden, the shape may not
        model = build_model(cfg, plan.model_config, plan.init_checkpoint)
        for (n, a), b in zip(src.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), n
    with pytest.raises(ConfigError, match="contradict the init checkpoint"):
        validate(base_config(d, tmp_path / "run-x", init="raygpt", init_path=str(ck), **{"model.n_layer": 2}))
    with pytest.raises(ConfigError, match="init_path="):
        validate(base_config(d, tmp_path / "run-y", init="raygpt", init_path=str(tmp_path / "nothing")))
