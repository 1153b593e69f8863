"""The main job: raw text -> cleaned tokens -> pretrained + fine-tuned GPT -> summaries, articles, an API.

    make demo                       # = raygpt demo (offline, local Ray, about 10 minutes on 2 cores)
    raygpt demo --corpus URI        # the same on your own text (JSONL with `text`, or .txt files)
    raygpt demo out=runs/demo2 pretrain_steps=100     # DemoConfig overrides

Stages, each the real engine: (1) corpus: the Python standard library's own documentation
(pydoc topics + docstrings; `pipelines.stdlib_corpus`), no download; (2) Ray Data prep of the
pretraining set (BPE tokenizer trained on it) and of the SFT set (docstring body -> its first
line, pairs packed into full windows); (3) Ray Train + DeepSpeed pretraining, then SFT from that
checkpoint; (4) Ray Data batch generation of summaries for held-out docstrings (greedy, with
`copy_bias`; ROUGE vs the lead baseline) and of a few articles from titles; (5) a Ray Serve OpenAI-compatible endpoint asked one question by the
official `openai` client, then stopped; (6) a Markdown report with PNGs, and where every artefact is.
Does not: tune anything; the model is tiny and the numbers show the pipeline works, not a good model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError

DESCRIPTION = """\
Run the whole pipeline once, offline, on a local Ray: build a corpus (default: the Python standard
library's own documentation, no download), prep it with Ray Data (BPE tokenizer included), pretrain
a small GPT with Ray Train + DeepSpeed, fine-tune it to summarise a docstring in one line, generate
summaries of held-out docstrings (ROUGE next to the lead-1 baseline) and a few articles, ask a Ray
Serve OpenAI-compatible endpoint one question, and write a Markdown report with plots. About 10
minutes on 2 CPU cores; finished stages are reused on a re-run.

  raygpt demo                                   # = make demo; everything under runs/demo
  raygpt demo --corpus 'my_texts/*.txt'         # the same on your text (.txt, or JSONL with `text`)
  raygpt demo out=runs/demo2 pretrain_steps=100 sft_steps=50     # a quicker, smaller run

Options (key=value): out, corpus, vocab_size, block_size, preset, pretrain_steps, sft_steps,
micro_batch_size, num_workers, zero_stage, precision, generate_limit, articles, serve, overwrite;
num_beams and copy_bias of the summaries (default 1 and 1.0: greedy decoding that favours the
docstring's own tokens; copy_bias=0 turns that off, num_beams=4 is beam search).
The report is out/report/report.md; the last lines of the output say where every artefact is.
"""

SUMMARY_PROMPT = "{article}\n\nSummary: "
PROMPT_NOTE = ("Prompt: the docstring's body, then `Summary: `; lead-1 is the body's first sentence. Both models "
               "decode {decoding} with copy_bias {copy_bias} (logits added to the prompt's tokens).")
ARTICLE_PROMPT = "{title}\n\n"


@dataclass
class DemoConfig:
    out: str = "runs/demo"  # every artefact goes under this directory
    corpus: str | None = None  # None: the standard library's documentation; else a path/glob/URL of your text
    text_field: str = "text"  # JSONL field of your corpus
    vocab_size: int = 4096  # BPE vocabulary trained on the corpus
    block_size: int = 256  # context length of the model and the token windows
    preset: str = "tiny"  # gptcore preset (n_layer 4, n_head 4, n_embd 128)
    pretrain_steps: int = 800
    sft_steps: int = 400
    micro_batch_size: int = 16
    num_workers: int = 1  # Ray Train workers (2 = DeepSpeed data parallel over both cores)
    # intra-op threads per worker; 0 = this machine's cores / num_workers. Nothing else computes while the
    # demo trains, so one worker gets every core (measured, 2 cores: 367 vs 587 ms per step with 1 thread)
    torch_threads: int = 0
    zero_stage: int = 1
    # auto: bf16 autocast where bf16 matmuls measure >= 1.25x fp32 on this CPU (AMX), fp32 elsewhere (an
    # AVX2-only CPU refuses precision=bf16: emulated bf16 would be slower than fp32)
    precision: str = "auto"
    max_new_tokens: int = 40
    # summaries: greedy (num_beams 1) or beam search, with copy_bias (logits added to the docstring's tokens;
    # gptcore.sampling.SamplingParams.copy_bias) so the tiny model reuses the text's words; 0.0: off
    num_beams: int = 1
    copy_bias: float = 1.0
    generate_limit: int = 64  # held-out summaries to generate
    articles: int = 4  # articles from titles to generate
    article_samples: int = 8  # samples per title; the report shows the most likely one
    serve: bool = True  # start the endpoint and ask it one question
    overwrite: bool = False  # rebuild stages whose outputs exist
    seed: int = 1337

    def __post_init__(self) -> None:
        errs = []
        for f in ("vocab_size", "block_size", "pretrain_steps", "sft_steps", "micro_batch_size", "num_workers",
                  "max_new_tokens", "generate_limit", "num_beams",
                  "article_samples"):
            if getattr(self, f) < 1:
                errs.append(f"{f}: must be >= 1, got {getattr(self, f)!r}")
        if self.vocab_size < 300:
            errs.append(f"vocab_size: must be >= 300 for a byte-level BPE, got {self.vocab_size}")
        if self.zero_stage not in (0, 1, 2, 3):
            errs.append(f"zero_stage: must be 0-3, got {self.zero_stage!r}")
        if isinstance(self.copy_bias, bool) or not (isinstance(self.copy_bias, (int, float))
                                                     and math.isfinite(self.copy_bias)):
            errs.append(f"copy_bias: must be a finite number (0.0 = off), got {self.copy_bias!r}")
        if self.torch_threads < 0:
            errs.append(f"torch_threads: must be >= 0 (0 = cores / num_workers), got {self.torch_threads!r}")
        if errs:
            raise ConfigError("invalid demo config:\n  - " + "\n  - ".join(errs))


def _precision(cfg: DemoConfig) -> str:
    """The precision the workers will run ("auto" resolved on this machine, which is where they run)."""
    if cfg.precision != "auto":
        return cfg.precision
    from pipelines.train.deepspeed import auto_precision

    return f"auto = {auto_precision(use_gpu=False)}"


def _say(stage: str, msg: str) -> None:
    from pipelines.console import get_logger

    get_logger("demo").info("%s: %s", stage, msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- 1. corpus --------------------------------------------------------------------------------

def _user_corpus(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    """Your text -> docs.jsonl + summary pairs (first sentence of a paragraph-rich document vs its rest)."""
    import fsspec

    from pipelines.stdlib_corpus import _held_out

    files = sorted(fsspec.open_files(cfg.corpus, mode="rb", compression="infer"), key=lambda f: f.path)
    if not files:
        raise ConfigError(f"corpus: no file matches {cfg.corpus!r}; pass a path, glob or URL of .txt/.jsonl files")
    docs, train, held, titles = [], [], [], []
    for f in files:
        with f as fh:
            raw = fh.read().decode("utf-8", errors="replace")
        if f.path.endswith((".jsonl", ".json", ".ndjson")):
            texts = [json.loads(line).get(cfg.text_field, "") for line in raw.splitlines() if line.strip()]
        else:
            texts = [raw]
        for i, text in enumerate(texts):
            if not isinstance(text, str) or len(text) < 200:
                continue
            doc_id = f"{Path(f.path).name}#{i}"
            docs.append({"id": doc_id, "text": text, "source": f.path})
            head, _, body = text.strip().partition("\n\n")
            first = re.split(r"(?<=[.!?])\s", " ".join(head.split()), maxsplit=1)[0]
            if 20 <= len(first) <= 200 and len(body) >= 150:
                pair = {"id": doc_id, "article": body.strip(), "summary": first}
                (held if _held_out(doc_id, 0.05) else train).append(pair)
                if _held_out(doc_id, 0.05) and len(titles) < 50:
                    titles.append({"id": doc_id, "title": first, "article": body.strip()})
    if not docs or not train:
        raise ConfigError(f"corpus {cfg.corpus!r}: found {len(docs)} documents of >= 200 chars and {len(train)} "
                          "(first sentence, rest) pairs; the demo needs both (multi-paragraph documents)")
    if not held:
        held = train[-max(1, len(train) // 20):]
        train = train[: len(train) - len(held)]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("docs.jsonl", docs), ("summaries-train.jsonl", train),
                       ("summaries-heldout.jsonl", held), ("titles-heldout.jsonl", titles or held[:5])):
        with open(out / name, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r if name != "titles-heldout.jsonl" or "title" in r else
                                    {"id": r["id"], "title": r["summary"], "article": r["article"]},
                                    ensure_ascii=False) + "\n")
    return {"dir": str(out), "docs": len(docs), "summary_pairs_train": len(train),
            "summary_pairs_heldout": len(held), "source": cfg.corpus}


# ---- the stages -------------------------------------------------------------------------------

def _prep(cfg: DemoConfig, corpus: Path, data: Path) -> tuple[dict, dict]:
    from pipelines.config import from_dict
    from pipelines.data import run as prep_run
    from pipelines.data.config import PrepConfig

    pre = from_dict(PrepConfig, {
        "name": "demo-pretrain", "output": str(data / "pretrain"), "kind": "pretrain",
        "inputs": [{"path": str(corpus / "docs.jsonl"), "format": "jsonl", "text_field": "text"}],
        "steps": [{"name": "fix_text"}, {"name": "normalize_whitespace"}, {"name": "pii_redact"},
                  {"name": "min_length", "params": {"min_chars": 100}}, {"name": "exact_dedup"},
                  {"name": "fuzzy_dedup"}],
        "tokenizer": {"kind": "bpe", "vocab_size": cfg.vocab_size},
        "pack": {"block_size": cfg.block_size, "val_fraction": 0.05},
        "overwrite": cfg.overwrite, "progress": True,
    })
    _say("prep", f"cleaning, deduplicating and tokenizing {corpus / 'docs.jsonl'} -> {pre.output}")
    m_pre = prep_run(pre)
    sft = from_dict(PrepConfig, {
        "name": "demo-sft-summaries", "output": str(data / "sft"), "kind": "sft",
        "inputs": [{"path": str(corpus / "summaries-train.jsonl"), "format": "jsonl", "text_field": "article",
                    "fields": ["article", "summary"]}],
        "steps": [{"name": "exact_dedup"}],
        "tokenizer": {"kind": "load", "path": str(data / "pretrain" / "tokenizer.json")},
        "sft": {"prompt_template": SUMMARY_PROMPT, "completion_template": "{summary}<|endoftext|>",
                "mode": "pack", "truncate": "prompt"},
        "pack": {"block_size": cfg.block_size, "val_fraction": 0.05},
        "overwrite": cfg.overwrite, "progress": True,
    })
    _say("prep", f"rendering SFT pairs (docstring body -> first line) -> {sft.output}")
    m_sft = prep_run(sft)
    return m_pre, m_sft


def _train(cfg: DemoConfig, name: str, data: Path, run_dir: Path, steps: int, init_path: Path | None):
    from pipelines.config import from_dict
    from pipelines.train import run as train_run
    from pipelines.train.config import TrainConfig

    done = run_dir / "result.json"
    if done.exists() and not cfg.overwrite:
        r = json.loads(done.read_text())
        if Path(r["last_checkpoint"]).is_dir():
            _say(name, f"reusing the finished run in {run_dir} (overwrite=true to retrain)")
            return {**r, "reused": True}
    if run_dir.exists():
        shutil.rmtree(run_dir)
    tc = from_dict(TrainConfig, {
        "name": f"demo-{name}", "data": str(data), "run_dir": str(run_dir),
        "model": {"preset": cfg.preset, "block_size": cfg.block_size, "dropout": 0.0},
        "init": "raygpt" if init_path else "scratch", "init_path": str(init_path) if init_path else None,
        "optim": {"lr": 1e-3 if not init_path else 3e-4, "min_lr": 1e-4 if not init_path else 3e-5,
                  "warmup_steps": min(50, steps // 10), "weight_decay": 0.1 if not init_path else 0.0},
        "batch": {"micro_batch_size": cfg.micro_batch_size},
        "max_steps": steps, "eval_interval": max(steps // 4, 1), "eval_iters": 4,
        "ckpt_interval": max(steps // 2, 1), "keep_last_k": 1, "zero_stage": cfg.zero_stage,
        "precision": cfg.precision, "num_workers": cfg.num_workers, "seed": cfg.seed,
        "torch_threads": cfg.torch_threads or max(1, len(os.sched_getaffinity(0)) // cfg.num_workers),
        "sft": bool(init_path),
    })
    _say(name, f"{steps} steps of {cfg.preset} (block {cfg.block_size}) on {data.name}, "
               f"{cfg.num_workers} worker(s) x {tc.torch_threads} thread(s), ZeRO-{cfg.zero_stage}, {_precision(cfg)} "
               f"-> {run_dir}")
    res = train_run(tc)
    r = {"run_dir": str(res.run_dir), "steps": res.steps, "final_loss": res.final_loss,
         "final_val_loss": res.final_val_loss, "best_val_loss": res.best_val_loss,
         "last_checkpoint": str(res.last_checkpoint), "wall_s": res.wall_s}
    done.write_text(json.dumps(r, indent=2))
    _say(name, f"done in {res.wall_s:.0f} s: train loss {res.final_loss}, val loss {res.final_val_loss}")
    return r


def _generate(cfg: DemoConfig, sft_ckpt: str, base_ckpt: str, corpus: Path, gen: Path) -> dict[str, Any]:
    """Summaries from the fine-tuned model; articles from the pretrained one (SFT taught it to be brief)."""
    from pipelines.config import from_dict
    from pipelines.generate.config import GenerateConfig
    from pipelines.generate.pipeline import run as gen_run

    out = {}
    summarize = dict(input=str(corpus / "summaries-heldout.jsonl"), task="summarize", template=SUMMARY_PROMPT,
                     limit=cfg.generate_limit, keep_columns=["summary"],
                     sampling={"max_new_tokens": cfg.max_new_tokens, "temperature": 0.0,
                               "num_beams": cfg.num_beams, "copy_bias": cfg.copy_bias,
                               "no_repeat_ngram_size": 3, "stop": ["\n"], "truncate": "left"})
    jobs = {  # name -> (checkpoint, job)
        "summaries": (sft_ckpt, summarize),
        # the same prompts through the model before SFT: what fine-tuning added
        "summaries-pretrained": (base_ckpt, summarize),
        # n samples per title; the report shows the most likely one by the model's own likelihood
        "articles": (base_ckpt, dict(input=str(corpus / "titles-heldout.jsonl"), task="article",
                                     template=ARTICLE_PROMPT, limit=cfg.articles, keep_columns=["title"],
                                     sampling={"max_new_tokens": 3 * cfg.max_new_tokens, "temperature": 0.8,
                                               "top_p": 0.95, "repetition_penalty": 1.1, "truncate": "left",
                                               "n": cfg.article_samples})),
    }
    for name, (ckpt, job) in jobs.items():
        gc = from_dict(GenerateConfig, {"checkpoint": ckpt, "output": str(gen / name), "batch_size": 16,
                                        "overwrite": True, "seed": cfg.seed, "progress": True, **job})
        _say("generate", f"{name}: {job['input']} -> {gc.output}")
        out[name] = gen_run(gc)
    return out


def _serve_once(ckpt: str, max_tokens: int) -> dict[str, Any]:
    """Start the Serve app on a free loopback port, ask one question with the openai client, stop it."""
    import openai
    from ray import serve

    from pipelines.console import library_level_name
    from pipelines.serve.app import build_app

    port = _free_port()
    # a Serve instance left running on this Ray would ignore our http_options: start our own
    import logging

    logging.getLogger("ray.serve").setLevel(library_level_name())  # the driver side of Serve, too
    serve.shutdown()
    # Serve's controller, proxy and replica log every deployment step and request at INFO: warnings only
    quiet = {"log_level": library_level_name()}
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
    app_name = "raygpt-demo"
    serve.run(build_app({"checkpoint": str(Path(ckpt).resolve()), "model_name": "raygpt-demo",
                         "num_cpus": 0.5}), name=app_name, route_prefix="/", blocking=False, logging_config=quiet)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=2, timeout=120)
    prompt = ("Return the number of items in a container. The argument may be a sequence or a collection."
              + "\n\nSummary: ")
    deadline = time.time() + 120
    while True:
        try:
            resp = client.completions.create(model="raygpt-demo", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stop=["\n"])
            break
        except (openai.APIConnectionError, openai.NotFoundError, openai.InternalServerError):
            if time.time() > deadline:
                raise
            time.sleep(1)
    result = {"url": f"http://127.0.0.1:{port}/v1", "prompt": prompt, "completion": resp.choices[0].text,
              "usage": resp.usage.model_dump() if resp.usage else None}
    serve.delete(app_name)
    serve.shutdown()
    return result


# ---- run --------------------------------------------------------------------------------------

def _train_phases(name: str, run_dir: Path, wall_s: float) -> dict[str, float]:
    """Split a training run's wall time (from its metrics.jsonl) into start-up, steps and the rest."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ready = next((r for r in rows if r.get("event") == "worker_ready"), None)
    steps = sum(r.get("step_time_s", 0.0) for r in rows if r.get("kind") == "train")
    start = (ready["time"] - ready["driver_start"]) if ready and "driver_start" in ready else 0.0
    return {f"{name}: start-up (Ray Train workers, DeepSpeed)": start, f"{name}: optimizer steps": steps,
            f"{name}: evaluation, checkpoints, shutdown": max(0.0, wall_s - start - steps)}


def _stages(cfg: DemoConfig, out: Path, info: dict[str, Any], timings: dict[str, float]) -> None:
    """Every stage after the corpus, in order, each timed into `timings`."""
    corpus = Path(info["corpus"]["dir"])
    t = time.time()
    info["data_pretrain"], info["data_sft"] = _prep(cfg, corpus, out / "data")
    timings["Ray start + prep (Ray Data)"] = time.time() - t
    for name, steps, init in (("pretrain", cfg.pretrain_steps, None), ("sft", cfg.sft_steps, "pretrain")):
        t = time.time()
        info[name] = _train(cfg, name, out / f"data/{name if name == 'sft' else 'pretrain'}", out / f"train/{name}",
                            steps, Path(info[init]["last_checkpoint"]) if init else None)
        if info[name].get("reused"):
            timings[f"{name}: reused"] = time.time() - t
        else:
            timings.update(_train_phases(name, out / f"train/{name}", time.time() - t))
    t = time.time()
    info["generate"] = _generate(cfg, info["sft"]["last_checkpoint"], info["pretrain"]["last_checkpoint"], corpus,
                                 out / "generate")
    timings["batch generation (Ray Data)"] = time.time() - t
    if cfg.serve:
        t = time.time()
        _say("serve", "starting the OpenAI-compatible endpoint on 127.0.0.1 and asking one question")
        info["serve"] = _serve_once(info["sft"]["last_checkpoint"], min(24, cfg.max_new_tokens))
        _say("serve", f"answer: {info['serve']['completion']!r}; endpoint stopped")
        timings["Serve: start, one request, stop"] = time.time() - t


def run(cfg: DemoConfig) -> dict[str, Any]:
    from pipelines.demo_report import write_report
    from pipelines.runtime import ensure_ray

    t0 = time.time()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {}
    timings: dict[str, float] = {}
    _say("corpus", "building" + (f" from {cfg.corpus}" if cfg.corpus else
                                 " the embedded default: the Python standard library's documentation"))
    if cfg.corpus:
        info["corpus"] = _user_corpus(cfg, out / "corpus")
    else:
        from pipelines.stdlib_corpus import build

        info["corpus"] = build(out / "corpus")
    _say("corpus", f"{info['corpus']['docs']} documents, {info['corpus']['summary_pairs_train']} summary pairs "
                   f"for SFT, {info['corpus']['summary_pairs_heldout']} held out")
    timings["corpus"] = time.time() - t0
    ensure_ray("local")
    _stages(cfg, out, info, timings)
    info["wall_s"] = time.time() - t0
    info["artefacts"] = {
        "corpus": info["corpus"]["dir"],
        "pretraining data (+ data card)": str(out / "data/pretrain"),
        "SFT data": str(out / "data/sft"),
        "pretrained checkpoint": info["pretrain"]["last_checkpoint"],
        "fine-tuned checkpoint": info["sft"]["last_checkpoint"],
        "training runs (metrics.jsonl, TensorBoard, loss_curve.png)": str(out / "train"),
        "generated summaries": str(out / "generate/summaries"),
        "generated articles": str(out / "generate/articles"),
        "report": str(out / "report/report.md"),
    }
    info["timings"] = timings
    t = time.time()
    report = write_report(out, info, articles=cfg.articles,
                          prompt_note=PROMPT_NOTE.format(
                              decoding="greedily" if cfg.num_beams == 1 else f"with beam search ({cfg.num_beams} beams)",
                              copy_bias=cfg.copy_bias))
    timings["report (ROUGE, best-of-n, plots)"] = time.time() - t
    (out / "demo_result.json").write_text(json.dumps(
        {k: v for k, v in info.items() if k not in ("data_pretrain", "data_sft")}, indent=2, default=str))
    print(f"\nraygpt demo finished in {info['wall_s']:.0f} s. Artefacts:")
    for k, v in info["artefacts"].items():
        print(f"  {k:58s} {v}")
    r = info["rouge"]["systems"]
    print("\nROUGE-L on held-out docstrings: " + ", ".join(f"{s} {v['rougeL']:.1f}" for s, v in r.items()))
    print(f"Report: {report}")
    return info


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the whole pipeline end to end on a built-in corpus (or --corpus URI)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=None, help="your text (path/glob/URL of .txt or .jsonl); default: the "
                                                  "Python standard library's documentation")
    p.add_argument("--config", default=None, help="a YAML file of DemoConfig keys")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="DemoConfig overrides, e.g. pretrain_steps=100")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from pipelines.config import load_config

    overrides = list(args.overrides or [])
    if args.corpus:
        overrides.append(f"corpus={args.corpus}")
    cfg = load_config(DemoConfig, args.config, overrides)
    run(cfg)
    return 0


if __name__ == "__main__":
    from pipelines.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
