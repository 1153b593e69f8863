"""Tokenize, split and pack: documents -> rows of block_size+1 token ids with document boundaries.

    tok_step = Tokenize(tokenizer_json, cfg)      # in Ray Data tasks: batch of docs -> ids (+ loss mask)
    packer = Packer(block_size)                   # on the driver, per split, in input order
    for ids, doc_ids, mask in packer.add(flat_ids, doc_lengths): ...

Pretraining: every document gets EOS appended, documents are concatenated in input order and cut
into windows of block_size+1 tokens with stride block_size (consecutive windows share one token, so
every next-token transition is trained exactly once); `doc_ids` numbers the documents inside each
window from 0 so training can mask attention across documents. The tail shorter than a window is
dropped and counted. Train/val: a document goes to val when a keyed blake2b hash of its text falls
below val_fraction (deterministic, independent of order and of the number of workers); with
split_by=position every document is cut instead: its first 1 - val_fraction of characters go to train,
the rest to val (nanoGPT's split of one long text), each part encoded on its own.
SFT (the choice made here): mode "pad" (default) puts one example per row, prompt then completion,
padded with EOS to block_size+1 (pad: loss_mask 0, doc_ids 1) or shortened by cutting the end of the
longest prompt field (template text is kept); loss_mask is 0 on prompt tokens and 1 on completion
tokens including the template's <|endoftext|>. Mode "pack" concatenates examples like pretraining and
keeps the per-token loss_mask. Templates are split at special-token strings (those become their ids);
the text pieces are encoded without specials, so data containing "<|endoftext|>" stays plain text.
Does not: write files (pipelines.data.write) or train the tokenizer (pipelines.data.pipeline).
"""

from __future__ import annotations

import hashlib
import os
import re
import string
from typing import Any

import numpy as np

from pipelines.data.config import PrepError, SFTSpec

_TOKENIZERS: dict[str, Any] = {}


def get_tokenizer(json_str: str):
    """One Tokenizer per process and tokenizer (building the tiktoken encoder is not free)."""
    key = hashlib.sha256(json_str.encode()).hexdigest()
    tok = _TOKENIZERS.get(key)
    if tok is None:
        from gptcore.tokenizer import Tokenizer

        tok = Tokenizer.from_json_str(json_str)
        _TOKENIZERS[key] = tok
    return tok


def split_is_val(texts: list[str], fraction: float, seed: int) -> np.ndarray:
    """(n,) bool: document goes to val. blake2b keyed by the seed, first 8 bytes as a uniform in [0, 1)."""
    if fraction <= 0:
        return np.zeros(len(texts), dtype=bool)
    key = str(seed).encode()[:64]
    cut = int(fraction * 2**64)
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(t.encode("utf-8", "replace"), digest_size=8, key=key).digest(), "little")
         < cut for t in texts), dtype=bool, count=len(texts))


def _tiktoken_arrays(enc, texts: list[str], num_threads: int | None) -> list[np.ndarray]:
    """tiktoken `encode_to_numpy` (ordinary text, special-token strings stay text), in threads over chunks
    (tiktoken releases the GIL while encoding)."""
    def work(chunk: list[str]) -> list[np.ndarray]:
        return [enc.encode_to_numpy(t, disallowed_special=()).astype(np.int32) for t in chunk]

    threads = num_threads or min(4, os.cpu_count() or 1)
    if threads <= 1 or len(texts) < 2 * threads:
        return work(texts)
    from concurrent.futures import ThreadPoolExecutor

    n_chunks = threads * 4
    bounds = [len(texts) * k // n_chunks for k in range(n_chunks + 1)]
    out: list[np.ndarray] = []
    with ThreadPoolExecutor(threads) as ex:
        for part in ex.map(work, [texts[bounds[k]:bounds[k + 1]] for k in range(n_chunks)]):
            out.extend(part)
    return out


# ------------------------------------------------------------------------------------------- templates

def template_segments(tpl: str, specials: dict[str, int]) -> list[tuple[str, Any]]:
    """Split a template into ("lit", text) / ("field", name) / ("special", id) segments, in order."""
    if specials:
        pat = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    else:
        pat = None
    out: list[tuple[str, Any]] = []
    pieces = []
    pos = 0
    if pat is not None:
        for m in pat.finditer(tpl):
            pieces.append(("text", tpl[pos:m.start()]))
            pieces.append(("special", specials[m.group()]))
            pos = m.end()
    pieces.append(("text", tpl[pos:]))
    for kind, val in pieces:
        if kind == "special":
            out.append(("special", val))
            continue
        for lit, fname, spec, conv in string.Formatter().parse(val):
            if lit:
                out.append(("lit", lit))
            if fname:
                out.append(("field", (fname, spec or "", conv)))
    unknown = re.findall(r"<\|[^|<>]+\|>", pat.sub("", tpl) if pat is not None else tpl)
    if unknown:
        raise PrepError(f"sft template {tpl!r} uses {unknown}, which the tokenizer does not have as special "
                        f"tokens {sorted(specials)}; fix the template or add tokenizer.special_tokens")
    return out


def _render_field(seg: tuple[str, str, str | None], rec: dict[str, str]) -> str:
    name, spec, conv = seg
    v: Any = rec[name]
    if conv == "r":
        v = repr(v)
    elif conv == "s":
        v = str(v)
    return format(v, spec) if spec else str(v)


# ------------------------------------------------------------------------------------------- tokenize

class Tokenize:
    """The tokenize step (runs in Ray Data tasks). Adds `_ids` (int32 values + offsets), `_mask` (SFT),
    `_val` (bool); drops: tokenize:empty, tokenize:too_long, tokenize:unknown_char."""

    name = "tokenize"

    def __init__(self, tokenizer_json: Any, kind: str, block_size: int, val_fraction: float, split_seed: int,
                 sft: SFTSpec | None = None, num_threads: int | None = None, split_by: str = "document"):
        self._json = tokenizer_json
        self.kind, self.block_size = kind, block_size
        self.val_fraction, self.split_seed, self.sft = val_fraction, split_seed, sft
        self.num_threads = num_threads
        self.split_by = split_by

    def _tok(self):
        j = self._json
        if not isinstance(j, str):
            import ray

            j = ray.get(j)
        return get_tokenizer(j)

    def __call__(self, batch: dict[str, list]) -> dict[str, Any]:
        tok = self._tok()
        drops = list(batch["drop"])
        alive = [i for i, d in enumerate(drops) if not d]
        n = len(drops)
        out = dict(batch)
        masks = None
        if self.kind == "sft":
            lists, masks = self._sft(tok, batch, alive, drops)
            arrs = [np.asarray(x, dtype=np.int32) for x in lists]
        elif self.split_by == "position":
            arrs, cuts = self._encode_by_position(tok, [batch["text"][i] for i in alive], alive, drops)
        else:
            arrs = self._encode_arrays(tok, [batch["text"][i] for i in alive], alive, drops)
        empty = np.zeros(0, np.int32)
        full: list[np.ndarray] = [empty] * n  # dropped rows get empty lists
        full_masks: list[np.ndarray] | None = [empty.astype(np.int8)] * n if masks is not None else None
        still = []
        for k, i in enumerate(alive):
            if drops[i]:
                continue
            if arrs[k].size == 0:
                drops[i] = "tokenize:empty"
                continue
            full[i] = arrs[k]
            if full_masks is not None:
                full_masks[i] = np.asarray(masks[k], dtype=np.int8)
            still.append(i)
        is_val = np.zeros(n, dtype=bool)
        if still:
            is_val[still] = split_is_val([batch["text"][i] for i in still], self.val_fraction, self.split_seed)
        eos = tok.eos_id if self.kind == "pretrain" else None
        if self.split_by == "position":  # (train part [EOS], val part [EOS]); _cut: tokens that go to train
            out["_cut"] = self._join_parts(full, arrs, cuts, alive, still, eos)
        elif eos is not None:  # pretraining: EOS after every document
            eos_arr = np.array([eos], np.int32)
            for i in still:
                full[i] = np.concatenate([full[i], eos_arr])
        lens = np.fromiter((a.size for a in full), dtype=np.int64, count=n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        out["drop"] = drops
        out["_ids"] = (np.concatenate(full) if n else empty, offsets)
        if full_masks is not None:
            out["_mask"] = np.concatenate(full_masks) if n else empty.astype(np.int8)
        out["_val"] = is_val
        return out

    def _encode_by_position(self, tok, texts: list[str], alive: list[int], drops: list[str]):
        """Each text cut at int(len * (1 - val_fraction)) characters (nanoGPT: data[:int(n*0.9)]); both parts
        encoded. Returns (ids of the whole row (train part then val part), train token count per row)."""
        cut_chars = [int(len(t) * (1.0 - self.val_fraction)) for t in texts]
        parts = self._encode_arrays(tok, [t[:c] for t, c in zip(texts, cut_chars)] +
                                    [t[c:] for t, c in zip(texts, cut_chars)], alive + alive, drops)
        n = len(texts)
        arrs = [np.concatenate([parts[k], parts[n + k]]) for k in range(n)]
        return arrs, [int(parts[k].size) for k in range(n)]

    @staticmethod
    def _join_parts(full: list[np.ndarray], arrs: list[np.ndarray], cuts: list[int], alive: list[int],
                    still: list[int], eos: int | None) -> np.ndarray:
        """Rows become train part [+EOS] then val part [+EOS] (an empty part gets no EOS); returns the
        number of leading tokens of each row that go to train."""
        out = np.zeros(len(full), dtype=np.int64)
        pos = {i: k for k, i in enumerate(alive)}
        tail = [] if eos is None else [eos]
        for i in still:
            a, c = arrs[pos[i]], cuts[pos[i]]
            tr, va = a[:c], a[c:]
            tr = np.concatenate([tr, np.array(tail, np.int32)]) if tr.size else tr
            va = np.concatenate([va, np.array(tail, np.int32)]) if va.size else va
            full[i] = np.concatenate([tr, va]).astype(np.int32, copy=False)
            out[i] = tr.size
        return out

    def _encode_arrays(self, tok, texts: list[str], alive: list[int], drops: list[str]) -> list[np.ndarray]:
        """Texts -> int32 id arrays. BPE on tiktoken: straight into numpy buffers (no Python int lists),
        threads over chunks; otherwise Tokenizer.encode_batch."""
        if not texts:
            return []
        enc = getattr(tok, "_enc", None) if getattr(tok, "backend", "") == "tiktoken" else None
        if enc is not None:
            try:
                return _tiktoken_arrays(enc, texts, self.num_threads)
            except (UnicodeEncodeError, ValueError, TypeError, AttributeError):
                pass  # lone surrogates or an unexpected tiktoken: take the Tokenizer's own path
        return [np.asarray(x, dtype=np.int32) for x in self._encode(tok, texts, alive, drops)]

    def _encode(self, tok, texts: list[str], alive: list[int], drops: list[str]) -> list[list[int]]:
        if not texts:
            return []
        try:
            return tok.encode_batch(texts, num_threads=self.num_threads)
        except ValueError:  # char tokenizer: an unknown character in some document -> per-doc fallback
            res: list[list[int]] = []
            for k, t in enumerate(texts):
                try:
                    res.append(tok.encode(t))
                except ValueError:
                    drops[alive[k]] = "tokenize:unknown_char"
                    res.append([])
            return res

    # ---------------------------------------------------------------------------------------- SFT
    def _sft(self, tok, batch: dict[str, list], alive: list[int], drops: list[str]):
        sft = self.sft
        specials = dict(tok.special_tokens)
        p_segs = template_segments(sft.prompt_template, specials)
        c_segs = template_segments(sft.completion_template, specials)
        segs = p_segs + c_segs
        n_p = len(p_segs)
        # encode every text piece of every example in ONE encode_batch call
        pieces: list[str] = []
        owners: list[int] = []  # example row of each piece (an encoding failure drops that example)
        for i in alive:
            rec = {k: batch[k][i] for k in batch if isinstance(batch[k], list)}
            for kind, val in segs:
                if kind == "lit":
                    pieces.append(val)
                    owners.append(i)
                elif kind == "field":
                    pieces.append(_render_field(val, rec))
                    owners.append(i)
        enc = self._encode(tok, pieces, owners, drops) if pieces else []
        lists: list[list[int]] = []
        masks: list[list[int]] = []
        T1 = self.block_size + 1
        pad = tok.eos_id if tok.eos_id is not None else 0
        k = 0
        for i in alive:
            parts: list[list[int]] = []
            for kind, val in segs:
                if kind == "special":
                    parts.append([val])
                else:
                    parts.append(enc[k])
                    k += 1
            if drops[i]:  # a piece failed to encode (char tokenizer, unknown character)
                lists.append([]), masks.append([])
                continue
            prompt_parts, comp_parts = parts[:n_p], parts[n_p:]
            comp = [t for p in comp_parts for t in p]
            plen = sum(len(p) for p in prompt_parts)
            over = plen + len(comp) - T1
            if over > 0:
                field_idx = [j for j, (kind, _) in enumerate(p_segs) if kind == "field"]
                if sft.truncate == "drop" or not field_idx:
                    drops[i] = "tokenize:too_long"
                    lists.append([]), masks.append([])
                    continue
                longest = max(field_idx, key=lambda j: len(prompt_parts[j]))
                keep = len(prompt_parts[longest]) - over
                if keep < 0 or plen - over < sft.min_prompt_tokens:
                    drops[i] = "tokenize:too_long"
                    lists.append([]), masks.append([])
                    continue
                prompt_parts[longest] = prompt_parts[longest][:keep]
            prompt = [t for p in prompt_parts for t in p]
            ids = prompt + comp
            mask = [0] * len(prompt) + [1] * len(comp)
            if not comp:
                drops[i] = "tokenize:empty"
                lists.append([]), masks.append([])
                continue
            if sft.mode == "pad":
                npad = T1 - len(ids)
                ids = ids + [pad] * npad
                mask = mask + [0] * npad
            lists.append(ids)
            masks.append(mask)
        return lists, masks


# ------------------------------------------------------------------------------------------- packing

class Packer:
    """Sequential packer for one split (driver side). Feed documents in order; get full windows."""

    def __init__(self, block_size: int, with_mask: bool = False):
        self.T = block_size
        self.with_mask = with_mask
        self._ids = np.zeros(0, np.int32)
        self._doc = np.zeros(0, np.int64)
        self._mask = np.zeros(0, np.int8)
        self._next_doc = 0
        self.tokens_in = 0
        self.windows = 0

    def add(self, ids: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None):
        """ids (N,) int32 concatenated documents with lengths (D,); returns (ids, doc_ids, mask|None) windows
        as (W, T+1) arrays (W may be 0)."""
        T, T1 = self.T, self.T + 1
        self.tokens_in += int(ids.size)
        doc = np.repeat(np.arange(self._next_doc, self._next_doc + lengths.size, dtype=np.int64), lengths)
        self._next_doc += int(lengths.size)
        self._ids = np.concatenate([self._ids, ids.astype(np.int32, copy=False)])
        self._doc = np.concatenate([self._doc, doc])
        if self.with_mask:
            self._mask = np.concatenate([self._mask, mask.astype(np.int8, copy=False)])
        n = self._ids.size
        W = (n - 1) // T if n >= T1 else 0  # windows [wT, wT+T+1)
        if W == 0:
            return None
        idx = np.arange(W)[:, None] * T + np.arange(T1)[None, :]  # (W, T+1)
        win_ids = self._ids[idx]
        d = self._doc[idx]
        win_doc = (d - d[:, :1]).astype(np.int32)
        win_mask = self._mask[idx] if self.with_mask else None
        cut = W * T  # the last window's final token starts the next window
        self._ids, self._doc = self._ids[cut:], self._doc[cut:]
        if self.with_mask:
            self._mask = self._mask[cut:]
        self.windows += W
        return win_ids, win_doc, win_mask

    def tail_tokens(self) -> int:
        """Tokens never used as a window input (dropped at the end)."""
        return int(max(self._ids.size - 1, 0)) if self.windows else int(self._ids.size)
