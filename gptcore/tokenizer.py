"""Tokenizers: byte-level BPE (trained with HF `tokenizers`, encoded with `tiktoken`) and char-level, one interface.

    from gptcore.tokenizer import Tokenizer, train_bpe, train_char
    tok = train_bpe(texts, vocab_size=4096); tok.save("tokenizer.json"); tok = Tokenizer.load("tokenizer.json")
    ids = tok.encode_batch(["Hello world", "Bonjour"]); text = tok.decode(ids[0])
    tests: .venv/bin/python -m pytest tests/gptcore/test_tokenizer.py -q

File format. Both kinds are saved as ONE Hugging Face `tokenizers` JSON file, so one loader serves both and
`tokenizers.Tokenizer.from_file` / transformers' fast tokenizers read them too:
  - "bpe":  model BPE + ByteLevel pre-tokenizer (GPT-2 regex, no prefix space) + ByteLevel decoder, exactly what
            `tokenizers`' BpeTrainer writes. Special tokens are HF "added tokens" (the trainer gives them ids
            0..k-1, so the default `<|endoftext|>` is id 0).
  - "char": model WordLevel whose vocabulary is the sorted set of characters (Unicode code points) seen in
            training, nanoGPT style (ids 0..n-1 in code point order; tinyshakespeare gives 65), a Split
            pre-tokenizer on the regex `[\\s\\S]` (one piece per code point) and a Fuse decoder (pieces are
            concatenated, not joined with spaces). Special tokens are added tokens with ids n, n+1, ...
            HF rejects unknown top-level keys, so the kind is recognised from this structure, not from a tag.
`Tokenizer.id` is the sha256 of the exact file bytes; training and saving are deterministic (same texts ->
byte-identical file -> same id), and a loaded file is kept verbatim so re-saving it reproduces its bytes.

Encoding. BPE ids come from a `tiktoken.Encoding` built from the trained vocabulary: mergeable rank = HF id
(the trainer assigns ids in merge order, so rank order == merge order), same pre-tokenisation regex as HF's
ByteLevel. tiktoken's rule (merge any adjacent pair whose concatenation is a token; return a whole pre-token
that is a token) only equals HF's merge-list rule when the vocabulary is "merge consistent":
`tokenizer_formats.tiktoken_problem` checks on load that ids are dense, each merge makes a new token, ids
increase with merge index, every non-byte token comes from a merge and every token re-encodes (HF) to itself.
Otherwise encoding falls back to the `tokenizers` backend, so ids are always the `tokenizers` ids. The last
condition is necessary (tiktoken's whole-pre-token shortcut); that the set is sufficient was checked by exhaustive
search (random merge lists over 2-3 letter alphabets, every string up to length 7-9: zero differences when the
conditions hold, differences in ~all lists where they fail), and the tests prove parity on the real corpora
in ../shared/data and on random Unicode. HF-trained vocabularies met the conditions in every case tried.
Plain `encode` never turns the literal text "<|endoftext|>" into the special id; pass `allowed_special`.
Lone surrogates in a Python str (not valid UTF-8) are replaced by U+FFFD, as tiktoken does.

Where things live. This module is the interface (the Tokenizer class, train_bpe, train_char); the per-kind
file checks and the tiktoken consistency test are in gptcore.tokenizer_formats, training in
gptcore.tokenizer_train.

Does not: normalise text (no NFC/lowercasing), add BOS/EOS by itself, pad, truncate, or download anything.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import numpy.typing as npt
import tiktoken
from tokenizers import Tokenizer as HFTokenizer

from gptcore.tokenizer_formats import (
    BYTE_LEVEL_PATTERN,
    EOT,
    TokenizerError,
    fix_surrogates,
    parse_bpe,
    parse_char,
    tiktoken_problem,
)
from gptcore.tokenizer_train import train_bpe_json, train_char_json

__all__ = ["Tokenizer", "TokenizerError", "train_bpe", "train_char", "EOT"]


def _default_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _as_id_list(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):  # numpy array / torch tensor
        ids = ids.tolist()
    if isinstance(ids, int):
        raise TokenizerError(f"decode: ids must be a sequence of ints, got a single int {ids}; fix: pass [{ids}]")
    ids = list(ids)
    if ids and not all(type(i) is int for i in ids):
        try:
            ids = [operator.index(i) for i in ids]  # numpy ints; rejects floats and str
        except TypeError:
            bad = next(i for i in ids if not hasattr(i, "__index__"))
            raise TokenizerError(f"decode: token ids must be ints, got {bad!r} ({type(bad).__name__})") from None
    checked: list[int] = ids
    return checked



class Tokenizer:
    """One tokenizer of kind "bpe" or "char". Build with `train_bpe`, `train_char`, `load` or `from_json_str`."""

    def __init__(self, json_str: str, *, source: str = "<string>") -> None:
        if not isinstance(json_str, str):
            raise TokenizerError(f"Tokenizer JSON must be a str, got {type(json_str).__name__}")
        self._json = json_str
        self._id = hashlib.sha256(json_str.encode("utf-8")).hexdigest()
        try:
            spec = json.loads(json_str)
        except json.JSONDecodeError as e:
            raise TokenizerError(
                f"{source} is not a tokenizer file: it is not JSON ({e}); expected the Hugging Face `tokenizers` "
                "JSON written by gptcore.tokenizer (Tokenizer.save) or by tokenizers.Tokenizer.save"
            ) from None
        if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict) or "type" not in spec["model"]:
            raise TokenizerError(
                f"{source} is JSON but not a Hugging Face `tokenizers` file (no 'model' object with a 'type'); "
                "expected the tokenizer.json written by Tokenizer.save"
            )
        self._source = source
        self._hf_cache: dict[bool, HFTokenizer] = {}
        self._specials: dict[str, int] = {}
        # set by _init_bpe / _init_char: the fast BPE encoder (None: not usable, see _tiktoken_problem)
        self._enc: tiktoken.Encoding | None = None
        self._tiktoken_problem: str | None = None
        self._id_to_bytes: list[bytes] = []  # bpe: id -> bytes
        self._itos: list[str] = []  # char: id -> character
        self._lut: npt.NDArray[np.int64] = np.full(0, -1, dtype=np.int64)  # char: code point -> id
        self._vocab_size = 0
        for tok in spec.get("added_tokens") or []:
            if not tok.get("special", False):
                raise TokenizerError(
                    f"{source}: added token {tok.get('content')!r} is not special; only special added tokens "
                    "are supported (they are never split); re-train with it in special_tokens"
                )
            self._specials[tok["content"]] = int(tok["id"])
        mtype = spec["model"]["type"]
        if mtype == "BPE":
            self._kind = "bpe"
            self._init_bpe(spec)
        elif mtype == "WordLevel":
            self._kind = "char"
            self._init_char(spec)
        else:
            raise TokenizerError(
                f"{source}: unsupported tokenizer model type {mtype!r}; supported: byte-level 'BPE' "
                "(train_bpe) and char-level 'WordLevel' (train_char)"
            )
        self._special_ids = frozenset(self._specials.values())
        self._special_re = (
            re.compile("|".join(re.escape(s) for s in sorted(self._specials, key=len, reverse=True)))
            if self._specials
            else None
        )

    # ------------------------------------------------------------------ construction per kind
    def _init_bpe(self, spec: dict[str, Any]) -> None:
        bpe = parse_bpe(spec, self._specials, self._source)
        self._id_to_bytes = bpe.id_to_bytes
        self._vocab_size = bpe.vocab_size
        if bpe.ignore_merges:
            # HF then returns an in-vocabulary pre-token whole and only merges the rest: not tiktoken's rule.
            problem: str | None = "model.ignore_merges is true"
        else:
            problem = tiktoken_problem(bpe.vocab, bpe.merges, self._specials, self._hf_model_tokenize())
        self._tiktoken_problem = problem
        if problem is None:
            ranks = {bpe.id_to_bytes[i]: i for i in range(bpe.vocab_size) if i not in self._specials.values()}
            self._enc = tiktoken.Encoding(
                f"raygpt-{self._id[:12]}", pat_str=BYTE_LEVEL_PATTERN, mergeable_ranks=ranks,
                special_tokens=dict(self._specials),
            )
        else:
            self._enc = None
            warnings.warn(
                f"{self._source}: tiktoken fast path disabled ({problem}); encoding with the `tokenizers` backend "
                "(same ids, slower)",
                stacklevel=3,
            )

    def _hf_model_tokenize(self) -> Callable[[str], list[int]]:
        hf = self._hf(plain=True)

        def tokenize(token: str) -> list[int]:
            return [t.id for t in hf.model.tokenize(token)]

        return tokenize

    def _init_char(self, spec: dict[str, Any]) -> None:
        chars = parse_char(spec, self._specials, self._source)
        self._itos = chars.itos
        self._vocab_size = chars.vocab_size
        self._enc = None
        self._tiktoken_problem = "char-level tokenizer"
        self._lut = chars.lut  # code point -> id, so encoding is one vectorised gather

    # ------------------------------------------------------------------ properties
    @property
    def kind(self) -> str:
        """"bpe" or "char"."""
        return self._kind

    @property
    def id(self) -> str:
        """sha256 hex of the saved JSON file bytes."""
        return self._id

    @property
    def vocab_size(self) -> int:
        """Total number of ids, special tokens included (ids are 0..vocab_size-1)."""
        return self._vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    @property
    def eos_id(self) -> int | None:
        """Id of `<|endoftext|>`, or None when this tokenizer has no such special token."""
        return self._specials.get(EOT)

    @property
    def backend(self) -> str:
        """What `encode` uses by default: "tiktoken" (BPE fast path), "hf" (BPE fallback) or "char"."""
        if self._kind == "char":
            return "char"
        return "tiktoken" if self._enc is not None else "hf"

    def __len__(self) -> int:
        return self._vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self._kind!r}, vocab_size={self._vocab_size}, specials={list(self._specials)}, "
            f"id={self._id[:12]}…)"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and other._id == self._id

    def __hash__(self) -> int:
        return hash(self._id)

    def __reduce__(self) -> tuple[Callable[[str], Tokenizer], tuple[str]]:
        # Ray/pickle ship the JSON and rebuild (tiktoken objects do not pickle cheaply)
        return (Tokenizer.from_json_str, (self._json,))

    # ------------------------------------------------------------------ (de)serialisation
    def to_json_str(self) -> str:
        return self._json

    @classmethod
    def from_json_str(cls, s: str) -> Tokenizer:
        return cls(s)

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the JSON (atomically for local paths; fsspec URLs such as s3:// also work). Returns the path."""
        data = self._json.encode("utf-8")
        path = os.fspath(path)
        if "://" in path:
            with fsspec.open(path, "wb") as f:
                f.write(data)
            return path
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return str(p)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a tokenizer JSON file (or a directory holding tokenizer.json; fsspec URLs work too)."""
        path = os.fspath(path)
        if "://" in path:
            with fsspec.open(path, "rb") as f:
                data = f.read()
        else:
            p = Path(path)
            if p.is_dir():
                p = p / "tokenizer.json"
            if not p.exists():
                raise FileNotFoundError(f"tokenizer file {p} does not exist; fix: pass the tokenizer.json path")
            data = p.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(
                f"{path} is not a tokenizer file: not UTF-8 text ({e}); expected the Hugging Face `tokenizers` JSON "
                "written by Tokenizer.save (sentencepiece .model or pickled files are not supported)"
            ) from None
        return cls(text, source=str(path))

    def hf_tokenizer(self, *, encode_special_tokens: bool = False) -> HFTokenizer:
        """A fresh `tokenizers.Tokenizer` for the same JSON (for export or parity checks)."""
        hf = HFTokenizer.from_str(self._json)
        hf.encode_special_tokens = encode_special_tokens
        return hf

    def _hf(self, plain: bool) -> HFTokenizer:
        # plain=True: literal special-token text is encoded as ordinary text.
        hf = self._hf_cache.get(plain)
        if hf is None:
            hf = self._hf_cache[plain] = self.hf_tokenizer(encode_special_tokens=plain)
        return hf

    # ------------------------------------------------------------------ encoding
    def _allowed(self, allowed_special: Iterable[str] | str) -> frozenset[str]:
        if allowed_special == "all":
            return frozenset(self._specials)
        if isinstance(allowed_special, str):
            raise TokenizerError(
                f"allowed_special must be 'all' or a collection of special token strings, got the str "
                f"{allowed_special!r}; fix: allowed_special={{{allowed_special!r}}}"
            )
        allowed = frozenset(allowed_special)
        unknown = allowed - self._specials.keys()
        if unknown:
            raise TokenizerError(
                f"allowed_special names {sorted(unknown)} which are not special tokens of this tokenizer "
                f"(it has {sorted(self._specials)})"
            )
        return allowed

    def _check_backend(self, backend: str) -> str:
        if backend == "auto":
            return self.backend
        if backend not in ("tiktoken", "hf", "char"):
            raise TokenizerError(f"backend must be 'auto', 'tiktoken', 'hf' or 'char', got {backend!r}")
        if backend == "tiktoken" and self._enc is None:
            raise TokenizerError(f"backend='tiktoken' is unavailable for this tokenizer: {self._tiktoken_problem}")
        if backend == "char" and self._kind != "char":
            raise TokenizerError("backend='char' is only for char-level tokenizers")
        if backend == "tiktoken" and self._kind == "char":
            raise TokenizerError("backend='tiktoken' is only for BPE tokenizers; use 'char' or 'hf'")
        return backend

    def encode(self, text: str, *, allowed_special: Iterable[str] | str = (), backend: str = "auto") -> list[int]:
        """Text -> ids. Special-token text becomes a special id only if listed in `allowed_special` (or "all")."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}; for many texts use encode_batch")
        allowed = self._allowed(allowed_special)
        backend = self._check_backend(backend)
        if backend != "tiktoken":  # tiktoken's own encode already replaces lone surrogates
            text = fix_surrogates(text)
        return self._encode_one(text, allowed, backend)

    def _encode_one(self, text: str, allowed: frozenset[str], backend: str) -> list[int]:
        if backend == "tiktoken":
            assert self._enc is not None  # _check_backend allows "tiktoken" only when the encoder exists
            if allowed:
                return self._enc.encode(text, allowed_special=set(allowed), disallowed_special=())
            return self._enc.encode_ordinary(text)
        if backend == "char":
            return self._encode_char(text, allowed)
        # backend == "hf"
        if allowed == frozenset(self._specials):
            return self._hf(plain=False).encode(text).ids
        if not allowed:
            return self._hf(plain=True).encode(text).ids
        out: list[int] = []
        for seg, sid in self._split_special(text, allowed):
            out.extend([sid] if sid is not None else self._hf(plain=True).encode(seg).ids)
        return out

    def _split_special(self, text: str, allowed: frozenset[str]) -> Iterator[tuple[str, int | None]]:
        """Yield (ordinary segment, None) and (special text, id) in order; only `allowed` specials split."""
        pos = 0
        if self._special_re is not None and allowed:
            for m in self._special_re.finditer(text):
                if m.group() not in allowed:
                    continue
                if m.start() > pos:
                    yield text[pos : m.start()], None
                yield m.group(), self._specials[m.group()]
                pos = m.end()
        if pos < len(text) or pos == 0:
            yield text[pos:], None

    def _encode_char(self, text: str, allowed: frozenset[str]) -> list[int]:
        if allowed and self._special_re is not None:
            out: list[int] = []
            for seg, sid in self._split_special(text, allowed):
                out.extend([sid] if sid is not None else self._encode_char_plain(seg))
            return out
        return self._encode_char_plain(text)

    def _encode_char_plain(self, text: str) -> list[int]:
        if not text:
            return []
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # (N,) code points
        lut = self._lut
        inside = cps < len(lut)
        ids = np.where(inside, lut[np.minimum(cps, len(lut) - 1)], -1)
        bad = np.flatnonzero(ids < 0)
        if bad.size:
            pos = int(bad[0])
            ch = text[pos]
            raise TokenizerError(
                f"character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in this char-level vocabulary "
                f"({self._vocab_size} ids, {bad.size} unknown occurrence(s) in this text); fix: "
                "re-train with train_char on texts that contain it, or remove/replace it before encoding"
            )
        out: list[int] = ids.tolist()
        return out

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        allowed_special: Iterable[str] | str = (),
        num_threads: int | None = None,
        backend: str = "auto",
    ) -> list[list[int]]:
        """Many texts -> ids, in parallel (tiktoken releases the GIL; HF uses its own Rayon pool)."""
        if isinstance(texts, str):
            raise TokenizerError("encode_batch expects a list of str, got a single str; fix: encode_batch([text])")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TokenizerError(f"encode_batch: texts[{i}] is {type(t).__name__}, expected str")
        allowed = self._allowed(allowed_special)
        backend = self._check_backend(backend)
        if backend != "tiktoken":  # tiktoken's own encode already replaces lone surrogates
            texts = [fix_surrogates(t) for t in texts]
        if backend == "hf" and (not allowed or allowed == frozenset(self._specials)):
            hf = self._hf(plain=not allowed)
            return [e.ids for e in hf.encode_batch_fast(texts)]
        threads = num_threads or _default_threads()
        if threads <= 1 or len(texts) < 2 or backend != "tiktoken":
            return [self._encode_one(t, allowed, backend) for t in texts]
        # Contiguous chunks, one task per chunk: far less executor overhead than a task per text.
        n_chunks = min(len(texts), threads * 4)
        bounds = [len(texts) * k // n_chunks for k in range(n_chunks + 1)]
        enc = self._enc
        assert enc is not None  # backend == "tiktoken" here
        if allowed:
            allowed_set = set(allowed)

            def work(k: int) -> list[list[int]]:
                return [
                    enc.encode(t, allowed_special=allowed_set, disallowed_special=())
                    for t in texts[bounds[k] : bounds[k + 1]]
                ]
        else:

            def work(k: int) -> list[list[int]]:
                return [enc.encode_ordinary(t) for t in texts[bounds[k] : bounds[k + 1]]]

        out: list[list[int]] = []
        with ThreadPoolExecutor(threads) as ex:
            for part in ex.map(work, range(n_chunks)):
                out.extend(part)
        return out

    # ------------------------------------------------------------------ decoding
    def _check_ids(self, ids: list[int]) -> None:
        n = self._vocab_size
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n:
                raise TokenizerError(
                    f"token id {i!r} is outside this tokenizer's vocabulary (valid ids are ints 0..{n - 1}); "
                    "fix: decode ids produced by this tokenizer (tokenizer ids differ between tokenizers)"
                )

    def decode_bytes(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> bytes:
        """Ids -> raw UTF-8 bytes (may end inside a multi-byte character: streaming code can hold those back)."""
        ids = _as_id_list(ids)
        if skip_special_tokens and self._special_ids:
            ids = [i for i in ids if i not in self._special_ids]
        if self._kind == "char":
            return self.decode(ids).encode("utf-8")
        if self._enc is not None:
            try:
                return self._enc.decode_bytes(ids)
            except (KeyError, OverflowError, TypeError, ValueError):
                self._check_ids(ids)
                raise
        table = self._id_to_bytes
        try:
            if any(i < 0 for i in ids):
                raise IndexError
            return b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            self._check_ids(ids)
            raise

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Ids -> text. Never raises on a partial multi-byte sequence: it becomes U+FFFD."""
        if self._kind == "char":
            ids = _as_id_list(ids)
            if skip_special_tokens and self._special_ids:
                ids = [i for i in ids if i not in self._special_ids]
            itos = self._itos
            try:
                if any(i < 0 for i in ids):
                    raise IndexError
                return "".join([itos[i] for i in ids])
            except (IndexError, TypeError):
                self._check_ids(ids)
                raise
        return self.decode_bytes(ids, skip_special_tokens=skip_special_tokens).decode("utf-8", errors="replace")

    def decode_batch(self, batch: Sequence[Sequence[int]], *, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a special token gives its text)."""
        return self.decode_bytes([token_id])


# ---- training (gptcore.tokenizer_train does the work) -------------------------------------------


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = (EOT,),
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) with HF `tokenizers` from an iterable of documents. Deterministic.

    `vocab_size` counts everything: special tokens (ids 0..k-1), the 256 byte tokens and the merges. A corpus
    too small to reach it gives a smaller vocabulary (with a warning); `Tokenizer.vocab_size` is the real size.
    """
    text, stats = train_bpe_json(texts, vocab_size, special_tokens, min_frequency)
    tok = Tokenizer(text, source="train_bpe")
    if tok.vocab_size < vocab_size:
        warnings.warn(
            f"train_bpe: the corpus ({stats['chars']} chars) only supports {tok.vocab_size} ids, fewer than the "
            f"requested vocab_size={vocab_size} (min_frequency={min_frequency}); using {tok.vocab_size}",
            stacklevel=2,
        )
    return tok


def train_char(texts: Iterable[str], special_tokens: Sequence[str] = ()) -> Tokenizer:
    """Char-level tokenizer, nanoGPT style: ids = the sorted set of characters (code points) seen, then specials."""
    return Tokenizer(train_char_json(texts, special_tokens), source="train_char")
