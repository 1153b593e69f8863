"""Generation speed: the gptcore engine vs Hugging Face `transformers` generate, on the same weights.

    .venv/bin/python bench/generate.py [--shapes tiny,gpt2] [--dtypes float32[,bfloat16]] [--batches 1,16]
                                       [--repeats 5] [--threads N] [--kernel auto] [--json out.json]

For each shape (tiny: 4 layers, n_embd 128, vocab 4096; gpt2: GPT-2 small 12/12/768, vocab 50257; random
init), builds one gptcore GPT, converts it with gptcore.checkpoint.to_hf_state_dict/hf_config_dict
into a transformers.GPT2LMHeadModel, and times greedy decoding of a batch of random 16-token prompts
+ 128 new tokens (no EOS: every row generates all 128) with both, interleaved (ours, HF, HF, ours, ...)
so machine noise hits both alike. bf16: our engine casts (and packs) the weights to bf16; HF runs
`model.to(torch.bfloat16)`. Prints a table of median tokens/s over the repeats (wall clock), the
ratio of medians, the ratio of median process CPU times (HF / ours: robust when other jobs share the
CPU, exact with --threads 1), and whether the greedy tokens of the two are identical.

Physical limit: the same run measures the machine's memory bandwidth (best of 5 copies of a 1 GiB
tensor, bench/common.py) and reports, per row, the weight bytes our engine moves per second (tokens/s
/ batch x parameter bytes: each decode step reads every weight once) divided by that bandwidth. At
batch 1 decoding is bound by that read, so this is how close to the machine's limit we are.
Load averages at start and end, CPU model and threads go to runs/bench/summary.json ("generate").

Does not: assert anything, write files (unless --json; and the summary), or time prefill separately from decode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from common import memory_bandwidth_gbs, print_conditions, record  # noqa: E402 - bench/ is not a package

SHAPES = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=4096, block_size=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024),
}


def build(shape: str):
    import torch
    import transformers

    from gptcore.checkpoint import hf_config_dict, to_hf_state_dict
    from gptcore.config import GPTConfig
    from gptcore.model import GPT

    torch.manual_seed(0)
    cfg = GPTConfig(**SHAPES[shape], name=shape)
    model = GPT(cfg).eval()
    hf_cfg = {k: v for k, v in hf_config_dict(cfg).items() if k != "architectures"}
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_cfg))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    assert not unexpected and all(".attn." in k for k in missing), (missing, unexpected)
    return model, hf.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny,gpt2")
    ap.add_argument("--dtypes", default="", help="default: float32,bfloat16 where the CPU runs bf16 natively "
                    "(AVX512-BF16 / AMX), else float32 (emulated bf16 takes HF many minutes per row)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--kernel", default="auto", help="Engine kernel: auto | onednn | torch | model")
    ap.add_argument("--json", default="", help="also write the rows as JSON to this file")
    args = ap.parse_args()

    import torch
    import transformers

    from gptcore.engine import Engine
    from gptcore.sampling import SamplingParams

    transformers.logging.set_verbosity_error()
    if not args.dtypes:
        from pipelines.train.bf16 import cpu_bf16_ok

        args.dtypes = "float32,bfloat16" if cpu_bf16_ok() else "float32"
        if args.dtypes == "float32":
            print("bf16 rows skipped: this CPU has no native bf16 (AVX512-BF16 / AMX); --dtypes float32,bfloat16 "
                  "runs them emulated", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = print_conditions("generate", {"ours": torch.get_num_threads(), "hf": torch.get_num_threads()})
    bw = memory_bandwidth_gbs()
    print(f"memory bandwidth (torch copy_, 1 GiB, best of 5): {bw:.1f} GB/s", flush=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"kernel {args.kernel}, prompt {args.prompt_len} + {args.new_tokens} new tokens, greedy, "
          f"median of {args.repeats} runs", flush=True)
    header = (f"| {'shape':5} | {'dtype':8} | {'batch':>5} | {'ours tok/s':>10} | {'HF tok/s':>9} | {'ratio':>6} | "
              f"{'CPU ratio':>9} | identical | {'weights GB/s':>12} | {'of bw':>6} |")
    rows, lines = [], [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for shape in args.shapes.split(","):
        model, hf_fp32 = build(shape)
        V = model.config.vocab_size
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            hf = hf_fp32 if dtype == torch.float32 else build(shape)[1].to(dtype)
            engine = Engine(model, None, dtype=dtype, max_batch_size=64, kernel=args.kernel)
            params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
            for B in [int(b) for b in args.batches.split(",")]:
                g = torch.Generator().manual_seed(B)
                prompts = torch.randint(0, V, (B, args.prompt_len), generator=g)
                plist = prompts.tolist()

                def ours():
                    out = engine.generate(plist, params)
                    return [o.outputs[0].token_ids for o in out]

                def theirs():
                    with torch.inference_mode():
                        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                          max_new_tokens=args.new_tokens, pad_token_id=0)
                    return out[:, args.prompt_len:].tolist()

                ours(), theirs()  # warm-up (allocations, oneDNN primitive creation)
                t_ours, t_hf, c_ours, c_hf = [], [], [], []
                for r in range(args.repeats):
                    for who in ((ours, theirs) if r % 2 == 0 else (theirs, ours)):
                        t, c = time.perf_counter(), time.process_time()
                        toks = who()
                        dt, dc = time.perf_counter() - t, time.process_time() - c
                        if who is ours:
                            t_ours.append(dt)
                            c_ours.append(dc)
                            ours_toks = toks
                        else:
                            t_hf.append(dt)
                            c_hf.append(dc)
                            hf_toks = toks
                n_tok = B * args.new_tokens
                assert all(len(t) == args.new_tokens for t in ours_toks)
                ours_tps = n_tok / statistics.median(t_ours)
                hf_tps = n_tok / statistics.median(t_hf)
                cpu_ratio = statistics.median(c_hf) / statistics.median(c_ours)
                same = ours_toks == hf_toks
                agree = sum(a == b for x, y in zip(ours_toks, hf_toks) for a, b in zip(x, y)) / n_tok
                row = dict(shape=shape, dtype=dtype_name, batch=B, ours_tok_s=round(ours_tps, 1),
                           hf_tok_s=round(hf_tps, 1), ratio=round(ours_tps / hf_tps, 2),
                           cpu_time_ratio=round(cpu_ratio, 2), identical=same,
                           token_agreement=round(agree, 4), ours_runs_s=[round(t, 3) for t in t_ours],
                           hf_runs_s=[round(t, 3) for t in t_hf], ours_cpu_s=[round(t, 3) for t in c_ours],
                           hf_cpu_s=[round(t, 3) for t in c_hf], kernel=engine.kernel,
                           threads=torch.get_num_threads())
                rows.append(row)
                # each decode step reads every weight once, whatever the batch: bytes/s = steps/s x weight bytes
                wbytes = sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
                weights_gbs = ours_tps / B * wbytes / 1e9
                row.update(weight_bytes=wbytes, weights_gb_s=round(weights_gbs, 2), bandwidth_gb_s=round(bw, 2),
                           fraction_of_bandwidth=round(weights_gbs / bw, 3))
                ident = "yes" if same else f"no ({agree:.0%})"
                line = (f"| {shape:5} | {dtype_name:8} | {B:>5} | {ours_tps:>10,.0f} | {hf_tps:>9,.0f} | "
                        f"{ours_tps / hf_tps:>5.2f}x | {cpu_ratio:>8.2f}x | {ident:9} | {weights_gbs:>12.1f} | "
                        f"{weights_gbs / bw:>5.0%} |")
                lines.append(line)
                print(line, flush=True)
    print()
    print("\n".join(lines))
    record("generate", {"bandwidth_gb_s": round(bw, 2), "rows": rows}, start)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
