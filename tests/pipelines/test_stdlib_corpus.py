"""The embedded default corpus: held-out pairs keep the strict rule, training takes shorter bodies too.

    pytest tests/pipelines/test_stdlib_corpus.py -q
"""

from __future__ import annotations

import json

from pipelines.stdlib_corpus import _held_out, build


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_pairs_take_shorter_bodies_and_the_held_out_set_does_not_move(tmp_path):
    strict = build(tmp_path / "strict", min_train_body_chars=150)
    loose = build(tmp_path / "loose", min_train_body_chars=40)
    # the held-out pairs (and the pretraining documents) do not depend on the training rule
    for name in ("summaries-heldout.jsonl", "docs.jsonl", "titles-heldout.jsonl"):
        assert (tmp_path / "strict" / name).read_bytes() == (tmp_path / "loose" / name).read_bytes()
    held = _rows(tmp_path / "loose/summaries-heldout.jsonl")
    assert held and all(len(r["article"]) >= 150 for r in held)
    train = _rows(tmp_path / "loose/summaries-train.jsonl")
    assert loose["summary_pairs_train"] > strict["summary_pairs_train"] == len(_rows(tmp_path / "strict/summaries-train.jsonl"))
    assert min(len(r["article"]) for r in train) >= 40 and any(len(r["article"]) < 150 for r in train)
    # no held-out id (by hash) is ever a training pair, whatever its body length
    assert not any(_held_out(r["id"], 0.05) for r in train)
    assert all(r["summary"].endswith(".") and 20 <= len(r["summary"]) <= 200 for r in train)
