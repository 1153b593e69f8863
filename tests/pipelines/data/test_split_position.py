"""pack.split_by=position: one long document split 90/10 by position (nanoGPT's split), and the README's
shakespeare-char prep/train config pair.

    .venv/bin/python -m pytest tests/pipelines/data/test_split_position.py -q
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from gptcore.tokenizer import Tokenizer
from pipelines.config import ConfigError, load_config
from pipelines.data import PrepConfig, run
from pipelines.data.manifest import shard_paths

REPO = Path(__file__).resolve().parents[3]


def _stream(paths: list[str]) -> list[int]:
    """The token stream of stride-T windows: the first row whole, then each next row without its first token."""
    out: list[int] = []
    for p in paths:
        for row in pq.read_table(p).column("input_ids").to_pylist():
            out.extend(row if not out else row[1:])
    return out


@pytest.mark.slow
def test_one_document_split_by_position(tmp_path, shared_data, ray_session):
    text = (shared_data / "tinyshakespeare/input.txt").read_text()[:20000]
    (tmp_path / "one.txt").write_text(text)
    cfg = load_config(PrepConfig, None, [
        f"output={tmp_path / 'out'}", f"inputs=[{{path: {tmp_path / 'one.txt'}}}]", "progress=false",
        "tokenizer.kind=char", "tokenizer.special_tokens=[]", "pack.block_size=16", "pack.val_fraction=0.1",
        "pack.split_by=position", "write.data_card=false"])
    m = run(cfg)
    cut = int(len(text) * 0.9)
    tr, va = m["splits"]["train"], m["splits"]["val"]
    assert va["rows"] > 0 and tr["rows"] > 0
    assert (tr["docs"], va["docs"]) == (1, 1)
    # every character is a token and lands in exactly one split: train = the first 90%, val = the rest
    assert (tr["tokens"], va["tokens"]) == (cut, len(text) - cut)
    assert 0.08 < va["rows"] / (tr["rows"] + va["rows"]) < 0.12
    tok = Tokenizer.load(Path(m["root"]) / "tokenizer.json")
    train_text = tok.decode(_stream(shard_paths(m, "train")))
    val_text = tok.decode(_stream(shard_paths(m, "val")))
    assert text[:cut].startswith(train_text) and cut - len(train_text) < 16  # only the tail shorter than a row
    assert text[cut:].startswith(val_text) and len(text) - cut - len(val_text) < 16
    assert m["config"]["pack"]["split_by"] == "position"


def test_position_split_refused_for_sft(tmp_path):
    with pytest.raises(ConfigError, match="pack.split_by"):
        load_config(PrepConfig, base={"output": str(tmp_path / "o"), "kind": "sft", "pack": {"split_by": "position"},
                                      "inputs": [{"path": "x.jsonl", "fields": ["article", "summary"]}]})


def test_default_split_keeps_the_config_hash_of_older_datasets():
    from pipelines.data.config import content_config

    cfg = load_config(PrepConfig, base={"output": "o", "inputs": [{"path": "x.txt"}]})
    assert "split_by" not in content_config(cfg)["pack"]


def test_readme_shakespeare_char_pair_is_consistent():
    """`raygpt prep --config prep-shakespeare-char.yaml` writes what the train configs read (nanoGPT's recipe)."""
    prep = yaml.safe_load((REPO / "jobs/configs/prep-shakespeare-char.yaml").read_text())
    assert prep["pack"] == {"block_size": 64, "val_fraction": 0.1, "split_by": "position"}
    assert prep["tokenizer"] == {"kind": "char", "special_tokens": []}  # nanoGPT's 65-character vocabulary
    for name in ("train-shakespeare-char.yaml", "train-shakespeare-char-fast.yaml"):
        train = yaml.safe_load((REPO / "jobs/configs" / name).read_text())
        assert train["data"] == prep["output"], name
