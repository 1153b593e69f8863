"""The engine's inference forward: GPT.forward's maths over a KV cache with less overhead, on a
streaming decode kernel (gptcore.gemv) or oneDNN pre-packed weights where those pay.

    from gptcore.engine_forward import Forward
    fwd = Forward(model, torch.device("cpu"), torch.float32, kernel="auto")   # "gemv" | "onednn" | "torch" | "model"
    cache = fwd.new_cache(batch_size=4, max_len=128)
    logits = fwd(idx, cache)                          # idx (B, T) right-padded -> (B, V) fp32 logits
    logits = fwd.mixed(last, idx, lens, cache)        # decode n rows + prefill B new rows in ONE forward

Internal to gptcore.engine (Engine builds one `Forward` per engine and drives it); tested through
`tests/gptcore/test_engine.py` and `tests/gptcore/test_gemv.py`. Why it exists: one attention mask
per step (none at all for an equal-length decode step), strided KV writes when rows are equally long,
and on x86 CPUs a matmul kernel chosen for decoding:
- "gemv" (auto's choice on x86-64 CPUs with AVX2 where a C compiler builds gptcore/gemv.c): the
  weights stay in nn.Linear's layout and up to gemv.MAX_ROWS rows stream them through a hand-written
  dot-product kernel, the speed a decode step is bound by (BENCHMARKS.md: 1.3x oneDNN at batch 1 and
  still ahead at 16); more rows (prefill) go to torch's GEMM. With bf16 only the matmul weights are
  bf16 (half the bytes to stream); activations, keys, values and sums stay fp32. A one-token step
  of up to MAX_ROWS rows runs all its blocks in one C call (gemv.bind_blocks: the LayerNorms, KV
  writes, attention and residual adds between the matmuls; ~4 ms less per GPT-2 small step than
  the same ops through ATen, ~20% at batch 1); `fuse_decode = False` keeps the op-by-op path.
- "onednn": large Linear weights pre-packed once for oneDNN (torch.ops.mkldnn._linear_pointwise, the
  kernel torch.compile's CPU "freezing" uses), ~3x faster than the default fp32 GEMM for skinny decode
  matmuls. In bf16 the weights and activations are bf16 but keys, values and attention stay fp32 (CPU
  bf16 attention is slower and less accurate).
Both are checked against nn.Linear at start-up (otherwise the next kernel down is used).
kernel="torch" uses nn.functional.linear; kernel="model" runs `GPT.forward` itself (the reference
the tests compare against).

Does not: sample, schedule rows or own a cache (callers pass a `gptcore.model.KVCache`), or shard
across devices.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch.nn import functional as F

from gptcore import gemv as _gemv
from gptcore.engine_requests import EngineError
from gptcore.model import GPT, KVCache

__all__ = ["Forward", "PackedLinear", "onednn_available"]


def onednn_available() -> bool:
    try:
        available: bool = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]  # untyped in torch
        return bool(available) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except Exception:  # pragma: no cover - exotic builds
        return False


def _no_onednn(*args: object) -> torch.Tensor:  # pragma: no cover - PackedLinear packs only where oneDNN exists
    raise RuntimeError("oneDNN's _linear_pointwise is not available in this torch build; use kernel='torch'")


# resolved once: looking the op up through torch.ops on every call costs microseconds per matmul
_LINEAR_POINTWISE: Callable[..., torch.Tensor] = (
    torch.ops.mkldnn._linear_pointwise.default if onednn_available() else _no_onednn)

_GEMV_MAX_ROWS = _gemv.MAX_ROWS

# one transformer block's weights, in the order __call__ uses them:
# ln_1 (weight, bias), attn.c_attn, attn.c_proj, ln_2 (weight, bias), mlp.c_fc, mlp.c_proj
_Layer = tuple[torch.Tensor, torch.Tensor | None, "PackedLinear", "PackedLinear",
               torch.Tensor, torch.Tensor | None, "PackedLinear", "PackedLinear"]


class PackedLinear:
    """y = x W^T + b, optionally fused with GELU, on the kernel that suits the matmul.

    gemv=True (kernel "gemv"): gptcore.gemv's streaming kernel for up to gemv.MAX_ROWS rows (a decode
    step: bound by reading the weights), torch's GEMM above (prefill: compute-bound). The weight may
    be bf16 (half the bytes to stream); inputs and outputs are fp32 either way.
    packed=True (kernel "onednn"): oneDNN's packed GEMM, ~3x faster than the default fp32 GEMM for
    skinny matmuls, but with a fixed per-call cost of tens of microseconds, so tiny matmuls (rows x
    in x out < 2^20 multiply-adds, weights < 2^20 elements) keep nn.functional.linear."""

    __slots__ = ("w", "b", "packed", "small", "approximate", "gemv", "gelu_code", "b_w", "kern")

    BIG = 1 << 20

    def __init__(self, weight: torch.Tensor | _gemv.TiledBF16, bias: torch.Tensor | None, packed: bool,
                 approximate: str = "tanh", gemv: bool = False):
        self.b = bias
        self.approximate = approximate  # of the fused GELU: "tanh" (GPT-2) or "none" (exact)
        self.gemv = gemv
        self.gelu_code = 1 if approximate == "tanh" else 2  # gptcore.gemv's GELU codes
        # the bias in the weight's dtype, for torch's GEMM above gemv.MAX_ROWS rows (bf16 weights)
        self.b_w = None if bias is None or not gemv else bias.to(weight.dtype)
        self.kern = _gemv.bind(weight, bias) if gemv else None
        self.small = weight.numel() < self.BIG
        # the batch-size hint only picks the packed layout; any number of rows works afterwards
        packed = packed and not gemv
        self.packed: torch.Tensor | None = torch.ops.mkldnn._reorder_linear_weight(weight, 16) if packed else None
        # big weights: packed copy only (gemv: the weight as bound, bf16 possibly in the kernel's tiled layout)
        self.w: torch.Tensor | _gemv.TiledBF16 | None = weight if (self.packed is None or self.small) else None

    def __call__(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:  # x: (N, in)
        w = self.w
        kern = self.kern
        if kern is not None:
            assert w is not None
            if x.shape[0] <= _GEMV_MAX_ROWS:
                return kern(x, self.gelu_code if gelu else 0)
            # prefill: torch's GEMM needs the plain layout (a copy of a tiled weight: small next to the GEMM)
            plain = w.untile() if isinstance(w, _gemv.TiledBF16) else w
            y = torch._C._nn.linear(x.to(w.dtype), plain, self.b_w)
            y = torch._C._nn.gelu(y, approximate=self.approximate) if gelu else y
            return y.float()
        if self.packed is not None and (w is None or x.shape[0] * w.numel() >= self.BIG):
            if gelu:
                return _LINEAR_POINTWISE(x, self.packed, self.b, "gelu", [], self.approximate)
            return _LINEAR_POINTWISE(x, self.packed, self.b, "none", [], "")
        assert w is not None  # without a packed copy the plain weight is kept
        assert isinstance(w, torch.Tensor)  # tiled weights only with the gemv kernel
        y = torch._C._nn.linear(x, w, self.b)
        return torch._C._nn.gelu(y, approximate=self.approximate) if gelu else y


class Forward:
    """Inference forward over a KVCache: same maths as GPT.forward(cache=...), fewer overheads.

    kernel: "gemv" (gptcore.gemv's decode kernel, x86 CPU), "onednn" (packed weights, CPU), "torch"
    (nn.functional.linear) or "model" (call GPT.forward itself; the reference the others are tested
    against); "auto" picks the first available of gemv, onednn, torch."""

    # the engine's own weights (kernels "onednn" and "torch"; absent with kernel "model")
    wte: torch.Tensor | _gemv.TiledBF16  # (V, C); tiled: the gemv kernel's bf16 head, shared (tied)
    wpe: torch.Tensor  # (block_size, C)
    layers: list[_Layer]
    ln_f: tuple[torch.Tensor, torch.Tensor | None]
    lm_head: PackedLinear
    # kernel "gemv": all blocks of a one-token step in one C call (None otherwise); fuse_decode=False
    # keeps the op-by-op path (the reference the tests compare against)
    blocks: Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]], None] | None = None
    fuse_decode: bool = True

    def __init__(self, model: GPT, device: torch.device, dtype: torch.dtype, kernel: str):
        self.config = model.config
        self.device, self.dtype = device, dtype
        # bf16 on CPU: keys/values (and attention) stay fp32; the CPU bf16 SDPA kernel is ~5x slower
        # than fp32 for one-token queries, and fp32 attention is also the more accurate choice
        self.cache_dtype = torch.float32 if (device.type == "cpu" and dtype == torch.bfloat16) else dtype
        cpu_dtype = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
        if kernel == "auto":
            if cpu_dtype and _gemv.available():
                kernel = "gemv"
            else:
                kernel = "onednn" if (cpu_dtype and onednn_available()) else "torch"
        if kernel not in ("gemv", "onednn", "torch", "model"):
            raise EngineError(f"kernel must be 'auto', 'gemv', 'onednn', 'torch' or 'model', got {kernel!r}")
        if kernel == "gemv" and not (cpu_dtype and _gemv.available()):
            why = _gemv.why_unavailable() if cpu_dtype else f"it runs fp32/bf16 on a CPU, not {dtype} on {device}"
            raise EngineError(f"kernel='gemv' is unavailable here: {why}; use kernel='auto' (picks the best "
                              "available) or 'onednn' / 'torch'")
        # the activations' dtype: the gemv kernel reads bf16 weights but computes in fp32 throughout
        self.act_dtype = torch.float32 if kernel == "gemv" else dtype
        self.model: GPT | None = None
        if kernel == "model":
            p = next(model.parameters())
            if p.dtype != dtype or p.device != device or model.training:
                model = copy.deepcopy(model).to(device=device, dtype=dtype)
            self.model = model.eval()
        elif kernel == "gemv":
            self._load_weights(model, packed=False, gemv=True)
            if not self._probe(model):  # a compiler or CPU that miscomputes: use oneDNN / torch instead
                kernel = "onednn" if onednn_available() else "torch"
                self.act_dtype = dtype
                self._load_weights(model, packed=kernel == "onednn")
        if kernel in ("onednn", "torch") and not hasattr(self, "layers"):
            packed = kernel == "onednn"
            try:
                self._load_weights(model, packed)
            except RuntimeError:
                # oneDNN packs bf16 only on CPUs with AVX512-BW/VL/DQ or AVX-NE-CONVERT (it raises elsewhere,
                # e.g. on AVX2-only CPUs): use the plain GEMM, as for a failed probe below
                if not packed:
                    raise
                packed, kernel = False, "torch"
                self._load_weights(model, packed=False)
            if packed and not self._probe(model):
                kernel = "torch"  # exotic CPU/build: oneDNN disagrees with nn.Linear, use the plain GEMM
                self._load_weights(model, packed=False)
        self.kernel = kernel

    def _load_weights(self, model: GPT, packed: bool, gemv: bool = False) -> None:
        """Copy the model's weights (detached, contiguous) into the per-layer tuples: matmul weights in
        self.dtype, everything else (embeddings, LayerNorms, biases) in the activations' dtype."""
        device, dtype, act = self.device, self.dtype, self.act_dtype

        def t(x: torch.Tensor, dt: torch.dtype = act) -> torch.Tensor:
            return x.detach().to(device=device, dtype=dt).contiguous()

        def opt(x: torch.Tensor | None) -> torch.Tensor | None:  # biases: None when config.bias is False
            return None if x is None else t(x)

        def lin(m: torch.nn.Linear, approximate: str = "tanh") -> PackedLinear:
            w = t(m.weight, dtype)
            # gemv streams bf16 weights faster in its tiled layout (gptcore.gemv.TiledBF16); fp32 stays plain
            return PackedLinear(_gemv.tile(w) if gemv else w, opt(m.bias), packed, approximate, gemv=gemv)

        tr = model.transformer
        self.wpe = t(tr.wpe.weight)
        self.layers = []
        for blk in tr.blocks():
            attn, mlp = blk.attn, blk.mlp
            self.layers.append((
                t(blk.ln_1.weight), opt(blk.ln_1.bias), lin(attn.c_attn), lin(attn.c_proj),
                t(blk.ln_2.weight), opt(blk.ln_2.bias), lin(mlp.c_fc, self.config.gelu_approximate), lin(mlp.c_proj),
            ))
        self.ln_f = (t(tr.ln_f.weight), opt(tr.ln_f.bias))
        self.lm_head = lin(model.lm_head)
        # gemv: a decode step's blocks as one C call (gemv.c's raygpt_decode_blocks)
        self.blocks = _gemv.bind_blocks(
            [(w1, b1, a.w, a.b, p.w, p.b, w2, b2, f.w, f.b, f2.w, f2.b)
             for w1, b1, a, p, w2, b2, f, f2 in self.layers],
            self.config.n_head, self.config.layer_norm_epsilon, self.layers[0][6].gelu_code) if gemv else None
        # the token embedding: with tied weights and bf16 matmul weights, embed from the head's bf16
        # copy (one copy of the biggest matrix, possibly tiled: see embed) and widen the looked-up rows
        tied = model.lm_head.weight is tr.wte.weight
        self.wte = self.lm_head.w if (tied and self.lm_head.w is not None) else t(tr.wte.weight)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token embeddings of idx (any shape) -> (*idx.shape, C), in the weight's dtype (fp32 when tiled)."""
        wte = self.wte
        return wte.rows(idx) if isinstance(wte, _gemv.TiledBF16) else F.embedding(idx, wte)

    def _probe(self, model: GPT) -> bool:
        """Check the packed kernel against nn.Linear once (exotic CPUs/builds fall back to torch)."""
        try:
            lin = model.transformer.blocks()[0].mlp.c_fc
            fc = self.layers[0][6]
            if fc.gemv:  # the kernel against torch on the same (possibly bf16) weight, widened
                assert fc.w is not None
                x = torch.randn(3, lin.in_features, dtype=torch.float32, device=self.device)
                plain = fc.w.untile() if isinstance(fc.w, _gemv.TiledBF16) else fc.w
                ref = F.gelu(F.linear(x, plain.float(), fc.b), approximate=self.config.gelu_approximate)
                got = _gemv.linear(x, fc.w, fc.b, fc.gelu_code)
                return bool(torch.allclose(got, ref, atol=1e-4, rtol=1e-4))
            x = torch.randn(3, lin.in_features, dtype=self.dtype, device=self.device)
            ref = F.gelu(F.linear(x, lin.weight.to(self.dtype), None if lin.bias is None else lin.bias.to(self.dtype)),
                         approximate=self.config.gelu_approximate)
            got = torch.ops.mkldnn._linear_pointwise(x, fc.packed, fc.b, "gelu", [], fc.approximate)
            tol = 1e-4 if self.dtype == torch.float32 else 5e-2
            return bool(torch.allclose(got.float(), ref.float(), atol=tol, rtol=tol))
        except Exception:
            return False

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        cfg = self.config
        shape = (batch_size, cfg.n_head, max_len, cfg.head_size)
        dt = self.dtype if self.model is not None else self.cache_dtype
        return KVCache(k=[torch.zeros(shape, dtype=dt, device=self.device) for _ in range(cfg.n_layer)],
                       v=[torch.zeros(shape, dtype=dt, device=self.device) for _ in range(cfg.n_layer)],
                       lengths=torch.zeros(batch_size, dtype=torch.long, device=self.device))

    def __call__(self, idx: torch.Tensor, cache: KVCache, advance: torch.Tensor | None = None,
                 logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) right-padded; appends each row at its own length; returns (B, V) fp32 logits at
        `logits_at` (default: the last position)."""
        B, T = idx.shape
        if self.model is not None:
            logits: torch.Tensor
            if logits_at is None:
                logits, _ = self.model(idx, cache=cache, advance=advance, last_only=True)
            else:
                logits, _ = self.model(idx, cache=cache, advance=advance, logits_at=logits_at)
            return logits[:, 0].float()
        cfg = self.config
        C, nh = cfg.n_embd, cfg.n_head
        hs = C // nh
        start = cache.lengths  # (B,)
        ar = torch.arange(T, device=idx.device)
        pos = start[:, None] + ar[None, :]  # (B, T)
        lo, hi = torch.stack(torch.aminmax(start)).tolist() if B > 1 else (int(start[0]),) * 2
        t_used = hi + T  # attend over the used prefix of the cache only
        if t_used > cache.max_len:
            raise ValueError(f"sequence of {t_used} tokens exceeds the cache length {cache.max_len}")
        adt = self.cache_dtype
        if T == 1 and self.blocks is not None and self.fuse_decode and B <= _GEMV_MAX_ROWS:
            # the hot path with the gemv kernel: every block of the step in one C call
            x = self.embed(idx[:, 0]) + F.embedding(start.clamp(max=cfg.block_size - 1), self.wpe)  # (B, C)
            self.blocks(x, start.contiguous(), cache.k, cache.v)
            cache.lengths = cache.lengths + (advance if advance is not None else 1)
            x = torch.layer_norm(x, (C,), self.ln_f[0], self.ln_f[1], cfg.layer_norm_epsilon)
            return self.lm_head(x).float()  # (B, V)
        if T == 1 and lo == hi:
            attn_mask = None  # one new token per row, all rows equally long: every cached key is visible
        else:
            keys = torch.arange(t_used, device=idx.device)
            visible = keys[None, None, None, :] <= pos[:, None, :, None]  # (B, 1, T, T_used) causal + row length
            # one additive mask for all layers (SDPA would convert a bool mask in every layer)
            attn_mask = torch.zeros(visible.shape, dtype=adt, device=idx.device).masked_fill_(~visible, float("-inf"))
        x = self.embed(idx) + F.embedding(pos.clamp(max=cfg.block_size - 1), self.wpe)  # (B, T, C)
        x = x.view(B * T, C)
        if lo != hi:
            scatter_idx = pos[:, None, :, None].expand(B, nh, T, hs)  # (B, nh, T, hs)
        eps = cfg.layer_norm_epsilon
        upcast = adt != self.act_dtype
        layer_norm, sdpa = torch.layer_norm, F.scaled_dot_product_attention
        decode = T == 1 and lo == hi  # the hot path: one token per row, all rows equally long
        for layer, (w1, b1, attn, proj, w2, b2, fc, fc2) in enumerate(self.layers):
            h = layer_norm(x, (C,), w1, b1, eps)
            kc, vc = cache.k[layer], cache.v[layer]
            if decode:  # fewer tensor ops: with T == 1 no transposes are needed
                qkv = attn(h)  # (B, 3C)
                q = qkv[:, :C].view(B, nh, 1, hs)
                kc[:, :, lo] = qkv[:, C:2 * C].view(B, nh, hs)
                vc[:, :, lo] = qkv[:, 2 * C:].view(B, nh, hs)
            else:
                qkv = attn(h).view(B, T, 3, nh, hs)
                q = qkv[:, :, 0].transpose(1, 2)  # (B, nh, T, hs)
                if lo == hi:  # all rows at the same length (static batch): a plain strided copy
                    kc[:, :, lo:lo + T] = qkv[:, :, 1].transpose(1, 2)
                    vc[:, :, lo:lo + T] = qkv[:, :, 2].transpose(1, 2)
                else:  # ragged rows: each row's keys go at its own offset
                    kc.scatter_(2, scatter_idx, qkv[:, :, 1].transpose(1, 2).to(adt))
                    vc.scatter_(2, scatter_idx, qkv[:, :, 2].transpose(1, 2).to(adt))
            if upcast:
                q = q.to(adt)
            y = sdpa(q, kc[:, :, :t_used], vc[:, :, :t_used], attn_mask=attn_mask)  # (B, nh, T, hs)
            y = y.reshape(B, C) if decode else y.transpose(1, 2).reshape(B * T, C)
            x = x + proj(y.to(self.act_dtype) if upcast else y)
            h = layer_norm(x, (C,), w2, b2, eps)
            x = x + fc2(fc(h, gelu=True))
        cache.lengths = cache.lengths + (advance if advance is not None else T)
        if T > 1 or logits_at is not None:
            at = logits_at if logits_at is not None else torch.full((B,), T - 1, device=idx.device)
            x = x.view(B, T, C)[torch.arange(B, device=idx.device), at]  # (B, C)
        x = layer_norm(x, (C,), self.ln_f[0], self.ln_f[1], eps)
        return self.lm_head(x).float()  # (B, V)

    def mixed(self, last: torch.Tensor, idx: torch.Tensor, lens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Decode rows [0, n) of `cache` by one token (`last` (n,)) and prefill new rows [n, n + B) from
        empty (right-padded prompts `idx` (B, T) of lengths `lens` (B,)) in ONE forward; returns
        (n + B, V) fp32 logits: each running row's next token, then each new row's first.

        Why: under continuous batching requests join a running batch one by one, and a separate
        prefill forward per join costs as much as a decode step for a small model (the cost is per
        op, not per token). Here the per-token work (embeddings, LayerNorms, matmuls, lm_head) runs
        once over the decode tokens and the prompt tokens together; only attention is done twice
        (decode queries against each row's cache, prompts causally among themselves). Same maths,
        same masks and kernels as two `__call__`s; outputs agree up to matmul rounding."""
        if self.model is not None:
            raise RuntimeError("mixed() needs the engine's own forward (kernel 'gemv', 'onednn' or 'torch', not 'model')")
        cfg = self.config
        C, nh = cfg.n_embd, cfg.n_head
        hs = C // nh
        n, (B, T) = last.shape[0], idx.shape
        dev = idx.device
        start = cache.lengths[:n]  # (n,) each running row writes its token here
        lo, hi = torch.stack(torch.aminmax(start)).tolist() if n > 1 else (int(start[0]),) * 2
        t_used = hi + 1
        if t_used > cache.max_len or T > cache.max_len or n + B > cache.batch_size:
            raise ValueError(f"mixed step of {n} + {B} rows x {max(t_used, T)} positions exceeds the cache "
                             f"({cache.batch_size} x {cache.max_len})")
        adt = self.cache_dtype
        ninf = float("-inf")
        dec_mask = None  # decode rows all equally long: every cached key is visible
        if lo != hi:
            keys = torch.arange(t_used, device=dev)
            hidden = keys[None, None, None, :] > start[:, None, None, None]  # (n, 1, 1, t_used)
            dec_mask = torch.zeros(hidden.shape, dtype=adt, device=dev).masked_fill_(hidden, ninf)
            scatter_idx = start[:, None, None, None].expand(n, nh, 1, hs)  # (n, nh, 1, hs)
        ar = torch.arange(T, device=dev)
        # prompts start at position 0: plain causal attention (a pad query's output is never used)
        pre_mask = torch.zeros(T, T, dtype=adt, device=dev).masked_fill_(ar[None, :] > ar[:, None], ninf)
        pre_mask = pre_mask.expand(B, 1, T, T)
        tok = torch.cat([last, idx.reshape(B * T)])  # (N,) N = n + B*T: decode tokens, then prompts
        pos = torch.cat([start, ar.repeat(B)]).clamp_(max=cfg.block_size - 1)
        x = self.embed(tok) + F.embedding(pos, self.wpe)  # (N, C)
        eps = cfg.layer_norm_epsilon
        upcast = adt != self.act_dtype
        layer_norm, sdpa = torch.layer_norm, F.scaled_dot_product_attention
        for layer, (w1, b1, attn, proj, w2, b2, fc, fc2) in enumerate(self.layers):
            h = layer_norm(x, (C,), w1, b1, eps)
            qkv = attn(h)  # (N, 3C)
            kc, vc = cache.k[layer], cache.v[layer]
            d = qkv[:n]  # (n, 3C) the running rows' new token
            qd = d[:, :C].view(n, nh, 1, hs)
            if lo == hi:
                kc[:n, :, lo] = d[:, C:2 * C].view(n, nh, hs)
                vc[:n, :, lo] = d[:, 2 * C:].view(n, nh, hs)
            else:
                kc[:n].scatter_(2, scatter_idx, d[:, C:2 * C].view(n, nh, 1, hs).to(adt))
                vc[:n].scatter_(2, scatter_idx, d[:, 2 * C:].view(n, nh, 1, hs).to(adt))
            p = qkv[n:].view(B, T, 3, nh, hs)  # the new prompts
            kc[n:n + B, :, :T] = p[:, :, 1].transpose(1, 2)
            vc[n:n + B, :, :T] = p[:, :, 2].transpose(1, 2)
            qp = p[:, :, 0].transpose(1, 2)  # (B, nh, T, hs)
            if upcast:
                qd, qp = qd.to(adt), qp.to(adt)
            yd = sdpa(qd, kc[:n, :, :t_used], vc[:n, :, :t_used], attn_mask=dec_mask)  # (n, nh, 1, hs)
            yp = sdpa(qp, kc[n:n + B, :, :T], vc[n:n + B, :, :T], attn_mask=pre_mask)  # (B, nh, T, hs)
            y = torch.cat([yd.reshape(n, C), yp.transpose(1, 2).reshape(B * T, C)])  # (N, C)
            x = x + proj(y.to(self.act_dtype) if upcast else y)
            h = layer_norm(x, (C,), w2, b2, eps)
            x = x + fc2(fc(h, gelu=True))
        cache.lengths[:n] += 1
        cache.lengths[n:n + B] = lens
        sel = torch.cat([torch.arange(n, device=dev), n + torch.arange(B, device=dev) * T + lens - 1])
        x = layer_norm(x[sel], (C,), self.ln_f[0], self.ln_f[1], eps)  # (n + B, C)
        return self.lm_head(x).float()  # (n + B, V)
