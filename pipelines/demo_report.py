"""The demo's Markdown report: data, training, where the time went, ROUGE of three systems, articles, Serve.

    from pipelines.demo_report import write_report
    path = write_report(out_dir, info, articles=4)      # -> out_dir/report/report.md (+ PNGs next to it)

Articles are chosen best-of-n by the generating model's own likelihood (mean log-probability per token
of the sampled text given its title), so the report shows what the model finds most probable, not a
random draw. Does not: run any stage; it reads the artefacts the stages wrote and `info`.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from pipelines.generate.eval import evaluate_summaries, load_generated, load_references, markdown_table
from pipelines.generate.io import load_output

SFT_SYSTEM = "raygpt (SFT)"
BASE_SYSTEM = "raygpt (pretrained only)"


# ---- best of n by likelihood ------------------------------------------------------------------

def mean_logprobs(checkpoint: str, pairs: list[tuple[str, str]]) -> list[float]:
    """Mean log-probability per token of each completion given its prompt, under the checkpoint's model."""
    import torch

    from gptcore.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint)
    tok, bs = ck.tokenizer, ck.config.block_size
    out = []
    with torch.inference_mode():
        for prompt, completion in pairs:
            p, c = tok.encode(prompt), tok.encode(completion)
            if not c:
                out.append(-math.inf)
                continue
            ids = (p + c)[-bs - 1:]  # the window the model can see; the completion's end is what counts
            n_c = min(len(c), len(ids) - 1)
            x = torch.tensor([ids[:-1]])
            logits, _ = ck.model(x)  # (1, T, V)
            logp = torch.log_softmax(logits[0, -n_c:].float(), dim=-1)  # (n_c, V)
            tgt = torch.tensor(ids[-n_c:])
            out.append(float(logp.gather(1, tgt[:, None]).mean()))
    return out


def copy_losses(model: Any, vocab_size: int, span: int, seed: int = 0, rows: int = 8) -> tuple[float, float]:
    """Loss (nats) on random token spans seen once, and on the same spans repeated right after.

    A model that can copy from its context (induction heads) predicts the repeat almost perfectly; one that
    cannot scores both halves alike. Summaries that beat lead-1 need that skill (they reuse the text's words).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(min(256, vocab_size - 1), vocab_size, (rows, span), generator=g)
    seq = torch.cat([x, x], dim=1)  # (rows, 2 * span)
    with torch.inference_mode():
        logits, _ = model(seq[:, :-1])  # (rows, 2 * span - 1, V)
    nll = -torch.log_softmax(logits.float(), dim=-1).gather(2, seq[:, 1:, None])[..., 0]  # (rows, 2 * span - 1)
    return float(nll[:, : span - 1].mean()), float(nll[:, span:].mean())


def copy_test(checkpoint: str, span: int = 50) -> tuple[float, float]:
    from gptcore.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint)
    return copy_losses(ck.model, ck.config.vocab_size, min(span, ck.config.block_size // 2))


def best_of_n(articles_dir: str, checkpoint: str) -> dict[str, dict[str, Any]]:
    """id -> {"text", "mean_logprob", "n"}: the most likely of the samples generated for each id."""
    rows = [r for r in load_output(articles_dir).to_pylist() if r.get("error") is None and r.get("text")]
    scores = mean_logprobs(checkpoint, [(r["prompt"], r["text"]) for r in rows])
    by_id: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    for r, s in zip(rows, scores):
        by_id[str(r["id"])].append((s, -int(r["index"]), r["text"]))  # ties: the lower index
    return {k: {"text": max(v)[2], "mean_logprob": max(v)[0], "n": len(v)} for k, v in by_id.items()}


# ---- pictures ---------------------------------------------------------------------------------

def rouge_png(rouge: dict[str, Any], path: Path) -> None:
    systems = list(rouge["systems"])
    metrics = ["rouge1", "rouge2", "rougeL"]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    w = 0.8 / max(len(systems), 1)
    for i, s in enumerate(systems):
        ax.bar([j + i * w for j in range(3)], [rouge["systems"][s][m] for m in metrics], width=w, label=s)
    ax.set_xticks([j + w * (len(systems) - 1) / 2 for j in range(3)], ["ROUGE-1", "ROUGE-2", "ROUGE-L"])
    ax.set_ylabel("F1 x100")
    ax.set_title(f"held-out summaries (n={rouge['n']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def time_png(timings: dict[str, float], path: Path) -> None:
    """One horizontal bar per stage: where the demo's wall time went."""
    names = list(timings)[::-1]
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(names) + 1.0))
    ax.barh(names, [timings[n] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax.text(timings[n], i, f" {timings[n]:.0f} s", va="center", fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_title(f"where the demo's {sum(timings.values()):.0f} s went")
    ax.set_xlim(0, max(timings.values() or [1]) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- the report ---------------------------------------------------------------------------------

def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def cell(s: str, n: int = 120) -> str:
    s = " ".join(str(s).split()).replace("|", "\\|")
    return s if len(s) <= n else s[: n - 1] + "…"


def _copy_pictures(out: Path, rep: Path, info: dict[str, Any]) -> dict[str, str]:
    """PNGs next to the report so it renders anywhere."""
    pics = {}
    for label, src in (("data_doc_lengths", out / "data/pretrain/doc_lengths.png"),
                       ("data_drops", out / "data/pretrain/drops.png"),
                       ("loss_pretrain", Path(info["pretrain"]["run_dir"]) / "loss_curve.png"),
                       ("loss_sft", Path(info["sft"]["run_dir"]) / "loss_curve.png")):
        if src.exists():
            shutil.copyfile(src, rep / f"{label}.png")
            pics[label] = f"{label}.png"
    return pics


def score_summaries(out: Path, info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """ROUGE of the fine-tuned model, the pretrained-only model and lead-1 on the same held-out ids."""
    gen, _ = load_generated(str(out / "generate/summaries"))
    base, _ = load_generated(str(out / "generate/summaries-pretrained"))
    refs = load_references(str(info["corpus"]["dir"]) + "/summaries-heldout.jsonl")
    refs = {k: v for k, v in refs.items() if k in gen}
    sft = evaluate_summaries(gen, refs, name=SFT_SYSTEM, lead=1)
    pre = evaluate_summaries(base, refs, name=BASE_SYSTEM, lead=0)
    rouge = {"n": sft["n"], "missing": sft["missing"],
             "systems": {BASE_SYSTEM: pre["systems"][BASE_SYSTEM], **sft["systems"]}}
    return rouge, gen, refs


def _data_lines(info: dict[str, Any], pics: dict[str, str]) -> list[str]:
    m = info["data_pretrain"]
    corpus = info["corpus"].get("source") or f"Python {info['corpus'].get('python', '')} standard-library documentation"
    lines = ["# raygpt demo report", "",
             f"Corpus: {corpus} ({info['corpus']['docs']} documents). Wall time {info['wall_s']:.0f} s.", "",
             "## Data", "",
             f"Pretraining set `{m.get('root')}`: tokenizer `{str(m.get('tokenizer_id'))[:12]}` "
             f"(vocab {m.get('vocab_size')}), train tokens {m['splits']['train']['tokens']:,}, "
             f"val tokens {m['splits'].get('val', {}).get('tokens', 0):,}. Data card: `{m.get('root')}/data_card.md`.",
             ""]
    return lines + [f"![{k}]({v})" for k, v in pics.items() if k.startswith("data")]


def _training_lines(info: dict[str, Any], pics: dict[str, str]) -> list[str]:
    lines = ["", "## Training", "", "| run | steps | final train loss | final val loss | wall s |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for k in ("pretrain", "sft"):
        r = info[k]
        lines.append(f"| {k} | {r['steps']} | {_num(r['final_loss'])} | {_num(r['final_val_loss'])} | {r['wall_s']:.0f} |")
    lines += [""] + [f"![{k}]({v})" for k, v in pics.items() if k.startswith("loss")]
    timings = info.get("timings") or {}
    if timings:
        lines += ["", "## Where the time went", "", "| stage | seconds | share |", "| --- | ---: | ---: |"]
        total = sum(timings.values()) or 1.0
        lines += [f"| {k} | {v:.1f} | {100 * v / total:.0f}% |" for k, v in timings.items()]
        lines += ["", "![time](time.png)"]
    return lines


def _summary_lines(rouge: dict[str, Any], gen: dict[str, str], refs: dict[str, Any], prompt_note: str,
                   copy: tuple[float, float] | None) -> list[str]:
    lines = ["", "## Summaries of held-out docstrings (ROUGE F1 x100)", "", prompt_note, "",
             markdown_table({"stdlib docstrings (held out)": rouge}), "", "![rouge](rouge.png)", ""]
    if copy is not None:
        learned = copy[1] < 0.5 * copy[0]
        lines += [f"Copy test of the pretrained model (loss on random token spans, first sight -> repeated): "
                  f"{copy[0]:.2f} -> {copy[1]:.2f} nats: it " + ("has learned" if learned else "has not learned") +
                  " to copy from its context, which summaries that beat lead-1 need (they reuse the text's words); "
                  "decoding with copy_bias > 0 favours the prompt's tokens instead.",
                  ""]
    lines += ["| id | article (start) | reference | generated |", "| --- | --- | --- | --- |"]
    for k in sorted(gen)[:5]:
        lines.append(f"| `{k}` | {cell(refs[k]['article'], 160)} | {cell(refs[k]['references'][0])} | {cell(gen[k])} |")
    return lines


def _article_lines(best: dict[str, dict[str, Any]], n_articles: int, params: int) -> list[str]:
    lines = ["", "## Articles from titles", ""]
    if best:
        n = max(b["n"] for b in best.values())
        lines += [f"A {params / 1e6:.1f} M-parameter model trained for minutes on 2 cores does not write readable "
                  f"prose; each article below is the most likely of {n} samples by the model's own mean "
                  "log-probability per token, not a random draw.", ""]
    for k in sorted(best)[:n_articles]:
        lines += [f"**{k}** (mean log-probability {best[k]['mean_logprob']:.2f})", "",
                  "> " + cell(best[k]["text"], 600), ""]
    return lines


def write_report(out: Path, info: dict[str, Any], *, articles: int, prompt_note: str = "") -> Path:
    """Write out/report/report.md with its PNGs; sets info["rouge"] and info["best_articles"]."""
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    pics = _copy_pictures(out, rep, info)
    rouge, gen, refs = score_summaries(out, info)
    rouge_png(rouge, rep / "rouge.png")
    if info.get("timings"):
        time_png(info["timings"], rep / "time.png")
    base = info["pretrain"]["last_checkpoint"]
    best = best_of_n(str(out / "generate/articles"), base)
    params = int(json.loads((Path(base) / "meta.json").read_text()).get("num_params", 0) or 0) \
        if (Path(base) / "meta.json").exists() else 0
    copy = copy_test(base)
    info["copy_test"] = {"first_nll": copy[0], "repeat_nll": copy[1]}
    lines = _data_lines(info, pics) + _training_lines(info, pics)
    lines += _summary_lines(rouge, gen, refs, prompt_note, copy)
    lines += _article_lines(best, articles, params)
    if info.get("serve"):
        s = info["serve"]
        lines += ["## Serve", "", f"`POST {s['url']}/completions` answered: `{cell(s['completion'])}` "
                  f"(usage {s['usage']}).", ""]
    lines += ["## Artefacts", ""] + [f"- {k}: `{v}`" for k, v in info["artefacts"].items()]
    (rep / "report.md").write_text("\n".join(lines) + "\n")
    info["rouge"] = rouge
    info["best_articles"] = best
    return rep / "report.md"
