"""Data card: a Markdown summary of a prep run plus PNG charts (matplotlib, Agg backend).

    write_card("runs/data/english-bpe", manifest)   # called by the pipeline before the manifest

Writes data_card.md, doc_lengths.png (document length histograms as read and as kept) and
drops.png (dropped documents by step and reason). Everything comes from the manifest dict, so the
card can be regenerated from a finished dataset. Does not: read shards.
"""

from __future__ import annotations

import io
from typing import Any

import fsspec


def _fig_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _charts(manifest: dict[str, Any]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    out = {}
    st = manifest["stats"]
    edges = np.asarray(st["hist_edges_chars"], dtype=float)
    before = np.asarray(st["doc_chars_before"] or [0] * (len(edges) - 1))
    after = np.asarray(st["doc_chars_after"] or [0] * (len(edges) - 1))
    fig, ax = plt.subplots(figsize=(8, 4))
    widths = np.diff(edges)
    ax.bar(edges[:-1] + 0.0, before, width=widths, align="edge", alpha=0.5, label="as read", color="tab:gray")
    ax.bar(edges[:-1], after, width=widths, align="edge", alpha=0.7, label="kept", color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("document length (characters)")
    ax.set_ylabel("documents")
    ax.set_title(f"{manifest.get('name', '')}: document lengths before/after")
    ax.legend()
    fig.tight_layout()
    out["doc_lengths.png"] = _fig_bytes(fig)
    plt.close(fig)

    labels, counts = [], []
    for e in manifest["ledger"]:
        for r, n in e["drops"].items():
            labels.append(f"{e['step']}:{r}" if ":" not in r else r)
            counts.append(n)
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.35 * len(labels) + 1)))
    if labels:
        y = np.arange(len(labels))
        ax.barh(y, counts, color="tab:red")
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        ax.set_xlabel("documents dropped")
    else:
        ax.text(0.5, 0.5, "no documents dropped", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("drops by reason")
    fig.tight_layout()
    out["drops.png"] = _fig_bytes(fig)
    plt.close(fig)
    return out


def render_markdown(m: dict[str, Any]) -> str:
    lines = [f"# Data card: {m.get('name', '')}", ""]
    lines += [f"- kind: **{m['kind']}**, block_size {m['block_size']} (rows of {m['block_size'] + 1} tokens)",
              f"- tokenizer: {m['tokenizer_kind']} (vocab {m['vocab_size']}, eos {m['eos_id']}), "
              f"id `{m['tokenizer_id'][:16]}`",
              f"- code: {m['code_version']}", ""]
    lines += ["## Splits", "", "| split | rows | documents | tokens | shards |", "| --- | ---: | ---: | ---: | ---: |"]
    for s, v in m["splits"].items():
        lines.append(f"| {s} | {v['rows']} | {v['docs']} | {v['tokens']} | {len(v['shards'])} |")
    lines += ["", "## Inputs", ""]
    for inp in m["config"].get("inputs", []):
        lines.append(f"- `{inp['path']}` (format {inp['format']}, mode {inp['text_mode']})")
    lines += ["", "## Pipeline ledger", "", "| step | rows in | rows out | drops |", "| --- | ---: | ---: | --- |"]
    for e in m["ledger"]:
        drops = ", ".join(f"{r}: {n}" for r, n in e["drops"].items()) or "-"
        lines.append(f"| {e['step']} | {e['rows_in']} | {e['rows_out']} | {drops} |")
    if m.get("dedup"):
        lines += ["", "## Deduplication", ""]
        for k, v in m["dedup"].items():
            lines.append(f"- {k}: " + ", ".join(f"{a} {b}" for a, b in v.items()))
    if m.get("decontamination"):
        lines += ["", "## Decontamination", "", f"- {m['decontamination']}"]
    pr = m.get("problems", {})
    if pr.get("count"):
        lines += ["", f"## Bad input ({pr['count']} records)", ""]
        for p in pr.get("examples", [])[:20]:
            lines.append(f"- `{p['source']}`: {p['reason']}")
    lines += ["", "## Charts", "", "![document lengths](doc_lengths.png)", "", "![drops by reason](drops.png)", ""]
    return "\n".join(lines)


def write_card(out_dir: str, manifest: dict[str, Any]) -> list[str]:
    fs, root = fsspec.core.url_to_fs(out_dir)
    root = root.rstrip("/")
    written = []
    for name, data in _charts(manifest).items():
        with fs.open(f"{root}/{name}", "wb") as f:
            f.write(data)
        written.append(name)
    with fs.open(f"{root}/data_card.md", "w") as f:
        f.write(render_markdown(manifest))
    written.append("data_card.md")
    return written
