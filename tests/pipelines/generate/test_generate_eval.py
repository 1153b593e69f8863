"""`raygpt eval summaries`: ROUGE-1/2/L with the rouge-score package, lead-3 baseline, Markdown table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.generate.eval import evaluate_summaries, lead_k, load_references, markdown_table, rouge, sentences

REPO = Path(__file__).resolve().parents[3]


def test_sentences_and_lead3():
    art = "Headline here\n\nFirst one. Second one! Glued ends.Third starts here? Fourth."
    assert sentences(art) == ["Headline here", "First one.", "Second one!", "Glued ends.", "Third starts here?",
                              "Fourth."]
    assert lead_k("A b. C d. E f. G h.", 3) == "A b.\nC d.\nE f."
    assert sentences("The U.S. economy grew 2.5% in 2024. Analysts agreed.") == [
        "The U.S. economy grew 2.5% in 2024.", "Analysts agreed."]


def test_rouge_values_and_multi_reference():
    s = rouge(["the cat sat on the mat"], [["the cat sat on the mat"]])
    assert s == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}
    assert rouge(["dogs bark"], [["the cat sat"]])["rouge1"] == 0.0
    best = rouge(["the cat sat"], [["a dog ran", "the cat sat"]])
    assert best["rouge1"] == 100.0  # the best reference counts


def test_table_on_real_cnndm(shared_data, tmp_path):
    refs_path = shared_data / "cnndm-frank" / "cnndm_test_frank.jsonl"
    refs = load_references(str(refs_path))
    assert len(refs) == 178
    first = {i: sentences(r["article"])[0] for i, r in list(refs.items())[:40]}
    res = evaluate_summaries(first, refs, name="first-sentence")
    assert res["n"] == 40 and res["missing"] == 138
    lead = res["systems"]["lead-3"]
    assert 25 < lead["rouge1"] < 55 and 0 < lead["rouge2"] < lead["rouge1"]
    table = markdown_table({"cnndm": res})
    assert table.splitlines()[0] == "| dataset | system | n | ROUGE-1 | ROUGE-2 | ROUGE-L |"
    assert "| cnndm | first-sentence | 40 |" in table and "| cnndm | lead-3 | 40 |" in table

    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in first.items()))
    out = tmp_path / "t.md"
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "eval", "summaries", "--generated", str(gen),
                        "--references", str(refs_path), "--name", "first-sentence", "--output", str(out)],
                       capture_output=True, text=True, cwd=str(REPO), timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_text().strip() == r.stdout.strip() and "first-sentence | 40" in r.stdout
    assert "138 reference ids have no generated summary" in r.stderr


def test_bad_inputs_are_user_errors(tmp_path):
    bad = tmp_path / "refs.jsonl"
    bad.write_text(json.dumps({"id": "x", "article": "a"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "eval", "summaries", "--references", str(bad)],
                       capture_output=True, text=True, cwd=str(REPO), timeout=120)
    assert r.returncode == 2 and "summary" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(Exception):  # noqa: B017 - any error will do: the file does not exist
        load_references(str(tmp_path / "missing.jsonl"))
