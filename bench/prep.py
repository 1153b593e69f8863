"""Whole data-prep pipeline throughput (wall time incl. Python + Ray start) vs bare HF `encode_batch`.

    .venv/bin/python bench/prep.py [--mb 64] [--repeats 3] [--variants core,clean] [--write-md]
    .venv/bin/python bench/prep.py --mb 64 --scale 1,4,16 --variants clean [--repeats 1] [--write-md]

Builds --mb MB (to the next whole document) of English JSONL documents from ../shared/data
(books/speeches cut into ~4 KB documents, news and science articles as they are; cycled, each cycle's
copies prefixed with "Copy k." so exact dedup keeps them), trains one BPE tokenizer (8192, not timed), then alternates,
--repeats times: (a) the peer, `tokenizers.Tokenizer.encode_batch` over the same documents with
RAYON_NUM_THREADS=2 in a fresh process (encode time only, text already in memory), and (b) each
pipeline variant as `raygpt prep` in a fresh process with its own local Ray (2 CPUs), timed from
process start to exit, peak RSS summed over its process tree (sampled every 50 ms). Variants:
  core  = read -> tokenize (tiktoken) -> pack -> write shards + manifest
  clean = core + normalize_whitespace, gopher_quality, exact_dedup, fuzzy_dedup (cycled copies are
          near-duplicates, so fuzzy dedup removes them: MB/s still counts input MB)
Prints medians of MB/s, the ratio pipeline / peer, per-step throughput (from timings.json, per
core) and peak RSS. --write-md replaces the "## Data prep" section of BENCHMARKS.md.
--scale 1,4,16 runs every variant on corpora of 1x, 4x and 16x --mb and reports, per size, wall, MB/s
and peak RSS per process: the driver (the `raygpt prep` process), the largest Ray worker (processes
under the raylet) and the rest (GCS, raylet, dashboard), sampled with psutil every 50 ms, and for the
driver and the largest worker also without shared pages (RSS - shared: what is left once the Ray object
store's pages a process has mapped are taken out, since those count in its RSS); it prints
the load averages (`uptime`) at start and end, and --write-md writes "## Data prep at scale".
Does not: measure the cleaning steps alone (bench/steps.py does).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("RAYGPT_SHARED_DATA", REPO.parent / "shared" / "data"))
MB = 1 << 20


def english_docs() -> list[str]:
    """Unique English documents from ../shared/data (~17 MB)."""
    docs: list[str] = []
    files = [*sorted((SHARED / "gutenberg").glob("*.txt")), SHARED / "tinyshakespeare/input.txt",
             *sorted((SHARED / "wikitext-2").glob("*.txt"))]
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        cur, size = [], 0
        for para in text.split("\n\n"):
            cur.append(para)
            size += len(para) + 2
            if size >= 4000:
                docs.append("\n\n".join(cur))
                cur, size = [], 0
        if cur:
            docs.append("\n\n".join(cur))
    for folder, field in (("us-presidential-addresses", "text"), ("bbc-news-summary", "article"),
                          ("cnndm-frank", "article"), ("xsum-frank", "article"), ("scitldr", "article")):
        for p in sorted((SHARED / folder).glob("*.jsonl")):
            for line in p.open(encoding="utf-8"):
                rec = json.loads(line)
                t = rec.get(field)
                if isinstance(t, list):
                    t = "\n".join(map(str, t))
                if isinstance(t, str) and t.strip():
                    docs.append(t)
    return docs


def build_corpus(d: Path, target_mb: float) -> tuple[Path, int]:
    base = english_docs()
    path = d / "corpus.jsonl"
    size, k = 0, 0
    with path.open("w", encoding="utf-8") as f:
        while size < target_mb * MB:
            for t in base:
                t = f"Copy {k}. {t}" if k else t
                f.write(json.dumps({"text": t}) + "\n")
                size += len(t.encode())
                if size >= target_mb * MB:  # stop mid-cycle: --mb 0.5 is a valid (tiny) size
                    break
            k += 1
    return path, size


PEER = r"""
import json, os, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
docs = [json.loads(l)["text"] for l in open(sys.argv[2], encoding="utf-8")]
# chunks of 8,192 documents: one call over a 1 GB corpus holds every Encoding (offsets, masks) at once and
# is OOM-killed; a chunk is still thousands of documents per call, enough to keep both threads busy
dt, tokens = 0.0, 0
for i in range(0, len(docs), 8192):
    t0 = time.perf_counter()
    enc = tok.encode_batch(docs[i:i + 8192])
    dt += time.perf_counter() - t0
    tokens += sum(len(e.ids) for e in enc)
    del enc
print(json.dumps({"seconds": dt, "tokens": tokens}))
"""


def run_peer(tok: Path, corpus: Path) -> dict:
    env = {**os.environ, "RAYON_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "true"}
    out = subprocess.run([sys.executable, "-c", PEER, str(tok), str(corpus)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _roles(pid: int) -> dict[int, tuple[str, int, int]]:
    """pid -> (role, rss, private) for the prep process tree: driver, worker (a child of the raylet), other.
    private = rss - shared pages (mostly the Ray object store's pages the process has mapped)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    raylets = {p.pid for p in procs if _name(p) == "raylet"}
    out = {}
    for p in procs:
        try:
            role = "driver" if p.pid == pid else "worker" if p.ppid() in raylets else "other"
            mi = p.memory_info()
            out[p.pid] = (role, mi.rss, mi.rss - mi.shared)
        except psutil.NoSuchProcess:
            pass
    return out


def _name(p) -> str:
    try:
        return p.name()
    except Exception:
        return ""


class RssSampler:
    """Peak RSS of the whole tree (summed per sample) and of every single process, by role."""

    def __init__(self, pid: int):
        self.pid, self.peak_tree = pid, 0
        self.peak: dict[int, tuple[str, int]] = {}
        self.private: dict[int, tuple[str, int]] = {}

    def sample(self) -> None:
        now = _roles(self.pid)
        self.peak_tree = max(self.peak_tree, sum(r for _, r, _ in now.values()))
        for pid, (role, rss, priv) in now.items():
            if rss > self.peak.get(pid, (role, 0))[1]:
                self.peak[pid] = (role, rss)
            if priv > self.private.get(pid, (role, 0))[1]:
                self.private[pid] = (role, priv)

    def by_role(self) -> dict[str, int]:
        """driver: its peak; worker: the largest single worker's peak; other: the sum of the others' peaks."""
        out = {"driver": 0, "worker": 0, "workers": 0, "other": 0}
        for role, rss in self.peak.values():
            if role == "other":
                out["other"] += rss
            else:
                out[role] = max(out[role], rss)
                out["workers"] += rss if role == "worker" else 0
        for role, priv in self.private.values():  # the same without shared (object store) pages
            if role != "other":
                out[f"{role}_private"] = max(out.get(f"{role}_private", 0), priv)
        return out


def run_pipeline(cfg: Path) -> dict:
    cmd = [sys.executable, "-m", "pipelines.cli", "prep", "--config", str(cfg), "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "RAY_ADDRESS": ""})
    sampler = RssSampler(proc.pid)
    import threading

    err: list[bytes] = []
    th = threading.Thread(target=lambda: err.append(proc.stderr.read()))
    th.start()
    while proc.poll() is None:
        sampler.sample()
        time.sleep(0.05)
    peak = sampler.peak_tree
    wall = time.perf_counter() - t0
    th.join()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # Ray processes left by the run (its session only)
    except ProcessLookupError:
        pass
    if proc.returncode != 0:
        raise RuntimeError(f"prep failed ({proc.returncode}):\n{err[0].decode(errors='replace')[-4000:]}")
    return {"wall": wall, "peak_rss": peak, "rss": sampler.by_role(), "stderr": err[0].decode(errors="replace")}


VARIANT_STEPS = {
    "core": "[]",
    "clean": "[{name: normalize_whitespace}, {name: gopher_quality}, {name: exact_dedup}, {name: fuzzy_dedup}]",
}


def write_config(d: Path, variant: str, corpus: Path, tok: Path) -> Path:
    cfg = d / f"prep-{variant}.yaml"
    cfg.write_text(f"""
name: bench-{variant}
output: {d / ('out-' + variant)}
progress: false
num_cpus: 2
inputs: [{{path: {corpus}}}]
steps: {VARIANT_STEPS[variant]}
tokenizer: {{kind: load, path: {tok}}}
pack: {{block_size: 1024, val_fraction: 0.01}}
write: {{shard_mb: 64}}
""")
    return cfg


def train_tokenizer(d: Path, corpus: Path) -> Path:
    tok_path = d / "tokenizer.json"
    if not tok_path.exists():
        from gptcore.tokenizer import train_bpe

        docs = [json.loads(l)["text"] for _, l in zip(range(4000), corpus.open(encoding="utf-8"))]
        train_bpe(docs, 8192).save(tok_path)
    return tok_path


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def run_scale(args: argparse.Namespace, variants: list[str], d: Path) -> None:
    """Every variant at --mb x each scale: wall, MB/s, peak RSS of driver / largest worker / the rest."""
    scales = [float(x) for x in args.scale.split(",") if x]
    load_start = _uptime()
    print(f"start: {load_start}", flush=True)
    rows = []
    tok_path = None
    for sc in scales:
        sd = d / f"x{sc:g}"
        sd.mkdir(parents=True, exist_ok=True)
        corpus, size = build_corpus(sd, args.mb * sc)
        tok_path = tok_path or train_tokenizer(d, corpus)
        mbs = size / MB
        for v in variants:
            cfg = write_config(sd, v, corpus, tok_path)
            rs, phases = [], []
            for _ in range(args.repeats):
                rs.append(run_pipeline(cfg))
                phases.append(_barrier_phases(sd / f"out-{v}" / "timings.json"))
            wall = statistics.median(r["wall"] for r in rs)
            rss = {k: statistics.median(r["rss"][k] for r in rs) / MB for k in rs[0]["rss"]}
            tree = statistics.median(r["peak_rss"] for r in rs) / MB
            ph = {k: statistics.median(p.get(k, 0.0) for p in phases) for k in phases[0]}
            rows.append({"scale": sc, "mb": mbs, "variant": v, "wall": wall, "mb_s": mbs / wall, "tree": tree,
                         "phases": ph, **rss})
            print(f"x{sc:g} ({mbs:.1f} MB) {v}: {wall:.1f}s wall, {mbs / wall:.2f} MB/s, peak RSS MiB: driver "
                  f"{rss['driver']:.0f}, largest worker {rss['worker']:.0f}, all workers {rss['workers']:.0f}, "
                  f"other Ray {rss['other']:.0f}, whole tree {tree:.0f}; without shared pages: driver "
                  f"{rss.get('driver_private', 0):.0f}, largest worker {rss.get('worker_private', 0):.0f}", flush=True)
            if ph:
                print("  dedup barrier phases (s): " + ", ".join(f"{k} {x:.1f}" for k, x in ph.items()), flush=True)
        shutil.rmtree(sd, ignore_errors=True)
    load_end = _uptime()
    print(f"end: {load_end}", flush=True)
    for v in variants:
        vr = [r for r in rows if r["variant"] == v]
        if len(vr) > 1:
            print(f"{v}: driver peak x{vr[-1]['scale']:g}/x{vr[0]['scale']:g} = {vr[-1]['driver'] / vr[0]['driver']:.2f}, "
                  f"largest worker {vr[-1]['worker'] / vr[0]['worker']:.2f}, tree {vr[-1]['tree'] / vr[0]['tree']:.2f}; "
                  f"MB/s x{vr[-1]['scale']:g}/x{vr[-2]['scale']:g} = {vr[-1]['mb_s'] / vr[-2]['mb_s']:.2f}")
    if args.write_md:
        argv = re.sub(r"\s*--workdir\s+\S+", "", " ".join(sys.argv[1:]))
        write_scale_md(rows, argv, load_start, load_end)


def _barrier_phases(path: Path) -> dict[str, float]:
    """The dedup barrier's phases from a run's timings.json: seconds (segment<i>_<phase>_s, summed over
    barriers) and the largest worker peak RSS by the end of each task phase (<phase> peak MiB)."""
    if not path.exists():
        return {}
    out: dict[str, float] = {}
    for k, x in json.loads(path.read_text()).get("timings", {}).items():
        m = re.fullmatch(r"segment\d+_(\w+?)_s", k)
        if m and isinstance(x, (int, float)):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(x)
        m = re.fullmatch(r"segment\d+_(\w+?)_worker_peak_mib", k)  # largest worker peak by the end of a phase
        if m and isinstance(x, (int, float)):
            out[m.group(1) + " peak MiB"] = max(out.get(m.group(1) + " peak MiB", 0.0), float(x))
    return out


GENERATED_END = "<!-- end of the table bench/prep.py --scale --write-md writes; notes below are kept -->"


def write_scale_md(rows: list[dict], argv: str, load_start: str, load_end: str) -> None:
    path = REPO / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    table = ["| variant | input MB | wall s | MB/s | driver MiB | largest worker MiB | all workers MiB | "
             "other Ray MiB | tree MiB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        table.append(f"| `{r['variant']}` | {r['mb']:.0f} | {r['wall']:.1f} | {r['mb_s']:.2f} | {r['driver']:.0f} | "
                     f"{r['worker']:.0f} | {r['workers']:.0f} | {r['other']:.0f} | {r['tree']:.0f} |")
    names = list(dict.fromkeys(k for r in rows for k in r.get("phases", {})))
    if names:
        table += ["", "Where the dedup barrier's time goes (s; and the largest worker peak RSS by the end of each task phase, "
                  "MiB: workers are reused, so a phase's peak includes what ran before it; from timings.json):", "",
                  "| variant | input MB | " + " | ".join(names) + " |", "| --- | ---: |" + " ---: |" * len(names)]
        table += [f"| `{r['variant']}` | {r['mb']:.0f} | " + " | ".join(f"{r['phases'].get(k, 0):.1f}" for k in names)
                  + " |" for r in rows]
    section = "\n".join([
        "## Data prep at scale", "",
        f"Command: `.venv/bin/python bench/prep.py {argv}`. Peak RSS per process sampled with psutil every 50 ms "
        "(driver = the `raygpt prep` process; workers = the raylet's children; other = GCS, raylet, dashboard). "
        f"Load at start: `{load_start}`; at end: `{load_end}`.", "", *table, ""])
    # the generated part ends at GENERATED_END; notes written by hand after it survive a re-run
    section += "\n" + GENERATED_END
    gen = re.compile(r"^## Data prep at scale\n.*?" + re.escape(GENERATED_END), re.S | re.M)
    pat = re.compile(r"^## Data prep at scale\n.*?(?=^## |\Z)", re.S | re.M)
    if gen.search(text):
        text = gen.sub(lambda _m: section, text)
    elif pat.search(text):
        text = pat.sub(lambda _m: section + "\n\n", text)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
    print(f"updated {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=64.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="core,clean")
    ap.add_argument("--workdir", default="")
    ap.add_argument("--write-md", action="store_true")
    ap.add_argument("--scale", default="", help="multiples of --mb, e.g. 1,4,16: memory and MB/s as the input grows")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    d = Path(args.workdir or tempfile.mkdtemp(prefix="raygpt-bench-prep-"))
    d.mkdir(parents=True, exist_ok=True)
    if args.scale:
        run_scale(args, variants, d)
        return
    corpus, size = build_corpus(d, args.mb)
    tok_path = train_tokenizer(d, corpus)
    cfgs = {v: write_config(d, v, corpus, tok_path) for v in variants}
    mbs = size / MB
    print(f"corpus: {mbs:.1f} MB of English text ({corpus}), tokenizer BPE 8192", flush=True)
    peer, runs = [], {v: [] for v in variants}
    for r in range(args.repeats):
        p = run_peer(tok_path, corpus)
        peer.append(mbs / p["seconds"])
        print(f"[{r}] peer encode_batch (2 threads): {peer[-1]:.2f} MB/s ({p['tokens']} tokens)", flush=True)
        for v in variants:
            res = run_pipeline(cfgs[v])
            res["mb_s"] = mbs / res["wall"]
            res["ratio"] = res["mb_s"] / peer[-1]
            timings = json.loads((d / f"out-{v}" / "timings.json").read_text())
            res["timings"] = timings
            runs[v].append(res)
            print(f"[{r}] pipeline {v}: {res['wall']:.1f}s wall = {res['mb_s']:.2f} MB/s, ratio {res['ratio']:.2f}, "
                  f"peak RSS {res['peak_rss'] / MB:.0f} MiB, phases {timings['timings']}", flush=True)
    med_peer = statistics.median(peer)
    lines = []
    lines.append(f"peer (HF tokenizers encode_batch, 2 threads): median {med_peer:.2f} MB/s")
    summary = {}
    for v in variants:
        rs = runs[v]
        mb_s = statistics.median(r["mb_s"] for r in rs)
        ratio = statistics.median(r["ratio"] for r in rs)
        rss = statistics.median(r["peak_rss"] for r in rs) / MB
        wall = statistics.median(r["wall"] for r in rs)
        steps = {}
        for name in rs[0]["timings"]["steps"]:
            vals = [r["timings"]["steps"][name]["mb_per_s"] for r in rs if r["timings"]["steps"][name]["mb_per_s"]]
            if vals:
                steps[name] = statistics.median(vals)
        phases = {k: statistics.median(r["timings"]["timings"].get(k, 0) for r in rs)
                  for k in rs[0]["timings"]["timings"]}
        summary[v] = {"wall": wall, "mb_s": mb_s, "ratio": ratio, "rss": rss, "steps": steps, "phases": phases}
        lines.append(f"pipeline {v}: median {wall:.1f}s wall, {mb_s:.2f} MB/s, ratio vs peer {ratio:.2f}x, "
                     f"peak RSS {rss:.0f} MiB")
        lines.append("  per-step MB/s per core (median): " + ", ".join(f"{k} {x:.1f}" for k, x in steps.items()))
        lines.append("  phases s (median): " + ", ".join(f"{k} {x:.1f}" for k, x in phases.items()))
    print("\n".join(lines))
    if args.write_md:
        argv = re.sub(r"\s*--workdir\s+\S+", "", " ".join(sys.argv[1:]))
        write_md(mbs, args.repeats, med_peer, summary, argv, os.getloadavg()[0])


def write_md(mbs: float, repeats: int, peer: float, summary: dict, argv: str, load: float) -> None:
    path = REPO / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    rows = ["| variant | wall s | MB/s | vs encode_batch (2 thr) | peak RSS MiB |", "| --- | ---: | ---: | ---: | ---: |"]
    rows.append(f"| peer: HF `encode_batch`, 2 threads | - | {peer:.2f} | 1.00x | - |")
    for v, s in summary.items():
        rows.append(f"| pipeline `{v}` | {s['wall']:.1f} | {s['mb_s']:.2f} | {s['ratio']:.2f}x | {s['rss']:.0f} |")
    steps = []
    for v, s in summary.items():
        steps.append(f"- `{v}` per-step MB/s per core: " + ", ".join(f"{k} {x:.1f}" for k, x in s["steps"].items())
                     + "; phases (s): " + ", ".join(f"{k} {x:.1f}" for k, x in s["phases"].items()))
    section = "\n".join([
        "## Data prep", "",
        f"Command: `.venv/bin/python bench/prep.py {argv}`. Corpus: {mbs:.1f} MB of English JSONL built from "
        "../shared/data (cycled). Pipeline wall time includes Python start, `ray.init` (local, 2 CPUs), reading, "
        "tokenizing (tiktoken), packing and writing shards + manifest; the peer is `tokenizers` `encode_batch` "
        f"on the same documents with 2 Rayon threads (encode time only). Medians of {repeats} alternating runs; "
        "ratio = pipeline MB/s / peer MB/s of the same round. Machine: 2 cores shared with other jobs "
        f"(load average {load:.0f} at the end of the run: absolute MB/s are far below an idle machine's, compare "
        "the ratios). `clean` drops the cycled copies as near-duplicates, so it tokenizes less than it reads.", "",
        *rows, "", *steps, ""])
    pat = re.compile(r"^## Data prep\n.*?(?=^## |\Z)", re.S | re.M)
    text = pat.sub(section + "\n", text) if pat.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
    print(f"updated {path}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import run_main  # bench/ is not a package: its folder goes on sys.path

    sys.exit(run_main("prep", main))
