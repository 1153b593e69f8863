"""Core `raygpt` subcommands on gptcore alone (no Ray): tokenizer train, init, sample, export, import.

    raygpt tokenizer train --input 'corpus/*.txt' --vocab-size 4096 --kind bpe --out tokenizer.json
    raygpt init CKPT --preset debug --tokenizer tokenizer.json --seed 0 --set block_size=128
    raygpt sample CKPT --prompt "ROMEO:" --max-new-tokens 64 --temperature 0.8 --top-k 40 --seed 1
    raygpt export --format hf CKPT OUT      # then transformers.GPT2LMHeadModel.from_pretrained(OUT)
    raygpt import --format hf IN CKPT

Registered by pipelines/cli.py; heavy imports (torch, tokenizers) happen inside the handlers so
`--help` stays fast. Does not: train models (`raygpt train`) or generate in bulk (`raygpt generate`).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from pipelines import console
from pipelines.errors import UserError

log = console.get_logger()

DTYPES = ("float32", "bfloat16", "float16")
_FORMATTER = argparse.RawDescriptionHelpFormatter


def _torch_dtype(name: str | None):
    if name is None:
        return None
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _add(sub, name: str, help: str, description: str, func) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description, formatter_class=_FORMATTER)
    p.set_defaults(func=func)
    return p


def register(subparsers) -> None:
    _register_tokenizer(subparsers)
    _register_init(subparsers)
    _register_sample(subparsers)
    _register_export_import(subparsers)


def _register_tokenizer(subparsers) -> None:
    tok = subparsers.add_parser("tokenizer", help="train tokenizers", formatter_class=_FORMATTER,
                                description="Tokenizer tools.\n\n"
                                "  raygpt tokenizer train --input 'data/*.txt' --vocab-size 4096 --out tokenizer.json\n\n"
                                "See `raygpt tokenizer train --help` for the options.")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="<tokenizer command>")
    tok.set_defaults(func=lambda args: (tok.print_help(), 2)[1])
    t = _add(tok_sub, "train", "train a byte-level BPE or char-level tokenizer on text files",
             "Train a tokenizer and save it as one JSON file (its id is that file's sha256).\n\n"
             "  raygpt tokenizer train --input 'data/*.txt' --vocab-size 4096 --out tokenizer.json\n"
             "  raygpt tokenizer train --input input.txt --kind char --out char.json", _tokenizer_train)
    t.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB",
                   help="text files, directories (all files below) or glob patterns ('**' allowed); UTF-8")
    t.add_argument("--vocab-size", type=int, default=None,
                   help="target vocabulary size incl. special tokens (required for --kind bpe; "
                        "a char vocabulary is the set of characters seen)")
    t.add_argument("--kind", choices=("bpe", "char"), default="bpe", help="tokenizer kind (default: bpe)")
    t.add_argument("--out", required=True, help="output tokenizer.json path")
    t.add_argument("--special", action="append", default=None, metavar="TOKEN",
                   help="special token, repeatable (default for bpe: <|endoftext|>; for char: none)")
    t.add_argument("--min-frequency", type=int, default=2, help="BPE: minimum pair count for a merge (default 2)")
    t.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _register_init(subparsers) -> None:
    i = _add(subparsers, "init", "write a randomly initialised checkpoint",
             "Build a GPT from a preset (vocab_size taken from the tokenizer) with random weights and\n"
             "save it as a raygpt checkpoint; --set overrides GPTConfig fields of the preset.\n\n"
             "  raygpt init runs/debug-ckpt --preset debug --tokenizer tokenizer.json --seed 0 --set n_layer=3",
             _init)
    i.add_argument("ckpt", metavar="CKPT", help="output checkpoint directory")
    i.add_argument("--preset", required=True,
                   help="model preset: debug, shakespeare-char, tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    i.add_argument("--tokenizer", required=True, help="tokenizer.json (from `raygpt tokenizer train`)")
    i.add_argument("--seed", type=int, default=0, help="torch seed for the initial weights (default 0)")
    i.add_argument("--overwrite", action="store_true", help="replace CKPT if it exists")
    i.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a GPTConfig field of the preset, repeatable (e.g. --set block_size=128)")


def _register_sample(subparsers) -> None:
    s = _add(subparsers, "sample", "generate text from a checkpoint",
             "Generate completions of one or more prompts with the gptcore engine (batched, KV cache).\n"
             "Every SamplingParams field is an option. Prints the completions, or JSON lines with --json.\n\n"
             "  raygpt sample CKPT --prompt 'ROMEO:' --max-new-tokens 64 --temperature 0.8 --top-k 40 --seed 1\n"
             "  raygpt sample CKPT --prompt 'Hello' --num-beams 5 --no-repeat-ngram-size 2 --json",
             _sample)
    s.add_argument("ckpt", metavar="CKPT", help="checkpoint directory")
    s.add_argument("--prompt", action="append", default=None,
                   help="prompt text, repeatable; '-' reads one prompt from stdin (default: '' )")
    s.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per completion (default 64)")
    s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; >0 scales logits (default 1.0)")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1 = off (default)")
    s.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="CTRL-style penalty > 0 on already-seen tokens; 1 = off (default)")
    s.add_argument("--copy-bias", type=float, default=0.0,
                   help="added to the logits of the prompt's tokens (extractive output); 0 = off (default)")
    s.add_argument("--no-repeat-ngram-size", type=int, default=0,
                   help="forbid repeating any n-gram of this size; 0 = off (default)")
    s.add_argument("--num-beams", type=int, default=1, help="beam search width; 1 = no beam search (default)")
    s.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search: score = logprob / length**penalty (default 1.0)")
    s.add_argument("--early-stopping", nargs="?", const="true", default="false", choices=("true", "false", "never"),
                   help="beam search stopping rule, as in transformers: true = stop once num_beams hypotheses "
                        "are finished; false (default) = heuristic; never = canonical beam search")
    s.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="stop string, repeatable; the output is cut before it")
    s.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID",
                   help="stop token id, repeatable")
    s.add_argument("--n", type=int, default=1, help="completions per prompt (default 1)")
    s.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same output)")
    s.add_argument("--logprobs", action="store_true", help="include per-token logprobs (with --json)")
    s.add_argument("--truncate", choices=("error", "left"), default="error",
                   help="a prompt longer than the context: error (default) or keep its last tokens")
    s.add_argument("--ignore-eos", action="store_true", help="keep generating past <|endoftext|>")
    s.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: as stored)")
    s.add_argument("--device", default="cpu", help="torch device (default cpu)")
    s.add_argument("--json", action="store_true",
                   help="print one JSON object per completion: prompt, index, text, token_ids, finish_reason")


def _register_export_import(subparsers) -> None:
    e = _add(subparsers, "export", "export a checkpoint to Hugging Face format",
             "Write a directory that transformers.GPT2LMHeadModel.from_pretrained(OUT) and\n"
             "AutoTokenizer.from_pretrained(OUT) load offline (safetensors, no pickles).\n\n"
             "  raygpt export --format hf runs/x/ckpt out/hf", _export)
    e.add_argument("--format", choices=("hf",), default="hf", help="target format (hf = Hugging Face GPT-2)")
    e.add_argument("ckpt", metavar="CKPT", help="raygpt checkpoint directory")
    e.add_argument("out", metavar="OUT", help="output directory")
    e.add_argument("--dtype", choices=DTYPES, default=None, help="weight dtype in the export (default: as stored)")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    m = _add(subparsers, "import", "import a Hugging Face GPT-2 directory as a checkpoint",
             "Convert a Hugging Face GPT-2 model directory (safetensors weights only; pickled\n"
             "pytorch_model.bin files are refused) into a verified raygpt checkpoint.\n\n"
             "  raygpt import --format hf path/to/hf-gpt2 runs/imported", _import)
    m.add_argument("--format", choices=("hf",), default="hf", help="source format (hf = Hugging Face GPT-2)")
    m.add_argument("src", metavar="IN", help="Hugging Face model directory (or hf://org/name, downloads)")
    m.add_argument("ckpt", metavar="CKPT", help="output checkpoint directory")
    m.add_argument("--tokenizer", default=None, help="raygpt tokenizer.json to use instead of IN's tokenizer")
    m.add_argument("--dtype", choices=DTYPES, default=None, help="weight dtype in the checkpoint (default: as stored)")
    m.add_argument("--overwrite", action="store_true", help="replace CKPT if it exists")


# ---- handlers -------------------------------------------------------------------------------


def _expand_inputs(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pat in patterns:
        p = Path(pat)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(q) for q in glob.glob(pat, recursive=True) if Path(q).is_file())
        if not found:
            raise UserError(f"--input {pat!r} matches no file; give existing text files, directories or globs")
        files.extend(found)
    return list(dict.fromkeys(files))  # de-duplicate, keep order


def _iter_texts(files: list[Path], chunk_chars: int = 1 << 20) -> Iterator[str]:
    """File contents in ~1 MiB pieces cut at line ends (the trainer wants many moderate strings)."""
    for f in files:
        buf: list[str] = []
        size = 0
        with open(f, encoding="utf-8", errors="replace", newline="") as fh:
            for line in fh:
                buf.append(line)
                size += len(line)
                if size >= chunk_chars:
                    yield "".join(buf)
                    buf, size = [], 0
        if buf:
            yield "".join(buf)


def _tokenizer_train(args) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it")
    files = _expand_inputs(args.input)
    from gptcore import tokenizer as tk

    if args.kind == "bpe":
        if args.vocab_size is None:
            raise UserError("--vocab-size is required for --kind bpe (e.g. --vocab-size 4096)")
        special = tuple(args.special) if args.special is not None else ("<|endoftext|>",)
        tok = tk.train_bpe(_iter_texts(files), vocab_size=args.vocab_size, special_tokens=special,
                           min_frequency=args.min_frequency)
    else:
        special = tuple(args.special or ())
        tok = tk.train_char(_iter_texts(files), special_tokens=special)
        if args.vocab_size is not None and args.vocab_size != tok.vocab_size:
            log.warning("char vocabulary has %d symbols (--vocab-size %d ignored)", tok.vocab_size, args.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(out)  # atomic: a temp file in the same directory, then a rename
    log.info("wrote %s: kind=%s vocab_size=%d id=%s from %d file(s)", out, tok.kind, tok.vocab_size, tok.id[:16],
             len(files))
    return 0


def _init(args) -> int:
    if Path(args.ckpt).exists() and not args.overwrite:
        raise UserError(f"{args.ckpt} already exists; choose a new path or pass --overwrite to replace it")
    import torch

    from gptcore.checkpoint import save_checkpoint
    from gptcore.config import ConfigError as ModelConfigError
    from gptcore.config import preset
    from gptcore.model import GPT
    from gptcore.tokenizer import Tokenizer

    if not Path(args.tokenizer).is_file():
        raise UserError(f"--tokenizer {args.tokenizer} does not exist; create one with `raygpt tokenizer train`")
    try:
        tok = Tokenizer.load(args.tokenizer)
    except ValueError as e:  # TokenizerError
        raise UserError(str(e)) from e
    overrides = _parse_overrides(args.overrides)
    if "vocab_size" in overrides and overrides["vocab_size"] != tok.vocab_size:
        raise UserError(f"vocab_size={overrides['vocab_size']} differs from the tokenizer's {tok.vocab_size}; "
                        f"drop the override")
    try:
        cfg = preset(args.preset, **{**overrides, "vocab_size": tok.vocab_size})
    except (ModelConfigError, TypeError) as e:
        raise UserError(str(e).replace("\n", " ")) from e
    torch.manual_seed(args.seed)
    model = GPT(cfg)
    path = save_checkpoint(args.ckpt, model, tok, {"step": 0, "tokens_seen": 0, "init": {
        "preset": args.preset, "seed": args.seed, "overrides": overrides}}, overwrite=args.overwrite)
    log.info("wrote %s: preset=%s params=%s vocab_size=%d", path, args.preset, f"{model.num_params():,}",
             cfg.vocab_size)
    return 0


def _parse_overrides(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like key=value (e.g. n_layer=2)")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _sample(args) -> int:
    if not Path(args.ckpt).exists():
        raise UserError(f"checkpoint {args.ckpt} does not exist; create one with `raygpt init` or `raygpt train`")
    from gptcore.sampling import SamplingParams

    prompts = args.prompt if args.prompt else [""]
    prompts = [sys.stdin.read() if p == "-" else p for p in prompts]
    # gptcore's errors (SamplingParamsError, CheckpointError, ...) are USER_ERRORS: pipelines/cli.py prints them
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, copy_bias=args.copy_bias,
        no_repeat_ngram_size=args.no_repeat_ngram_size, num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        early_stopping={"true": True, "false": False}.get(args.early_stopping, args.early_stopping),
        stop=tuple(args.stop),
        stop_token_ids=tuple(args.stop_token_id), n=args.n, seed=args.seed, logprobs=args.logprobs,
        truncate=args.truncate, ignore_eos=args.ignore_eos)
    from gptcore.engine import Engine, PromptTooLongError

    kw = {"dtype": _torch_dtype(args.dtype)} if args.dtype else {}
    engine = Engine.from_checkpoint(args.ckpt, device=args.device, **kw)
    try:
        results = engine.generate(prompts, params)
    except PromptTooLongError as e:
        raise UserError(f"{e} (pass --truncate left to keep the end of the prompt)") from e
    for res in results:
        for c in res.outputs:
            if args.json:
                rec = {"prompt": res.prompt, "index": c.index, "text": c.text, "token_ids": list(c.token_ids),
                       "finish_reason": c.finish_reason}
                if args.logprobs:
                    rec["logprobs"] = c.logprobs
                print(json.dumps(rec, ensure_ascii=False))
            else:
                if len(results) > 1 or len(res.outputs) > 1:
                    print(f"--- prompt {results.index(res)} completion {c.index} ({c.finish_reason})")
                print(res.prompt + c.text)
    return 0


def _export(args) -> int:
    from gptcore.checkpoint import export_hf

    out = export_hf(args.ckpt, args.out, overwrite=args.overwrite, dtype=_torch_dtype(args.dtype))
    log.info("wrote %s (Hugging Face GPT-2: GPT2LMHeadModel.from_pretrained(%r))", out, str(out))
    return 0


def _import(args) -> int:
    from gptcore.checkpoint import import_hf

    out = import_hf(args.src, args.ckpt, tokenizer=args.tokenizer, overwrite=args.overwrite,
                    dtype=_torch_dtype(args.dtype))
    log.info("wrote %s (raygpt checkpoint imported from %s)", out, args.src)
    return 0
