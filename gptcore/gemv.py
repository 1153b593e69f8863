"""The decode matmul kernel (gptcore/gemv.c): built once with the system C compiler, loaded with ctypes.

    from gptcore import gemv
    if gemv.available():                        # x86-64 with AVX2 + FMA, a C compiler, RAYGPT_GEMV != "0"
        y = gemv.linear(x, w, b, gelu=1)        # x (M, K) fp32, w (N, K) fp32 or bf16, b (N,) fp32 | None
        f = gemv.bind(w, b); y = f(x, 1)        # the same, checked once: what the engine calls per step
        t = gemv.tile(w_bf16); f = gemv.bind(t)  # bf16 weights in the kernel's tiled layout (streams faster)
        step = gemv.bind_blocks(blocks, n_head, eps, gelu); step(x, pos, k, v)  # all blocks of a decode step
    gemv.why_unavailable()                      # "" or the reason (no compiler, CPU without AVX2, ...)

Why a hand-written kernel: a decode step multiplies a few rows by every weight once, so it runs at
the speed the weights stream from memory; the GEMM libraries torch calls (oneDNN, MKL) are built for
reuse and, on the AVX2 machines measured (BENCHMARKS.md, "Decoding"), stream the weights at 60-75%
of what a plain row-by-row dot product reaches, from 1 to 16 rows. Above `MAX_ROWS` rows (prefill)
the product is compute-bound and torch's GEMM is the better choice; gptcore.engine_forward switches.

Building: `gemv.c` is compiled on first use into a shared library under the kernel cache
($RAYGPT_KERNEL_CACHE, else $XDG_CACHE_HOME/raygpt/kernels, else ~/.cache/raygpt/kernels), named by
a hash of the source, the flags and the compiler, and written atomically (concurrent processes on
one node each compile and rename; the last rename wins, every file is whole). ~0.3 s; later
processes load the cached file. It uses OpenMP: once torch is imported, the dynamic loader resolves
libgomp.so.1 to torch's own copy, so the kernel shares torch's thread pool; each call passes
torch.get_num_threads().

Does not: run on GPUs, non-x86 CPUs or without a C compiler (callers fall back to oneDNN / torch:
`available()` is False and `why_unavailable()` says why), or handle strided inputs (callers pass
contiguous tensors).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["MAX_ROWS", "TiledBF16", "argmax", "available", "why_unavailable", "bind", "bind_blocks", "linear",
           "tile", "cache_dir"]

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
# above this many rows a product is compute-bound and torch's GEMM wins (measured: BENCHMARKS.md)
MAX_ROWS = 24
# below this many multiply-adds one thread is faster than waking the other (fork/join costs ~µs)
_PARALLEL_MIN = 1 << 17

_lock = threading.Lock()
_fn: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]  # ctypes' private base class
_blocks_fn: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]
_argmax_fn: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]
_rows_fn: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]
_why: str | None = None  # None: not tried yet; "": loaded


def cache_dir() -> Path:
    if os.environ.get("RAYGPT_KERNEL_CACHE"):
        return Path(os.environ["RAYGPT_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "raygpt" / "kernels"


def _cpu_problem() -> str:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU is {platform.machine()}, not x86-64"
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2 (torch reports {cap})"
    try:  # torch's AVX2 level implies FMA on every CPU it knows; check where the kernel can tell
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "" if " fma" in line else "the CPU lacks FMA"
    except OSError:
        pass
    return ""


def _build() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc or gcc on PATH, or $CC)")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(FLAGS).encode() + compiler.encode()).hexdigest()[:16]
    out = cache_dir() / f"gemv-{key}.so"
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return _compile(compiler, out)
    except OSError:  # a read-only home (containers): a private folder under the temp dir
        out = Path(tempfile.gettempdir()) / f"raygpt-kernels-{os.getuid()}" / out.name
        out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = out.parent.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o022:  # someone else's folder: never load their code
            raise RuntimeError(f"{out.parent} is not a private folder of this user") from None
        if out.exists():
            return out
        return _compile(compiler, out)


def _compile(compiler: str, out: Path) -> Path:
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, out)  # atomic: a concurrent loader sees no file or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> str:
    """Build and load the kernel; return "" or why it is unavailable."""
    global _fn, _blocks_fn, _argmax_fn, _rows_fn
    if os.environ.get("RAYGPT_GEMV", "1") == "0":
        return "disabled by RAYGPT_GEMV=0"
    problem = _cpu_problem()
    if problem:
        return problem
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return f"could not build or load {SOURCE.name}: {e}"
    fn = lib.raygpt_linear
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 3
    fn.restype = ctypes.c_int
    fb = lib.raygpt_decode_blocks
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fb.argtypes = [ptr, i64, i64, i64, i64, ptr, i64, ptr, ptr, ptr, ctypes.c_int, ctypes.c_int, ctypes.c_float, ptr,
                   ctypes.c_int]
    fb.restype = ctypes.c_int
    fa, fr = lib.raygpt_argmax, lib.raygpt_tiled_rows
    fa.argtypes = [ptr, i64, i64, ptr]
    fr.argtypes = [ptr, i64, i64, ptr, i64, ptr]
    fa.restype = fr.restype = ctypes.c_int
    _fn, _blocks_fn, _argmax_fn, _rows_fn = fn, fb, fa, fr
    return ""


def why_unavailable() -> str:
    global _why
    if _why is None:
        with _lock:
            if _why is None:
                _why = _load()
    return _why


def available() -> bool:
    return why_unavailable() == ""


class TiledBF16:
    """A bf16 weight (N, K) in the kernel's tiled layout: rows in blocks of 8 and, inside a block, the 8
    rows' values of every 16 columns side by side (128 bf16, 256 bytes); the N % 8 rows after the last
    whole block keep the plain row layout. K must be a multiple of 16.

    Why: a one-row product reads a block of 8 rows at once. Plain bf16 rows of GPT-2 small are only
    1,536 bytes, and 8 such interleaved streams were measured to come from memory 11-18% slower than the
    same bytes read in one sequence (AMD Zen 3, BENCHMARKS.md "Decoding"); tiled, each block is one
    sequential read. Not a torch.Tensor on purpose: element [n, k] is not at n * K + k, so torch ops
    must go through `untile()` (a plain copy, for prefill's GEMM) or `rows()` (embedding lookups)."""

    __slots__ = ("data", "shape", "dtype", "device", "_kpart")

    def __init__(self, w: torch.Tensor):
        if w.dim() != 2 or w.dtype != torch.bfloat16 or w.device.type != "cpu" or w.shape[1] % 16:
            raise ValueError(f"TiledBF16: needs a (N, K) bf16 CPU tensor with K a multiple of 16; got "
                             f"{tuple(w.shape)} {w.dtype} on {w.device}")
        N, K = w.shape
        n8 = N - N % 8
        head = w[:n8].reshape(n8 // 8, 8, K // 16, 16).permute(0, 2, 1, 3).reshape(-1)
        self.data = torch.cat([head, w[n8:].reshape(-1)])  # (N * K,) one buffer, the kernel's layout
        self.shape, self.dtype, self.device = torch.Size((N, K)), torch.bfloat16, w.device
        k = torch.arange(K)
        self._kpart = (k // 16) * 128 + k % 16  # (K,) column k's offset inside its block

    def data_ptr(self) -> int:
        return self.data.data_ptr()

    def numel(self) -> int:
        return self.data.numel()

    def untile(self) -> torch.Tensor:
        """The weight in the plain (N, K) layout (a new tensor)."""
        N, K = self.shape
        n8 = N - N % 8
        head = self.data[:n8 * K].view(n8 // 8, K // 16, 8, 16).permute(0, 2, 1, 3).reshape(n8, K)
        return head if n8 == N else torch.cat([head, self.data[n8 * K:].view(N - n8, K)])

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` (any shape, int64) -> (*idx.shape, K) fp32: F.embedding(idx, plain weight), widened.
        One C call when the kernel is loaded (a decode step's embedding: µs instead of ~0.1 ms of ATen ops)."""
        N, K = self.shape
        fn = _rows_fn
        if fn is not None and idx.dtype == torch.int64:
            flat = idx.reshape(-1).contiguous()
            out = torch.empty(flat.numel(), K)
            if fn(self.data.data_ptr(), N, K, flat.data_ptr(), flat.numel(), out.data_ptr()):
                raise IndexError(f"TiledBF16.rows: an index is outside [0, {N}): {flat.tolist()[:16]}")
            return out.view(*idx.shape, K)
        n = idx.reshape(-1, 1)  # (R, 1)
        tiled = (n // 8) * (8 * K) + (n % 8) * 16 + self._kpart  # (R, K)
        off = torch.where(n < N - N % 8, tiled, n * K + torch.arange(K)) if N % 8 else tiled
        return self.data.take(off).view(*idx.shape, K).float()


def argmax(x: torch.Tensor) -> torch.Tensor | None:
    """Row-wise first index of the maximum of x (B, V) fp32 contiguous on the CPU, as torch.argmax (NaN
    wins), in one C call; None when the kernel is not loaded (this never builds it) or x does not fit."""
    fn = _argmax_fn
    if fn is None or x.dim() != 2 or x.dtype != torch.float32 or not x.is_contiguous() or x.device.type != "cpu":
        return None
    out = torch.empty(x.shape[0], dtype=torch.int64)
    if fn(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr()):
        return None  # V == 0: let torch raise its own error
    return out


def tile(w: torch.Tensor) -> torch.Tensor | TiledBF16:
    """w in the layout the kernel streams fastest: bf16 (N, K) with K % 16 == 0 and N >= 8 -> TiledBF16,
    anything else unchanged."""
    if w.dtype == torch.bfloat16 and w.dim() == 2 and w.shape[1] % 16 == 0 and w.shape[0] >= 8:
        return TiledBF16(w.contiguous())
    return w


def _wdtype(w: torch.Tensor | TiledBF16) -> int:
    return 2 if isinstance(w, TiledBF16) else 0 if w.dtype == torch.float32 else 1


def _check(x: torch.Tensor | None, w: torch.Tensor | TiledBF16, b: torch.Tensor | None) -> None:
    N, K = w.shape
    bad_x = x is not None and (x.dim() != 2 or x.shape[1] != K or x.dtype != torch.float32 or not x.is_contiguous())
    plain_ok = isinstance(w, TiledBF16) or w.is_contiguous()
    if (bad_x or not plain_ok or w.dtype not in (torch.float32, torch.bfloat16) or w.device.type != "cpu"
            or (b is not None and (b.dtype != torch.float32 or b.shape != (N,) or not b.is_contiguous()))):
        raise ValueError(f"gemv.linear: needs x (M, K) fp32, w (N, K) fp32/bf16, b (N,) fp32, all contiguous on "
                         f"the CPU; got x {None if x is None else (tuple(x.shape), x.dtype)}, "
                         f"w {tuple(w.shape)} {w.dtype}, b {None if b is None else (tuple(b.shape), b.dtype)}")


def bind(w: torch.Tensor | TiledBF16, b: torch.Tensor | None = None) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The product with one fixed weight (and bias), checked once: returns f(x, gelu) -> y, whose
    per-call cost is a shape check, one allocation and the C call (a few µs; a decode step makes
    ~50 of them). The returned function keeps w and b alive."""
    fn = _fn
    if fn is None:
        raise RuntimeError(f"the gemv kernel is unavailable: {why_unavailable() or 'call available() first'}")
    _check(None, w, b)
    N, K = w.shape
    wp, bp = w.data_ptr(), None if b is None else b.data_ptr()
    wd = _wdtype(w)
    empty, f32, threads = torch.empty, torch.float32, torch.get_num_threads
    min_rows = -(-_PARALLEL_MIN // max(1, N * K))  # rows from which a second thread pays

    def call(x: torch.Tensor, gelu: int = 0) -> torch.Tensor:
        M, k = x.shape
        if k != K or x.dtype != f32 or not x.is_contiguous():
            _check(x, w, b)
        y = empty((M, N), dtype=f32)
        rc = fn(x.data_ptr(), wp, bp, y.data_ptr(), M, N, K, wd, gelu, threads() if M >= min_rows else 1)
        if rc:
            raise (MemoryError if rc == -2 else ValueError)(
                f"gemv kernel failed on x ({M}, {K}) . w ({N}, {K})^T with gelu={gelu!r}: "
                + ("out of memory" if rc == -2 else "gelu must be 0 (none), 1 (tanh) or 2 (exact)"))
        return y

    call.weight, call.bias = w, b  # type: ignore[attr-defined]  # keeps the buffers alive
    return call


# one block's tensors, in gemv.c's order: ln_1 w, b; c_attn w, b; attn c_proj w, b; ln_2 w, b; c_fc w, b; mlp c_proj w, b
Block = tuple["torch.Tensor | TiledBF16 | None", ...]


def bind_blocks(blocks: list[Block], n_head: int, eps: float, gelu: int
                ) -> Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]], None]:
    """A decode step's transformer blocks (GPT-2: pre-LayerNorm attention and MLP) as one C call.

    Returns f(x, pos, k, v): x (B, C) fp32 residual stream, updated in place; pos (B,) int64, where each
    row writes its new key/value (its length so far); k, v: per layer (B, n_head, max_len, head size)
    fp32 caches. Matmul weights all fp32, all bf16 or all TiledBF16; LayerNorm weights and biases fp32 (or None).
    Checked once here; per call only the shapes of x, pos and the caches."""
    fn = _blocks_fn
    if fn is None:
        raise RuntimeError(f"the gemv kernel is unavailable: {why_unavailable() or 'call available() first'}")
    if not blocks:
        raise ValueError("bind_blocks: needs at least one block")
    C = blocks[0][0].shape[0] if blocks[0][0] is not None else blocks[0][2].shape[1]  # type: ignore[union-attr]
    wdt = blocks[0][2].dtype  # type: ignore[union-attr]
    tiled = isinstance(blocks[0][2], TiledBF16)
    shapes = [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (4 * C, C), (4 * C,), (C, 4 * C), (C,)]
    ptrs: list[int | None] = []
    for li, blk in enumerate(blocks):
        if len(blk) != 12:
            raise ValueError(f"bind_blocks: block {li} has {len(blk)} tensors, expected 12 (see gemv.c)")
        for j, (t, shape) in enumerate(zip(blk, shapes)):
            matmul = j in (2, 4, 8, 10)
            want = wdt if matmul else torch.float32
            if t is None and not matmul:
                ptrs.append(None)
                continue
            kind_ok = t is not None and (isinstance(t, TiledBF16) == (matmul and tiled))
            if (t is None or not kind_ok or tuple(t.shape) != shape or t.dtype != want
                    or not (isinstance(t, TiledBF16) or t.is_contiguous())
                    or t.device.type != "cpu" or want not in (torch.float32, torch.bfloat16)):
                got = None if t is None else (tuple(t.shape), t.dtype, type(t).__name__)
                kind = "TiledBF16" if matmul and tiled else "a contiguous tensor"
                raise ValueError(f"bind_blocks: block {li} tensor {j} must be {shape} {want} ({kind}) on the "
                                 f"CPU; got {got}")
            ptrs.append(t.data_ptr())
    if C % n_head:
        raise ValueError(f"bind_blocks: n_embd {C} is not divisible by n_head {n_head}")
    n_layer, hs, wd = len(blocks), C // n_head, 2 if tiled else 0 if wdt == torch.float32 else 1
    params = (ctypes.c_void_p * len(ptrs))(*ptrs)
    keep = [t for blk in blocks for t in blk if t is not None]
    threads, empty, f32, i64 = torch.get_num_threads, torch.empty, torch.float32, torch.int64
    lock = threading.Lock()
    scratch = [torch.empty(0)]
    ptr_array = ctypes.c_void_p * n_layer

    def call(x: torch.Tensor, pos: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        B = x.shape[0]
        k0 = k[0]
        max_len = k0.shape[2]
        if (x.shape != (B, C) or x.dtype != f32 or not x.is_contiguous() or pos.shape != (B,) or pos.dtype != i64
                or not pos.is_contiguous() or len(k) != n_layer or len(v) != n_layer
                or any(t.shape != (B, n_head, max_len, hs) or t.dtype != f32 or not t.is_contiguous() for t in k)
                or any(t.shape != k0.shape or t.dtype != f32 or not t.is_contiguous() for t in v)):
            raise ValueError(f"decode blocks: needs x ({B}, {C}) fp32, pos ({B},) int64 and {n_layer} key and value "
                             f"caches ({B}, {n_head}, max_len, {hs}) fp32, all contiguous; got x "
                             f"{tuple(x.shape)} {x.dtype}, pos {tuple(pos.shape)} {pos.dtype}, "
                             f"k[0] {tuple(k0.shape)} {k0.dtype}")
        need = B * (10 * C + n_head * max_len)
        mine = lock.acquire(blocking=False)  # concurrent callers (rare) get a scratch buffer of their own
        try:
            s = scratch[0] if mine else empty(0)
            if s.numel() < need:
                s = empty(need, dtype=f32)
                if mine:
                    scratch[0] = s
            rc = fn(x.data_ptr(), B, C, n_head, n_layer, pos.data_ptr(), max_len,
                    ptr_array(*[t.data_ptr() for t in k]), ptr_array(*[t.data_ptr() for t in v]), params, wd, gelu,
                    eps, s.data_ptr(), threads())
        finally:
            if mine:
                lock.release()
        if rc:
            if rc == -2:
                raise MemoryError("decode blocks: out of memory")
            raise ValueError(f"decode blocks: a position is outside the cache (pos {pos.tolist()}, max_len "
                             f"{max_len}) or gelu {gelu!r} is not 1 (tanh) or 2 (exact)")

    call.keep = keep  # type: ignore[attr-defined]  # keeps the weights alive
    return call


def linear(x: torch.Tensor, w: torch.Tensor | TiledBF16, b: torch.Tensor | None = None, gelu: int = 0
           ) -> torch.Tensor:
    """y = x w^T + b, then GELU (gelu: 0 none, 1 tanh approximation, 2 exact); fp32 result.

    x (M, K) fp32 contiguous; w (N, K) fp32 or bf16 contiguous, or a TiledBF16; b (N,) fp32 contiguous or None."""
    _check(x, w, b)
    return bind(w, b)(x, gelu)
