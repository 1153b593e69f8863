"""`raygpt generate` and `raygpt eval summaries`: argument parsing only; the work is in pipeline.py / eval.py.

    raygpt generate --checkpoint runs/ckpt --input data.jsonl --output runs/gen --task summarize \
        [--config jobs/configs/generate-summarize.yaml] [max_new_tokens=64 temperature=0.8 concurrency=2 ...]
    raygpt eval summaries --generated runs/gen --references ../shared/data/cnndm-frank/cnndm_test_frank.jsonl

Trailing key=value pairs override the config; a bare SamplingParams field (temperature=0.7) means
sampling.temperature=0.7. Does not: import torch or ray before a handler runs (keeps --help fast).
"""

from __future__ import annotations

import argparse
import json

from pipelines import console

GENERATE_DESCRIPTION = """\
Generate text for every row of a dataset with a raygpt checkpoint, on Ray Data (a pool of actors,
each loading the model once): summaries of articles, articles from titles, or plain completions.
Output shards are committed atomically per id range, so a re-run of the same command generates only
the missing ids (exactly-once; safe to kill and re-run). Prints a JSON summary on stdout.

  raygpt generate --checkpoint runs/train/x/last --input articles.jsonl --output runs/gen/sum --task summarize
  raygpt generate --config jobs/configs/generate-summarize.yaml --checkpoint C --input I --output O \\
      max_new_tokens=64 temperature=0.7 concurrency=2

Key options (config keys, or key=value): batch_size, concurrency (actors), num_cpus / num_gpus per
actor, template, keep_columns, limit (first N ids), overwrite; any sampling parameter (temperature,
top_p, max_new_tokens, stop, ...) directly or as sampling.<name>. Flags beat the YAML file.
"""

EVAL_DESCRIPTION = """\
Score generated summaries against references with ROUGE-1/2/L (F1 x100), next to the lead-k
baseline (the article's first k sentences), and print a Markdown table.

  raygpt eval summaries --generated runs/gen/sum --references articles.jsonl
  raygpt eval summaries --references articles.jsonl --lead 3          # the baseline alone
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="batch generation on Ray Data (exactly-once, resumable)",
                       description=GENERATE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="raygpt checkpoint directory or URL")
    p.add_argument("--input", help="input file/dir/glob (Parquet, JSONL, CSV; any fsspec URL)")
    p.add_argument("--output", help="output directory (any fsspec URL); re-running resumes it")
    p.add_argument("--task", choices=["summarize", "article", "complete"], help="prompt template family")
    p.add_argument("--config", help="YAML file of GenerateConfig keys (flags and key=value win)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. concurrency=2 batch_size=32 max_new_tokens=64 keep_columns=[title]")
    p.set_defaults(func=_generate)

    e = sub.add_parser("eval", help="evaluate generated outputs (ROUGE of summaries)", description=EVAL_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    esub = e.add_subparsers(dest="eval_command", metavar="<what>")
    s = esub.add_parser("summaries", help="ROUGE-1/2/L vs references, with the lead-3 baseline",
                        description=EVAL_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--generated", help="generate output dir, or a file with id,text (omit: lead-k only)")
    s.add_argument("--references", required=True, help="file with id, article, summary (or references list)")
    s.add_argument("--name", default="generated", help="row label of the generated system")
    s.add_argument("--dataset", default=None, help="dataset label (default: the references file name)")
    s.add_argument("--lead", type=int, default=3, help="lead-k baseline (0: none)")
    s.add_argument("--id-column", default="id", help="id column of both files (default: id)")
    s.add_argument("--text-column", default="text", help="generated text column (default: text)")
    s.add_argument("--output", help="also write the Markdown table to this file")
    s.set_defaults(func=_eval_summaries)
    e.set_defaults(func=lambda args: (e.print_help(), 2)[1])


def build_config(args: argparse.Namespace):
    from pipelines.config import load_config
    from pipelines.generate.config import GenerateConfig, sampling_fields

    base = {k: getattr(args, k) for k in ("checkpoint", "input", "output", "task") if getattr(args, k, None)}
    sp = set(sampling_fields())
    overrides = []
    for ov in args.overrides or []:
        key = ov.split("=", 1)[0].lstrip("-")
        if key in sp and key not in GenerateConfig.__dataclass_fields__:
            ov = f"sampling.{ov.lstrip('-')}"
        overrides.append(ov)
    # flags beat the YAML file: apply them as overrides after it
    flag_overrides = [f"{k}={json.dumps(v)}" for k, v in base.items()]
    return load_config(GenerateConfig, args.config, overrides + flag_overrides)


def _generate(args: argparse.Namespace) -> int:
    from pipelines.generate import run

    cfg = build_config(args)
    summary = run(cfg)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _eval_summaries(args: argparse.Namespace) -> int:
    import os

    from pipelines.generate.eval import evaluate_summaries, load_generated, load_references, markdown_table

    refs = load_references(args.references, id_column=args.id_column)
    gen = None
    if args.generated:
        gen, skipped = load_generated(args.generated, id_column=args.id_column, text_column=args.text_column)
        if skipped["errors"]:
            console.get_logger("eval").warning("%d error/empty rows of --generated were left out", skipped["errors"])
    res = evaluate_summaries(gen, refs, name=args.name, lead=args.lead)
    if gen is not None and res["missing"]:
        console.get_logger("eval").warning("%d reference ids have no generated summary (scored on the %d shared ids)",
                                           res["missing"], res["n"])
    label = args.dataset or os.path.basename(args.references.rstrip("/"))
    table = markdown_table({label: res})
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")
    return 0
