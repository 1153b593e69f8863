"""GPT-2 in one file: the model, its KV cache, and FLOP accounting.

    from gptcore.model import GPT, KVCache
    model = GPT(GPTConfig(...))
    logits, loss = model(idx, targets)                      # training
    cache = model.new_cache(batch_size=B, max_len=T_max)    # inference
    logits, _ = model(prompt_ids, cache=cache, last_only=True)

Architecture = OpenAI GPT-2 (learned positions, pre-LayerNorm, tanh-GELU, tied embeddings), with
parameter names chosen so every tensor maps 1:1 onto Hugging Face's GPT2LMHeadModel
(`gptcore.hf` does that mapping; HF's Conv1D stores weights transposed).

Does not: know about devices beyond the tensors it is given, distributed training, or sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn
from torch.nn import functional as F

from gptcore.config import GPTConfig


@dataclass
class KVCache:
    """Pre-allocated keys/values for incremental decoding, one slot (row) per sequence.

    Each row has its own length, so rows of a ragged batch (or requests that joined a running
    batch at different times) advance independently: a step writes row b's new keys at
    lengths[b] and attends to keys [0, lengths[b] + i]. Prompts are RIGHT-padded: the garbage a
    pad token leaves past a row's length is overwritten by that row's next real token, and never
    attended to because of the length mask. Pre-allocation (instead of torch.cat per step) keeps
    decode cost flat and allocation-free.
    """

    k: list[torch.Tensor]  # n_layer x (B, nh, T_max, hs)
    v: list[torch.Tensor]  # n_layer x (B, nh, T_max, hs)
    lengths: torch.Tensor  # (B,) long: valid positions per row

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def reorder(self, index: torch.Tensor) -> None:
        """Gather rows (beam search: continue from the surviving beams)."""
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]
        self.lengths = self.lengths.index_select(0, index)

    def copy_rows_from(self, other: KVCache, dst_rows: torch.Tensor, src_rows: torch.Tensor | None = None) -> None:
        """Copy rows of another cache (e.g. a freshly prefilled request) into slots of this one."""
        if src_rows is None:
            src_rows = torch.arange(other.batch_size, device=dst_rows.device)
        t = min(other.max_len, self.max_len)
        for layer in range(len(self.k)):
            self.k[layer][dst_rows, :, :t] = other.k[layer][src_rows, :, :t]
            self.v[layer][dst_rows, :, :t] = other.v[layer][src_rows, :, :t]
        self.lengths[dst_rows] = other.lengths[src_rows]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        # q, k, v projections for all heads in one matmul (HF: attn.c_attn)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache | None,
                attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.size()  # (B, T, C)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        if cache is not None:
            # write the new keys at each row's own offset, then attend over the used prefix
            pos = cache.lengths[:, None] + torch.arange(T, device=x.device)[None, :]  # (B, T)
            idx = pos[:, None, :, None].expand(B, self.n_head, T, C // self.n_head)  # (B, nh, T, hs)
            cache.k[layer].scatter_(2, idx, k.to(cache.k[layer].dtype))
            cache.v[layer].scatter_(2, idx, v.to(cache.v[layer].dtype))
            assert attn_mask is not None  # GPT.forward builds one whenever it passes a cache
            t_used = attn_mask.shape[-1]  # the mask was built for the used prefix of the cache
            k = cache.k[layer][:, :, :t_used]  # (B, nh, T_used, hs)
            v = cache.v[layer][:, :, :t_used]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0)
        else:
            y = self._attend(q, k, v, attn_mask, dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C) re-assemble heads
        out: torch.Tensor = self.resid_dropout(self.c_proj(y))
        return out

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                dropout_p: float) -> torch.Tensor:
        """Attention over the whole sequence (training, scoring); q, k, v (B, nh, T, hs) -> (B, nh, T, hs)."""
        T = q.size(-2)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            if T <= 256:
                # bf16 on a CPU, short sequences: two batched bf16 matmuls around an fp32 softmax. PyTorch's
                # CPU flash-attention kernel pays a per-block overhead that dominates at small T and head
                # sizes (and its bf16 backward is ~3x slower than fp32). Measured fwd+bwd, compiled: 1.3x
                # faster at T 64 / hs 32 (the nanoGPT CPU recipe: +12% per training step), 1.5x at T 256 /
                # hs 64, but 0.9x at T 512 and 0.5x at 1024, where the (T, T) scores also cost memory.
                att = (q @ k.transpose(-2, -1)).float() * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, T, T)
                if attn_mask is None:
                    attn_mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
                if attn_mask.dtype == torch.bool:
                    att = att.masked_fill(~attn_mask, float("-inf"))
                else:
                    att = att + attn_mask
                att = att.softmax(dim=-1)
                if dropout_p:
                    att = F.dropout(att, dropout_p)
                return att.to(v.dtype) @ v  # (B, nh, T, hs)
            # longer sequences: the flash kernel in fp32 (its bf16 backward is the slow one); the
            # projections around it stay bf16
            with torch.autocast("cpu", enabled=False):
                mask = attn_mask.float() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
                return F.scaled_dot_product_attention(
                    q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p,
                    is_causal=attn_mask is None).to(q.dtype)
        if attn_mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        # the fused causal kernel: no mask tensor is materialised
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        # GPT-2 uses the tanh approximation of GELU ("gelu_new" in HF); config.activation="gelu" is the exact one
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))
        return y


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache | None,
                attn_mask: torch.Tensor | None) -> torch.Tensor:
        # pre-LayerNorm residual block (GPT-2): the residual stream itself is never normalised
        x = x + self.attn(self.ln_1(x), layer, cache, attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    """The trunk's modules under GPT-2's names (transformer.wte, .wpe, .h.{i}, .ln_f); a container
    without a forward of its own (GPT.forward runs it).

    Why a class and not an nn.ModuleDict: the same state-dict names, order and initialisation, but
    typed attributes, so code reaching into the weights (gptcore.engine_forward, gptcore.hf) is
    type-checked."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)

    def blocks(self) -> list[Block]:
        """The layers, typed (nn.ModuleList yields plain Modules)."""
        return [cast(Block, b) for b in self.h]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (GPT-2): the output projection is the token embedding
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) so the stream's variance
        # does not grow with depth
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---- accounting -------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. Position embeddings are excluded by default (as in nanoGPT); token
        embeddings count because they are tied to, and used as, the output projection."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token, PaLM appendix B: 6N + 12 L H Q T."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * T

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s as a fraction of `peak_flops`."""
        return self.flops_per_token(seq_len) * tokens_per_second / peak_flops

    # ---- forward ----------------------------------------------------------------------------

    def new_cache(self, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> KVCache:
        cfg = self.config
        max_len = max_len or cfg.block_size
        if max_len > cfg.block_size:
            raise ValueError(f"cache max_len must be <= block_size ({cfg.block_size}), got {max_len}")
        p = self.lm_head.weight
        dtype = dtype or p.dtype
        device = device or p.device
        shape = (batch_size, cfg.n_head, max_len, cfg.head_size)
        return KVCache(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)],
            lengths=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    def forward(
        self,
        idx: torch.Tensor,  # (B, T) token ids
        targets: torch.Tensor | None = None,  # (B, T) next-token ids; -1 = no loss (padding, prompt)
        *,
        cache: KVCache | None = None,  # decode incrementally; advances cache.lengths by `advance`
        advance: torch.Tensor | None = None,  # (B,) how many of the T tokens are real per row (default T)
        doc_ids: torch.Tensor | None = None,  # (B, T) document index per token: attention stays inside a document
        last_only: bool = False,  # only compute logits at the last position of each row (saves B*T*V)
        logits_at: torch.Tensor | None = None,  # (B,) compute logits only at these positions
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.size()
        device = idx.device
        attn_mask = None
        if cache is not None:
            start = cache.lengths  # (B,)
            pos = start[:, None] + torch.arange(T, device=device)[None, :]  # (B, T)
            t_used = int(start.max()) + T
            if t_used > cache.max_len:
                raise ValueError(f"sequence of {t_used} tokens exceeds the cache length {cache.max_len}")
            # key j is visible to query i of row b iff j <= start[b] + i (causal + row length)
            keys = torch.arange(t_used, device=device)[None, None, None, :]  # (1, 1, 1, T_used)
            attn_mask = keys <= pos[:, None, :, None]  # (B, 1, T, T_used)
            pos = pos.clamp(max=self.config.block_size - 1)  # pad positions past the end are garbage anyway
        else:
            if T > self.config.block_size:
                raise ValueError(f"cannot forward a sequence of length {T}: block_size is "
                                 f"{self.config.block_size}; truncate the input or use a larger model")
            pos = torch.arange(T, device=device)[None, :]  # (1, T)
            if doc_ids is not None:
                # causal AND same document: packed documents do not see each other
                causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
                attn_mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal  # (B, T, T)
                attn_mask = attn_mask[:, None]  # (B, 1, T, T)

        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, i, cache, attn_mask)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if cache is not None:
            cache.lengths = cache.lengths + (advance if advance is not None else T)

        if targets is not None:
            logits = self.lm_head(x)  # (B, T, V)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
            return logits, loss
        if logits_at is not None:
            x = x[torch.arange(B, device=device), logits_at][:, None]  # (B, 1, C)
        elif last_only:
            x = x[:, -1:]  # (B, 1, C)
        return self.lm_head(x), None

    @torch.no_grad()
    def forward_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits without cache (parity tests, scoring)."""
        logits: torch.Tensor = self(idx)[0]
        return logits
