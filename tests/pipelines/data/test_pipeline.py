"""The prep pipeline end to end on real corpora (../shared/data): ledger, dedup, decontamination, bad
input, shards, manifest, data card, reuse / overwrite determinism, CLI errors.

    .venv/bin/python -m pytest tests/pipelines/data/test_pipeline.py -q
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.config import load_config
from pipelines.data import PrepConfig, PrepError, run
from pipelines.data.manifest import DatasetNotReadyError, load_manifest, shard_paths

pytestmark = pytest.mark.slow


def _edit_words(text: str, frac: float, seed: int) -> str:
    rng = random.Random(seed)
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(len(words) * frac))):
        words[i] = rng.choice(["river", "lantern", "copper", "meadow", "signal", "harbor"])
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data):
    """~0.6 MB of real English + an exact copy, a near copy, an eval-contaminated doc and bad files."""
    d = tmp_path_factory.mktemp("corpus")
    addresses = [json.loads(l) for l in (shared_data / "us-presidential-addresses/addresses.jsonl").open()][:40]
    recs = [{"text": a["text"], "id": a["id"]} for a in addresses]
    recs.append({"text": addresses[3]["text"], "id": "exact-copy"})
    recs.append({"text": _edit_words(addresses[5]["text"], 0.02, 1), "id": "near-copy"})
    (d / "addresses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + "this line is not json\n")
    wiki = (shared_data / "wikitext-2/wiki.valid.tokens.txt").read_text().splitlines()[:1500]
    (d / "wiki.txt").write_text("\n".join(wiki) + "\n")
    shutil.copy(shared_data / "gutenberg/pg972_the_devils_dictionary.txt", d / "book.txt")
    (d / "bad").mkdir()
    (d / "bad/binary.txt").write_bytes(b"\x00\x01\x02garbage" * 50)
    (d / "bad/empty.txt").write_bytes(b"")
    (d / "bad/latin1.txt").write_bytes("na\xefve caf\xe9".encode("latin-1"))
    (d / "bad/broken.parquet").write_bytes(b"PAR1 garbage")
    # eval set: one address is also an "eval" document -> must be decontaminated
    (d / "eval.jsonl").write_text(json.dumps({"article": addresses[7]["text"][:3000], "summary": "x"}) + "\n")
    yaml = d / "prep.yaml"
    yaml.write_text(f"""
name: test-english
output: {d / 'out'}
progress: false
inputs:
  - {{path: {d / 'addresses.jsonl'}}}
  - {{path: {d / 'wiki.txt'}, text_mode: paragraph}}
  - {{path: {d / 'book.txt'}}}
  - {{path: '{d / 'bad'}/*', text_mode: file}}
steps:
  - {{name: normalize_whitespace}}
  - {{name: strip_boilerplate}}
  - {{name: gopher_quality, params: {{min_words: 20}}}}
  - {{name: exact_dedup}}
  - {{name: fuzzy_dedup, params: {{ngram_size: 3, threshold: 0.8}}}}
  - name: decontaminate
    params: {{eval_sets: [{{path: {d / 'eval.jsonl'}, fields: [article]}}]}}
tokenizer: {{kind: bpe, vocab_size: 700, sample_mb: 1}}
pack: {{block_size: 64, val_fraction: 0.1}}
write: {{shard_mb: 0.2, row_group_rows: 256}}
""")
    return d


@pytest.fixture(scope="module")
def result(corpus, ray_session):
    cfg = load_config(PrepConfig, corpus / "prep.yaml")
    return cfg, run(cfg)


def test_ledger_counts_and_checks(result):
    cfg, m = result
    names = [e["step"] for e in m["ledger"]]
    assert names == ["read", "normalize_whitespace", "strip_boilerplate", "gopher_quality", "exact_dedup",
                     "fuzzy_dedup", "decontaminate", "tokenize"]
    prev = None
    for e in m["ledger"]:
        assert e["rows_in"] == e["rows_out"] + sum(e["drops"].values()), e
        if prev is not None:
            assert e["rows_in"] == prev
        prev = e["rows_out"]
    led = {e["step"]: e for e in m["ledger"]}
    assert led["exact_dedup"]["drops"] == {"duplicate": 1}
    assert led["fuzzy_dedup"]["drops"].get("near_duplicate", 0) >= 1
    assert led["decontaminate"]["drops"] == {"eval_overlap": 1}
    assert led["read"]["drops"] == {"binary_file": 1, "corrupt_parquet": 1, "empty_file": 1, "invalid_json": 1,
                                    "invalid_utf8": 1}
    srcs = {(Path(p["source"].split(":line")[0]).name, p["reason"]) for p in m["problems"]["examples"]}
    assert ("addresses.jsonl", "read:invalid_json") in srcs and ("binary.txt", "read:binary_file") in srcs
    assert m["problems"]["count"] == 5
    assert m["dedup"]["exact_dedup"] == {"duplicates": 1}


def test_shards_manifest_and_card(result):
    cfg, m = result
    root = Path(cfg.output)
    assert m["format"] == "raygpt-tokens/1" and m["kind"] == "pretrain" and m["block_size"] == 64
    assert m["tokenizer_id"] == hashlib.sha256((root / "tokenizer.json").read_bytes()).hexdigest()
    from gptcore.tokenizer import Tokenizer

    tok = Tokenizer.load(root / "tokenizer.json")
    assert m["eos_id"] == tok.eos_id and m["vocab_size"] == tok.vocab_size
    assert m["splits"]["val"]["rows"] > 0 and len(m["splits"]["train"]["shards"]) >= 2
    for split in ("train", "val"):
        info = m["splits"][split]
        assert [s["path"] for s in info["shards"]] == [f"{split}/part-{k:05d}.parquet" for k in range(len(info["shards"]))]
        rows = 0
        for sh, path in zip(info["shards"], shard_paths(m, split)):
            data = Path(path).read_bytes()
            assert len(data) == sh["bytes"] and hashlib.sha256(data).hexdigest() == sh["sha256"]
            t = pq.ParquetFile(path, page_checksum_verification=True).read()
            assert t.num_rows == sh["rows"]
            rows += t.num_rows
            ids = np.array(t.column("input_ids").to_pylist(), dtype=np.int64)
            doc = np.array(t.column("doc_ids").to_pylist(), dtype=np.int64)
            assert ids.shape[1] == 65 and doc.shape == ids.shape
            assert (doc[:, 0] == 0).all() and (np.diff(doc, axis=1) >= 0).all()
            # a document boundary (doc_ids step) comes right after an EOS token
            r, c = np.nonzero(np.diff(doc, axis=1))
            assert (ids[r, c] == tok.eos_id).all()
        assert rows == info["rows"]
    # consecutive windows overlap by one token (stride = block_size): the train stream decodes to real text
    t = pq.read_table(shard_paths(m, "train")[0])
    ids = t.column("input_ids").to_pylist()
    stream = ids[0] + [x for row in ids[1:50] for x in row[1:]]
    text = tok.decode(stream)
    assert "Fellow-Citizens of the Senate" in text
    # page checksums are really written: flipping one data byte is detected
    bad = Path(cfg.output) / "corrupt-copy.parquet"
    data = bytearray(Path(shard_paths(m, "train")[0]).read_bytes())
    data[200] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(OSError):
        pq.ParquetFile(bad, page_checksum_verification=True).read()
    bad.unlink()
    card = (root / "data_card.md").read_text()
    assert "| gopher_quality |" in card and "doc_lengths.png" in card
    for png in ("doc_lengths.png", "drops.png"):
        assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(m["stats"]["doc_chars_before"]) == m["ledger"][0]["rows_out"]
    assert sum(m["stats"]["doc_chars_after"]) == m["ledger"][-1]["rows_out"]
    assert json.loads((root / "timings.json").read_text())["timings"]["total_s"] > 0


def test_rerun_reuses_and_overwrite_is_byte_identical(result, corpus):
    cfg, m = result
    root = Path(cfg.output)
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*.parquet")}
    man_bytes = (root / "manifest.json").read_bytes()
    again = run(cfg)  # complete output, same config -> reused, untouched
    assert again["id"] == m["id"] and (root / "manifest.json").read_bytes() == man_bytes
    other = load_config(PrepConfig, corpus / "prep.yaml", ["pack.block_size=32"])
    with pytest.raises(PrepError, match="different config"):
        run(other)
    cfg2 = load_config(PrepConfig, corpus / "prep.yaml", ["overwrite=true"])
    m2 = run(cfg2)
    after = {p.relative_to(root): p.read_bytes() for p in root.rglob("*.parquet")}
    assert after == before and m2["id"] == m["id"]

    def strip(b: bytes) -> list[str]:
        return [l for l in b.decode().splitlines() if '"created_at"' not in l]

    assert strip((root / "manifest.json").read_bytes()) == strip(man_bytes)
    assert not (root / "_work").exists()


def test_unfinished_output_is_refused_by_readers(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train/part-00000.parquet").write_bytes(b"partial")
    with pytest.raises(DatasetNotReadyError, match="unfinished"):
        load_manifest(tmp_path)


def test_cli_errors_are_one_line(tmp_path, capsys, ray_session):
    from pipelines.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("output: x\ninputs: [{path: a.txt}]\npack: {block_sise: 3}\n")
    assert main(["prep", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "block_sise" in err and "Traceback" not in err
    assert main(["prep", "--config", str(bad), "pack={}", "steps=[{name: no_such_step}]"]) == 2
    assert "no_such_step" in capsys.readouterr().err
    (tmp_path / "only-bad.jsonl").write_text("not json\n{\"x\": 1}\n")
    ok = tmp_path / "ok.yaml"
    ok.write_text(f"output: {tmp_path / 'out'}\nprogress: false\ninputs: [{{path: {tmp_path / 'only-bad.jsonl'}}}]\n"
                  "tokenizer: {kind: char}\n")
    assert main(["prep", "--config", str(ok)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no usable input" in err and "invalid_json=1" in err and "only-bad.jsonl:line 1" in err
    assert not (tmp_path / "out/manifest.json").exists()
    assert main(["prep", "--config", str(ok), f"inputs=[{{path: {tmp_path / 'missing.txt'}}}]"]) == 2
    assert "matches no file" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[3] / "jobs/configs").glob("prep-*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(PrepConfig, path)
    assert cfg.inputs and cfg.output.startswith("runs/data/")
