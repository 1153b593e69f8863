"""Tokenizer training: byte-level BPE with HF `tokenizers`' BpeTrainer, and char-level (nanoGPT style),
each to a tokenizer.json string. Deterministic: the same texts give byte-identical JSON.

    from gptcore.tokenizer_train import train_bpe_json, train_char_json
    text, stats = train_bpe_json(texts, vocab_size=4096)    # stats: {"docs": ..., "chars": ...}
    text = train_char_json(texts, special_tokens=("<|endoftext|>",))

Callers use gptcore.tokenizer.train_bpe / train_char, which wrap these JSON strings in a Tokenizer.
Tests: tests/gptcore/test_tokenizer.py.

Does not: normalise text, read files, or decide the encoding backend (gptcore.tokenizer does).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from gptcore.tokenizer_formats import CHAR_SPLIT_REGEX, EOT, MAX_VOCAB, TokenizerError, fix_surrogates

__all__ = ["train_bpe_json", "train_char_json"]


def _validated_texts(texts: Iterable[str], stats: dict[str, int], fn: str) -> Iterator[str]:
    if isinstance(texts, (str, bytes)):
        raise TokenizerError(
            f"{fn}: texts must be an iterable of str (documents), got a single {type(texts).__name__}; "
            "fix: wrap it in a list, e.g. [text]"
        )
    try:
        it = iter(texts)
    except TypeError:
        raise TokenizerError(f"{fn}: texts must be an iterable of str, got {type(texts).__name__}") from None
    for i, t in enumerate(it):
        if not isinstance(t, str):
            raise TokenizerError(f"{fn}: texts item {i} is {type(t).__name__}, expected str")
        if t:
            stats["docs"] += 1
            stats["chars"] += len(t)
            yield fix_surrogates(t)


def _validated_specials(special_tokens: Iterable[str], fn: str) -> list[str]:
    if isinstance(special_tokens, str):
        raise TokenizerError(
            f"{fn}: special_tokens must be a sequence of str, got the str {special_tokens!r}; "
            f"fix: special_tokens=({special_tokens!r},)"
        )
    specials = list(special_tokens)
    for s in specials:
        if not isinstance(s, str) or not s:
            raise TokenizerError(f"{fn}: special_tokens entries must be non-empty str, got {s!r}")
    dup = sorted({s for s in specials if specials.count(s) > 1})
    if dup:
        raise TokenizerError(f"{fn}: special_tokens has duplicates {dup}; list each once")
    return specials


def _empty_corpus(fn: str) -> TokenizerError:
    return TokenizerError(
        f"{fn}: the training corpus is empty (0 non-empty texts); fix: pass an iterable of non-empty str documents"
    )


def _check_bpe_args(fn: str, specials: list[str], vocab_size: int, min_frequency: int) -> None:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise TokenizerError(f"{fn}: vocab_size must be an int, got {vocab_size!r}")
    need = 256 + len(specials)
    if vocab_size < need:
        raise TokenizerError(
            f"{fn}: vocab_size must be >= 256 byte tokens + {len(specials)} special token(s) = {need}, got "
            f"{vocab_size}; fix: vocab_size >= {need} (e.g. 4096 for small corpora, 50257 for GPT-2 size)"
        )
    if vocab_size > MAX_VOCAB:
        raise TokenizerError(f"{fn}: vocab_size must be <= {MAX_VOCAB} (int32 ids), got {vocab_size}")
    if not isinstance(min_frequency, int) or isinstance(min_frequency, bool) or min_frequency < 0:
        raise TokenizerError(f"{fn}: min_frequency must be an int >= 0, got {min_frequency!r}")


def train_bpe_json(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = (EOT,),
    min_frequency: int = 2,
) -> tuple[str, dict[str, int]]:
    """Train a byte-level BPE (GPT-2 style) with HF `tokenizers` from an iterable of documents. Deterministic.

    Returns the tokenizer.json text and {"docs", "chars"} of the non-empty documents read. A corpus too
    small to reach `vocab_size` gives a smaller vocabulary (gptcore.tokenizer.train_bpe warns)."""
    fn = "train_bpe"
    specials = _validated_specials(special_tokens, fn)
    _check_bpe_args(fn, specials, vocab_size, min_frequency)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so any UTF-8 is encodable
        show_progress=False,
    )
    stats = {"docs": 0, "chars": 0}
    hf.train_from_iterator(_validated_texts(texts, stats, fn), trainer=trainer)
    if stats["docs"] == 0:
        raise _empty_corpus(fn)
    return hf.to_str(pretty=True), stats


def train_char_json(texts: Iterable[str], special_tokens: Sequence[str] = ()) -> str:
    """Char-level tokenizer.json, nanoGPT style: ids = the sorted set of characters (code points) seen, then
    specials."""
    fn = "train_char"
    specials = _validated_specials(special_tokens, fn)
    stats = {"docs": 0, "chars": 0}
    chars: set[str] = set()
    for t in _validated_texts(texts, stats, fn):
        chars.update(t)
    if stats["docs"] == 0:
        raise _empty_corpus(fn)
    clash = [s for s in specials if s in chars]
    if clash:
        raise TokenizerError(
            f"{fn}: special token(s) {clash} are also ordinary characters of the corpus; use multi-character "
            "special tokens such as '<|endoftext|>'"
        )
    vocab = {c: i for i, c in enumerate(sorted(chars))}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(CHAR_SPLIT_REGEX), behavior="isolated")
    hf.decoder = decoders.Fuse()
    if specials:
        hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return hf.to_str(pretty=True)
