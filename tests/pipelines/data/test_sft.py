"""SFT datasets: JSONL pairs rendered through templates, loss_mask 0 on prompt / 1 on completion (incl. EOS),
pad mode (one example per row) and pack mode, truncation keeps the template tail.

    .venv/bin/python -m pytest tests/pipelines/data/test_sft.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from gptcore.tokenizer import Tokenizer
from pipelines.config import load_config
from pipelines.data import PrepConfig, run
from pipelines.data.manifest import shard_paths

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pairs_file(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    recs = [json.loads(l) for l in (shared_data / "cnndm-frank/cnndm_test_frank.jsonl").open()][:40]
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d, recs


def _cfg(d, mode, out):
    y = d / f"{out}.yaml"
    y.write_text(f"""
output: {d / out}
kind: sft
progress: false
inputs: [{{path: {d / 'pairs.jsonl'}, fields: [article, summary]}}]
tokenizer: {{kind: bpe, vocab_size: 1000}}
sft: {{prompt_template: "{{article}}\\n\\nTL;DR: ", completion_template: "{{summary}}<|endoftext|>", mode: {mode}}}
pack: {{block_size: 256, val_fraction: 0.0}}
""")
    return load_config(PrepConfig, y)


def test_sft_pad_rows_and_loss_mask(pairs_file, ray_session):
    d, recs = pairs_file
    m = run(_cfg(d, "pad", "pad"))
    tok = Tokenizer.load(d / "pad/tokenizer.json")
    assert m["kind"] == "sft" and m["sft"]["mode"] == "pad" and m["columns"][-1] == "loss_mask"
    t = pq.read_table(shard_paths(m, "train")[0])
    assert t.num_rows == m["splits"]["train"]["rows"] == 40 - sum(m["ledger"][-1]["drops"].values())
    by_summary = {r["summary"]: r for r in recs}
    truncated = 0
    for row in t.to_pylist():
        ids, mask, doc = map(np.asarray, (row["input_ids"], row["loss_mask"], row["doc_ids"]))
        assert ids.size == mask.size == doc.size == 257 and set(np.unique(mask)) <= {0, 1}
        ones = np.flatnonzero(mask)
        first, last = ones[0], ones[-1]
        assert (mask[first:last + 1] == 1).all()  # prompt (0) | completion (1) | padding (0)
        assert ids[last] == tok.eos_id
        assert (ids[last + 1:] == tok.eos_id).all() and (doc[last + 1:] == 1).all() and (doc[:last + 1] == 0).all()
        completion = tok.decode(ids[first:last + 1].tolist())
        summary = completion.removesuffix("<|endoftext|>")
        assert summary in by_summary and completion.endswith("<|endoftext|>")
        prompt = tok.decode(ids[:first].tolist())
        assert prompt.endswith("\n\nTL;DR: ")
        article = by_summary[summary]["article"]
        assert prompt.startswith(article[:40])
        truncated += prompt != article + "\n\nTL;DR: "
    assert truncated > 0  # long CNN articles were cut in the middle, the template tail kept
    assert m["splits"]["train"]["loss_tokens"] == int(np.asarray(t.column("loss_mask").to_pylist()).sum())


def test_sft_pack_mode(pairs_file, ray_session):
    d, recs = pairs_file
    m = run(_cfg(d, "pack", "pack"))
    t = pq.read_table(shard_paths(m, "train")[0])
    ids = np.asarray(t.column("input_ids").to_pylist())
    mask = np.asarray(t.column("loss_mask").to_pylist())
    doc = np.asarray(t.column("doc_ids").to_pylist())
    tok = Tokenizer.load(d / "pack/tokenizer.json")
    assert ids.shape[1] == 257 and (doc[:, 0] == 0).all()
    # every EOS is a completion token; several examples share a row; masked tokens are summary text
    assert (mask[ids == tok.eos_id] == 1).all()
    assert (doc.max(axis=1) >= 1).any()
    assert 0 < mask.mean() < 0.5
