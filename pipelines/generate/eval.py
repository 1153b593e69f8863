"""Summary evaluation: ROUGE-1/2/L (rouge-score package) of generated summaries, next to the lead-3
baseline computed on the same articles; a Markdown table.

    raygpt eval summaries --generated runs/gen-cnndm --references ../shared/data/cnndm-frank/cnndm_test_frank.jsonl
    from pipelines.generate.eval import evaluate_summaries, markdown_table

--generated is a `raygpt generate` output directory (its manifest is required; output index 0 of each
id, error rows excluded and counted) or any Parquet/JSONL/CSV file with `id` and `text` columns.
--references is Parquet/JSONL/CSV with `id`, `article` and `summary` (or a `references` list: the
score of an example is the best over its references). Scores are F1 x 100, averaged over the ids
present in both. Does not: generate, download anything, or compute significance intervals.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from rouge_score import rouge_scorer

from pipelines.errors import ConfigError
from pipelines.generate.io import DATA_DIR, MANIFEST, list_input_files, load_output, url_to_fs
from pipelines.runtime import join

_SENT_SPLIT = re.compile(
    r"(?<=[.!?])[\"'”’)]*\s+(?=[\"'“‘(]*[A-Z0-9])"  # end mark, optional closing quote, space, capital
    r"|(?<=[a-z0-9][.!?])(?=[A-Z][a-z])"  # glued sentences ("bn.For the year")
    r"|\n\s*\n"  # paragraph breaks
)


def sentences(text: str) -> list[str]:
    """A regex sentence splitter (no model data to download): good enough for lead-k baselines."""
    parts = [p.strip() for p in _SENT_SPLIT.split(text or "")]
    return [p for p in parts if p]


def lead_k(article: str, k: int = 3) -> str:
    return "\n".join(sentences(article)[:k])


def _read_table(uri: str) -> tuple[list[dict[str, Any]], bool]:
    """Rows of a Parquet/JSONL/CSV file (or generate output dir) as a list of dicts, and whether it was
    a generate output."""
    fs, root = url_to_fs(uri)
    if fs.isdir(root) and (fs.exists(join(root, MANIFEST)) or fs.exists(join(root, DATA_DIR))):
        return load_output(uri).to_pylist(), True
    fs, files, fmt = list_input_files(uri)
    rows: list[dict[str, Any]] = []
    for f in files:
        with fs.open(f, "rb", compression="infer") as fh:
            raw = fh.read()
        if fmt == "parquet":
            rows += pq.read_table(io.BytesIO(raw)).to_pylist()
        elif fmt == "csv":
            rows += pacsv.read_csv(io.BytesIO(raw)).to_pylist()
        else:
            rows += [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    return rows, False


def load_generated(uri: str, id_column: str = "id", text_column: str = "text") -> tuple[dict[str, str], dict[str, int]]:
    """id -> generated text (output index 0), plus counts of skipped rows."""
    rows, is_output = _read_table(uri)
    out: dict[str, str] = {}
    skipped = {"errors": 0, "other_indices": 0}
    for r in rows:
        if id_column not in r or text_column not in r:
            raise ConfigError(f"--generated {uri!r} rows need columns {id_column!r} and {text_column!r}; "
                              f"found {sorted(r)}")
        if is_output and (r.get("index") or 0) != 0:
            skipped["other_indices"] += 1
            continue
        if r.get("error") is not None or r[text_column] is None:
            skipped["errors"] += 1
            continue
        out[str(r[id_column])] = str(r[text_column])
    return out, skipped


def load_references(uri: str, id_column: str = "id") -> dict[str, dict[str, Any]]:
    rows, _ = _read_table(uri)
    out = {}
    for r in rows:
        refs = r.get("references") or ([r["summary"]] if r.get("summary") is not None else [])
        if id_column not in r or not refs:
            raise ConfigError(f"--references {uri!r} rows need {id_column!r} and `summary` (or `references`); "
                              f"found {sorted(r)}")
        out[str(r[id_column])] = {"article": r.get("article") or "", "references": [str(x) for x in refs]}
    return out


def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge(preds: list[str], refs: list[list[str]]) -> dict[str, float]:
    """Mean ROUGE F1 (x100); with several references an example scores its best one (per metric)."""
    sc = _scorer()
    tot = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, rs in zip(preds, refs):
        best = {k: 0.0 for k in tot}
        for ref in rs:
            s = sc.score(ref, p)
            for k in tot:
                best[k] = max(best[k], s[k].fmeasure)
        for k in tot:
            tot[k] += best[k]
    n = max(len(preds), 1)
    return {k: 100.0 * v / n for k, v in tot.items()}


def evaluate_summaries(generated: dict[str, str] | None, references: dict[str, dict[str, Any]],
                       name: str = "generated", lead: int = 3) -> dict[str, Any]:
    """ROUGE of `generated` and of lead-`lead` on the same ids (all reference ids when generated is None)."""
    ids = sorted(references) if generated is None else sorted(set(generated) & set(references))
    refs = [references[i]["references"] for i in ids]
    systems: dict[str, dict[str, float]] = {}
    if generated is not None:
        systems[name] = rouge([generated[i] for i in ids], refs)
    if lead:
        systems[f"lead-{lead}"] = rouge([lead_k(references[i]["article"], lead) for i in ids], refs)
    return {"n": len(ids), "systems": systems,
            "missing": 0 if generated is None else len(set(references) - set(generated))}


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """{dataset: evaluate_summaries(...)} -> one Markdown table."""
    lines = ["| dataset | system | n | ROUGE-1 | ROUGE-2 | ROUGE-L |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for ds, res in results.items():
        for sys_name, s in res["systems"].items():
            lines.append(f"| {ds} | {sys_name} | {res['n']} | {s['rouge1']:.2f} | {s['rouge2']:.2f} | "
                         f"{s['rougeL']:.2f} |")
    return "\n".join(lines)
