"""gptcore.gemv, the decode matmul kernel: equal to torch's linear (+ GELU) for fp32 and bf16 weights
(plain or in the kernel's tiled layout), odd shapes and both thread counts; the build cache; the switch-off; and the engine's use of it
(bf16 weights with fp32 activations equal an fp32 model whose matmul weights were rounded to bf16)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from gptcore import gemv
from gptcore.config import GPTConfig
from gptcore.engine import Engine, EngineError
from gptcore.engine_forward import Forward, PackedLinear
from gptcore.model import GPT
from gptcore.sampling import SamplingParams

REPO = Path(__file__).resolve().parents[2]
needs_kernel = pytest.mark.skipif(not gemv.available(), reason=f"gemv unavailable: {gemv.why_unavailable()}")
GELU = {0: None, 1: "tanh", 2: "none"}


def reference(x, w, b, gelu):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    return y if gelu == 0 else F.gelu(y, approximate=GELU[gelu])


@needs_kernel
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 64, 64), (3, 37, 13), (16, 203, 96), (24, 8, 8), (2, 1, 5), (33, 19, 1100)])
@pytest.mark.parametrize("gelu", [0, 1, 2])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_equals_torch(wdtype, M, N, K, gelu, threads):
    """N not a multiple of 8 (the scalar tail rows), K not a multiple of 8 (the scalar tail of each dot
    product), with and without bias, one and two threads; 33 rows x K 1100 (more rows than the engine
    sends, a long row)."""
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(wdtype)
    b = torch.randn(N, generator=g) if N % 2 else None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = gemv.linear(x, w, b, gelu)
    finally:
        torch.set_num_threads(before)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    torch.testing.assert_close(got.double(), reference(x, w.float(), b, gelu), atol=2e-5, rtol=2e-5)


@needs_kernel
def test_big_matrix_split_across_threads_equals_one_thread():
    """The parallel path (above the size where a second thread pays) gives the same sums as one thread:
    each output is one thread's dot product in the same order."""
    x, w = torch.randn(2, 768), torch.randn(3000, 768)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gemv.linear(x, w)
        torch.set_num_threads(2)
        two = gemv.linear(x, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    torch.testing.assert_close(two.double(), reference(x, w, None, 0), atol=1e-4, rtol=1e-5)


@needs_kernel
def test_bad_arguments_name_the_shapes_and_dtypes():
    with pytest.raises(ValueError, match=r"x \(\(2, 8\), torch.float64\)"):
        gemv.linear(torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"w \(4, 9\)"):
        gemv.linear(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="contiguous"):
        gemv.linear(torch.randn(8, 2).t(), torch.randn(4, 8))
    with pytest.raises(ValueError, match="gelu must be 0 .none., 1 .tanh. or 2 .exact."):
        gemv.linear(torch.randn(2, 8), torch.randn(4, 8), gelu=3)


@needs_kernel
@pytest.mark.parametrize("wdtype,tiled", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_packed_linear_switches_to_torch_above_max_rows(wdtype, tiled):
    """Decode rows go through the kernel, a prefill of more than MAX_ROWS rows through torch's GEMM
    (a tiled bf16 weight untiled for it); both give the fp32 product of the same weights."""
    w = (torch.randn(40, 32) / 6).to(wdtype)
    b = torch.randn(40)
    lin = PackedLinear(gemv.tile(w) if tiled else w, b, packed=False, gemv=True)
    assert isinstance(lin.w, gemv.TiledBF16) == tiled
    for rows in (1, gemv.MAX_ROWS, gemv.MAX_ROWS + 7):
        x = torch.randn(rows, 32)
        got = lin(x, gelu=True)
        assert got.dtype == torch.float32
        if wdtype == torch.float32:
            torch.testing.assert_close(got.double(), reference(x, w, b, 1), atol=2e-5, rtol=2e-5)
        else:  # above MAX_ROWS torch multiplies in bf16 (its inputs rounded to bf16 too)
            tol = 2e-5 if rows <= gemv.MAX_ROWS else 5e-2
            torch.testing.assert_close(got.double(), reference(x, w.float(), b, 1), atol=tol, rtol=tol)


@needs_kernel
@pytest.mark.parametrize("N,K", [(8, 16), (37, 32), (203, 96), (3000, 768)])
@pytest.mark.parametrize("threads", [1, 2])
def test_tiled_bf16_holds_the_same_weight_and_multiplies_bit_for_bit_alike(N, K, threads):
    """gemv.tile: the kernel's tiled bf16 layout (rows past the last block of 8 stay plain). untile and
    rows give back the plain weight and its rows (the engine's prefill GEMM and embedding lookups); the
    kernel's product is the same sums in the same order as with the plain weight: equal to the bit."""
    g = torch.Generator().manual_seed(N + K)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(torch.bfloat16)
    b = torch.randn(N, generator=g)
    t = gemv.tile(w)
    assert isinstance(t, gemv.TiledBF16) and t.shape == w.shape and t.dtype == torch.bfloat16
    assert t.numel() == w.numel() and torch.equal(t.data, w.reshape(-1)) == (K == 16)  # K > 16: another layout
    assert torch.equal(t.untile(), w)
    idx = torch.tensor([[0, N - 1, 7], [N // 2, min(8, N - 1), N - 1 - N % 8]])
    want = F.embedding(idx, w).float()
    assert torch.equal(t.rows(idx), want)  # one C call
    with pytest.MonkeyPatch.context() as mp:  # the torch fallback (kernel not loaded) agrees
        mp.setattr(gemv, "_rows_fn", None)
        assert torch.equal(t.rows(idx), want)
    with pytest.raises(IndexError, match=rf"outside \[0, {N}\)"):
        t.rows(torch.tensor([0, N]))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for M in (1, 5, gemv.MAX_ROWS):
            x = torch.randn(M, K, generator=g)
            for gelu in (0, 1):
                assert torch.equal(gemv.linear(x, t, b, gelu), gemv.linear(x, w, b, gelu))
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_argmax_equals_torch_including_ties_nan_and_short_rows():
    """gemv.argmax (what sampling.argmax uses when the kernel is loaded): the first index of the maximum,
    a NaN counting as the maximum, like torch.argmax; rows shorter than one vector; None where it does not
    apply (so the caller uses torch)."""
    g = torch.Generator().manual_seed(0)
    for V in (1, 7, 8, 13, 4096, 50257):
        x = torch.randint(-3, 4, (6, V), generator=g).float()  # many ties: the first index must win
        x[0, -1] = 100.0  # the maximum in the tail columns
        x[1, :] = float("-inf")
        x[2, V // 2] = float("nan")
        x[3, :] = 7.0
        assert torch.equal(gemv.argmax(x), x.argmax(-1)), V
        y = torch.randn(3, V, generator=g)
        assert torch.equal(gemv.argmax(y), y.argmax(-1))
    assert gemv.argmax(torch.zeros(2, 5, dtype=torch.float64)) is None
    assert gemv.argmax(torch.zeros(5, 2).t()) is None


def test_tile_keeps_what_it_cannot_tile():
    """fp32 weights, K not a multiple of 16 and fewer than 8 rows stay plain tensors; TiledBF16 itself
    names what it needs."""
    for w in (torch.randn(16, 32), torch.randn(16, 24).bfloat16(), torch.randn(5, 32).bfloat16()):
        assert gemv.tile(w) is w
    with pytest.raises(ValueError, match=r"K a multiple of 16; got \(16, 24\) torch.bfloat16"):
        gemv.TiledBF16(torch.randn(16, 24).bfloat16())


def _py(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


@needs_kernel
def test_build_is_cached_by_source_hash(tmp_path):
    """The first process compiles into the kernel cache; the next one loads the same file."""
    code = ("from gptcore import gemv; assert gemv.available(), gemv.why_unavailable(); "
            "import glob; print(glob.glob(str(gemv.cache_dir() / 'gemv-*.so')))")
    first = _py(code, RAYGPT_KERNEL_CACHE=str(tmp_path))
    assert first.returncode == 0, first.stderr
    files = list(tmp_path.glob("gemv-*.so"))
    assert len(files) == 1 and str(files[0]) in first.stdout
    mtime = files[0].stat().st_mtime_ns
    second = _py(code, RAYGPT_KERNEL_CACHE=str(tmp_path))
    assert second.returncode == 0, second.stderr
    assert list(tmp_path.glob("gemv-*.so")) == files and files[0].stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".so" and p not in files]  # no temp files left


def test_switched_off_engine_falls_back_and_explicit_request_says_why():
    code = ("import torch; from gptcore import gemv; from gptcore.engine import Engine, EngineError\n"
            "from gptcore.config import GPTConfig; from gptcore.model import GPT\n"
            "m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=50, block_size=16))\n"
            "print('available', gemv.available(), '|', gemv.why_unavailable())\n"
            "print('auto', Engine(m, None).kernel)\n"
            "try:\n    Engine(m, None, kernel='gemv')\nexcept EngineError as e:\n    print('error', e)\n")
    out = _py(code, RAYGPT_GEMV="0")
    assert out.returncode == 0, out.stderr
    assert "available False | disabled by RAYGPT_GEMV=0" in out.stdout
    assert "auto onednn" in out.stdout or "auto torch" in out.stdout
    assert "error kernel='gemv' is unavailable here: disabled by RAYGPT_GEMV=0; use kernel='auto'" in out.stdout


def test_gemv_on_a_non_cpu_dtype_is_refused():
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=50, block_size=16))
    with pytest.raises(EngineError, match="kernel='gemv' is unavailable here: it runs fp32/bf16 on a CPU"):
        Engine(m, None, dtype=torch.float16, kernel="gemv")


@needs_kernel
def test_bf16_engine_equals_fp32_model_with_bf16_rounded_matmul_weights():
    """kernel gemv + bf16: the matmul weights (and the tied embedding) are stored in bf16, everything
    else stays fp32 and all arithmetic is fp32. So it must equal the fp32 model whose Linear weights
    were rounded to bf16, up to summation order: same greedy tokens, logprobs within 1e-4."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=300, block_size=64)).eval()
    rounded = GPT(m.config).eval()
    rounded.load_state_dict(m.state_dict())
    with torch.no_grad():
        for mod in rounded.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(mod.weight.to(torch.bfloat16).float())
    eng = Engine(m, None, dtype=torch.bfloat16, kernel="gemv")
    assert eng.kernel == "gemv" and eng._fwd.lm_head.w.dtype == torch.bfloat16
    assert isinstance(eng._fwd.lm_head.w, gemv.TiledBF16)  # vocab 300: 37 tiled blocks + 4 plain rows
    assert eng._fwd.wte.data_ptr() == eng._fwd.lm_head.w.data_ptr()  # tied: one bf16 copy
    ref = Engine(rounded, None, kernel="model")
    p = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True, logprobs=True)
    prompts = [[5, 17, 200], [1, 2, 3, 4, 5, 6, 7, 8], [42]]
    for a, b in zip(eng.generate(prompts, p), ref.generate(prompts, p)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == pytest.approx(b.outputs[0].logprobs, abs=1e-4)
    # token 299 is a plain row after the tiled ones; 30 tokens: a prefill above MAX_ROWS, where torch's GEMM
    # multiplies in bf16 (its inputs rounded too), so the logprobs are only close
    long = [299, 296] + list(range(100, 128))
    a, b = eng.generate([long], p)[0].outputs[0], ref.generate([long], p)[0].outputs[0]
    assert a.token_ids == b.token_ids and a.logprobs == pytest.approx(b.logprobs, abs=2e-3)


@needs_kernel
def test_unwritable_cache_falls_back_to_a_private_temp_folder(tmp_path):
    """A kernel cache that cannot be created (here: below a file; in containers: a read-only home)
    moves the build to <tmp>/raygpt-kernels-<uid>, a folder only this user may write."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    code = "from gptcore import gemv; print(gemv.available(), gemv.why_unavailable())"
    out = _py(code, RAYGPT_KERNEL_CACHE=str(blocker / "kernels"), TMPDIR=str(tmp))
    assert out.returncode == 0 and out.stdout.startswith("True"), out.stdout + out.stderr
    private = tmp / f"raygpt-kernels-{os.getuid()}"
    assert len(list(private.glob("gemv-*.so"))) == 1 and private.stat().st_mode & 0o077 == 0
    # a folder others may write is refused: the kernel is then unavailable, with the reason
    for f in private.iterdir():
        f.unlink()
    private.chmod(0o777)
    out = _py(code, RAYGPT_KERNEL_CACHE=str(blocker / "kernels"), TMPDIR=str(tmp))
    assert out.stdout.startswith("False") and "is not a private folder of this user" in out.stdout, out.stdout


def _step_both_ways(fwd, cache_a, cache_b, tok, advance=None):
    """One decode step through the fused C blocks (cache_a) and the op-by-op path (cache_b)."""
    fwd.fuse_decode = True
    a = fwd(tok, cache_a, advance=advance)
    fwd.fuse_decode = False
    try:
        b = fwd(tok, cache_b, advance=advance)
    finally:
        fwd.fuse_decode = True
    return a, b


@needs_kernel
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,activation", [(True, "gelu_tanh"), (False, "gelu")])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_decode_blocks_equal_the_op_by_op_step(wdtype, bias, activation, threads):
    """Forward's one-token step with kernel gemv runs every block in one C call (LayerNorms, KV writes,
    attention, residuals between the gemv matmuls). Against the op-by-op path on the same weights:
    ragged rows (each at its own length, writing at its own position), several steps, both GELUs,
    with and without biases, fp32 and bf16 weights, one and two threads: same logits and same caches
    up to summation order."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=3, n_head=4, n_embd=96, vocab_size=211, block_size=48, bias=bias, activation=activation)
    fwd = Forward(GPT(cfg).eval(), torch.device("cpu"), wdtype, "gemv")
    assert fwd.kernel == "gemv" and fwd.blocks is not None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            ca, cb = fwd.new_cache(3, 40), fwd.new_cache(3, 40)
            prompts = torch.randint(0, 211, (3, 9))
            lens = torch.tensor([9, 4, 1])
            for c in (ca, cb):  # ragged prefill (not fused), then rows of lengths 9, 4, 1
                fwd(prompts, c, advance=lens)
            tok = torch.randint(0, 211, (3, 1))
            for _ in range(6):
                a, b = _step_both_ways(fwd, ca, cb, tok)
                torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)
                tok = a.argmax(-1, keepdim=True)
            assert ca.lengths.tolist() == cb.lengths.tolist() == [15, 10, 7]
            for la in range(cfg.n_layer):
                torch.testing.assert_close(ca.k[la], cb.k[la], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(ca.v[la], cb.v[la], atol=1e-4, rtol=1e-4)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_fused_decode_long_rows_take_the_parallel_attention_and_stop_at_the_cache_end():
    """Enough rows x positions for the attention's parallel loop; a step past the cache's end raises
    (the length is checked before any key is written) and leaves the cache as it was."""
    torch.manual_seed(1)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=100, block_size=512)
    fwd = Forward(GPT(cfg).eval(), torch.device("cpu"), torch.float32, "gemv")
    with torch.inference_mode():
        ca, cb = fwd.new_cache(8, 301), fwd.new_cache(8, 301)
        prompts = torch.randint(0, 100, (8, 300))
        for c in (ca, cb):
            fwd(prompts, c)
        tok = torch.randint(0, 100, (8, 1))
        a, b = _step_both_ways(fwd, ca, cb, tok)
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)
        k_before = ca.k[0].clone()
        with pytest.raises(ValueError, match="exceeds the cache length 301"):
            fwd(tok, ca)
        assert torch.equal(ca.k[0], k_before) and ca.lengths.tolist() == [301] * 8


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_decode_with_tiled_weights_equals_plain_bf16_bit_for_bit(threads):
    """The engine binds bf16 blocks tiled; the same blocks bound plain give the same residual stream and
    caches to the bit (same sums, same order). Mixing tiled and plain matmul weights is refused."""
    g = torch.Generator().manual_seed(3)
    C, nh, L, B, T = 64, 4, 2, 3, 12
    shapes = [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (4 * C, C), (4 * C,), (C, 4 * C), (C,)]
    plain = [tuple((torch.randn(*sh, generator=g) / 8).to(torch.bfloat16 if j in (2, 4, 8, 10) else torch.float32)
                   for j, sh in enumerate(shapes)) for _ in range(L)]
    tiled = [tuple(gemv.tile(t) if j in (2, 4, 8, 10) else t for j, t in enumerate(blk)) for blk in plain]
    fp, ft = gemv.bind_blocks(plain, nh, 1e-5, 1), gemv.bind_blocks(tiled, nh, 1e-5, 1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        caches = [([torch.randn(B, nh, T, C // nh, generator=g) for _ in range(L)],
                   [torch.randn(B, nh, T, C // nh, generator=g) for _ in range(L)]) for _ in range(2)]
        for cache in caches[1:]:
            for a, b in zip(cache[0] + cache[1], caches[0][0] + caches[0][1]):
                a.copy_(b)
        x0 = torch.randn(B, C, generator=g)
        xs = [x0.clone(), x0.clone()]
        pos = torch.tensor([0, 5, T - 1])
        for _ in range(2):
            fp(xs[0], pos, *caches[0])
            ft(xs[1], pos, *caches[1])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(xs[0], xs[1]) and not torch.equal(xs[0], x0)
    for a, b in zip(caches[0][0] + caches[0][1], caches[1][0] + caches[1][1]):
        assert torch.equal(a, b)
    mixed = [plain[0], tiled[1]]
    with pytest.raises(ValueError, match=r"block 1 tensor 2 must be \(192, 64\) torch.bfloat16 \(a contiguous tensor\)"):
        gemv.bind_blocks(mixed, nh, 1e-5, 1)


@needs_kernel
def test_bind_blocks_names_what_is_wrong():
    C = 16
    good = (torch.ones(C), None, torch.zeros(3 * C, C), None, torch.zeros(C, C), None, torch.ones(C), None,
            torch.zeros(4 * C, C), None, torch.zeros(C, 4 * C), None)
    with pytest.raises(ValueError, match=r"block 0 tensor 2 must be \(48, 16\) torch.float32"):
        gemv.bind_blocks([good[:2] + (torch.zeros(3 * C, C + 1),) + good[3:]], 2, 1e-5, 1)
    with pytest.raises(ValueError, match="block 1 has 11 tensors, expected 12"):
        gemv.bind_blocks([good, good[:11]], 2, 1e-5, 1)
    f = gemv.bind_blocks([good], 2, 1e-5, 1)
    x, pos = torch.zeros(1, C), torch.zeros(1, dtype=torch.int64)
    k = [torch.zeros(1, 2, 4, 8)]
    with pytest.raises(ValueError, match=r"caches \(1, 2, max_len, 8\) fp32"):
        f(x, pos, [torch.zeros(1, 2, 4, 8, dtype=torch.float64)], k)
    with pytest.raises(ValueError, match=r"position is outside the cache \(pos \[4\], max_len 4\)"):
        f(x, torch.tensor([4]), k, [torch.zeros(1, 2, 4, 8)])
    f(x, pos, k, [torch.zeros(1, 2, 4, 8)])  # LayerNorm of zeros with weight 1: x stays 0
    assert torch.equal(x, torch.zeros(1, C))
