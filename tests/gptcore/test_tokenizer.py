"""Tokenizer tests: tiktoken/tokenizers id parity on the real corpora, UTF-8 round trips, file format, errors.

    .venv/bin/python -m pytest tests/gptcore/test_tokenizer.py -q

Trained tokenizers are cached in module fixtures (a 4096-id BPE on wikitext-2 + gutenberg, ~3 MB; a char-level
one on tinyshakespeare). The "HF reference" ids always come from a fresh `tokenizers.Tokenizer` built from the
saved JSON, never from our wrapper, so the parity tests do not compare the code with itself.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import pickle
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import tiktoken
from tokenizers import Tokenizer as HFTokenizer

from gptcore.tokenizer import EOT, Tokenizer, TokenizerError, train_bpe, train_char

REPO = Path(__file__).resolve().parents[2]
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # HF ByteLevel's regex


# ------------------------------------------------------------------------------------------- corpora
def _read(p: Path) -> str:
    return p.read_text(encoding="utf-8")


def _jsonl(p: Path, *fields: str) -> list[str]:
    out = []
    for line in p.read_text(encoding="utf-8").split("\n"):  # not splitlines: texts hold U+2028, U+0085
        if line.strip():
            rec = json.loads(line)
            out.extend(rec[f] for f in fields if isinstance(rec.get(f), str))
    return out


def corpus(root: Path, name: str) -> list[str]:
    """Documents of one shared-data corpus, as the data pipeline would see them."""
    d = root / name
    if name == "tinyshakespeare":
        return [_read(d / "input.txt")]
    if name == "wikitext-2":
        return [_read(d / "wiki.valid.tokens.txt")]
    if name == "gutenberg":
        return [_read(p) for p in sorted(d.glob("*.txt"))]
    if name == "us-presidential-addresses":
        return _jsonl(d / "addresses.jsonl", "text")
    if name == "commoncrawl-dolma-samples":
        return [t for p in sorted(d.glob("*.jsonl")) for t in _jsonl(p, "text")]
    if name == "nltk-webtext":
        return [p.read_bytes().decode("utf-8", errors="replace") for p in sorted(d.glob("*.txt"))]
    if name == "cnndm-frank":
        return _jsonl(d / "cnndm_test_frank.jsonl", "article", "summary")
    raise KeyError(name)


@pytest.fixture(scope="module")
def bpe(shared_data) -> Tokenizer:
    docs = corpus(shared_data, "wikitext-2") + corpus(shared_data, "gutenberg")
    return train_bpe(iter(docs), vocab_size=4096, special_tokens=(EOT, "<|pad|>"), min_frequency=2)


@pytest.fixture(scope="module")
def hf_ref(bpe):
    """Independent HF reference built from the JSON; literal special-token text is encoded as text."""
    hf = HFTokenizer.from_str(bpe.to_json_str())
    hf.encode_special_tokens = True
    return hf


@pytest.fixture(scope="module")
def char(shared_data) -> Tokenizer:
    return train_char([_read(shared_data / "tinyshakespeare" / "input.txt")])


# ------------------------------------------------------------------------------------------- random unicode
_EMOJI = [
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷", "🇯🇵", "❤️", "🧑🏿‍🚀", "👩‍❤️‍💋‍👨", "1️⃣", "🫠",
]
_FIXED = [
    "", " ", "  ", " leading", "trailing ", "  both  ", "\r\n", "a\r\nb\r\n", "\n\n\n", "\t\tx", "\x00\x01\x1f\x7f",
    "\x85\xa0\u2028\u2029\u3000", "e\u0301 n\u0303 a\u0308\u0304", "Z\u0351\u0352\u0357\u0310\u0300",
    "مرحبا بالعالم", "שלום עולם", "abc \u202eRTL\u202c def", "中文字符测试，标点。", "日本語のテキスト",
    "한국어 텍스트", "Ελληνικά", "Русский текст", "हिन्दी", "ไทย", "\ufeffBOM", "\ufffd", "\uffff\U0010ffff",
    "\ue000private", "x" * 500, " " * 300 + "y", "'s 've 'RE 'll", "123 4567 ٣٤٥ ①②", "<|endoftext|>",
    "a<|endoftext|>b<|pad|>c",
] + _EMOJI


def _random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pools = [
        (0x20, 0x7E), (0x00, 0x1F), (0x80, 0xFF), (0x0300, 0x036F), (0x0590, 0x06FF), (0x0900, 0x097F),
        (0x2000, 0x206F), (0x3000, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFE00, 0xFE0F),
        (0x1F300, 0x1FAFF), (0x1F1E6, 0x1F1FF), (0x0, 0x10FFFF),
    ]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 24)):
            r = rng.random()
            if r < 0.1:
                parts.append(rng.choice(_EMOJI))
            elif r < 0.2:
                parts.append(rng.choice([" ", "\n", "\r\n", "\t", "  ", "\u200d", "'s", "<|endoftext|>"]))
            else:
                lo, hi = rng.choice(pools)
                cp = rng.randint(lo, hi)
                if 0xD800 <= cp <= 0xDFFF:  # surrogates are not Unicode scalar values
                    cp = 0xFFFD
                parts.append(chr(cp))
        out.append("".join(parts))
    return out


# ------------------------------------------------------------------------------------------- BPE basics
def test_bpe_properties(bpe):
    assert bpe.kind == "bpe"
    assert bpe.vocab_size == 4096 == len(bpe)
    assert bpe.special_tokens == {EOT: 0, "<|pad|>": 1}
    assert bpe.eos_id == 0
    assert bpe.backend == "tiktoken"  # the fast path is active for a trained tokenizer
    assert bpe.id == hashlib.sha256(bpe.to_json_str().encode("utf-8")).hexdigest()
    # every id decodes; the 256 single bytes are all present
    assert len({bpe.token_bytes(i) for i in range(bpe.vocab_size)}) == bpe.vocab_size
    assert {bpe.token_bytes(i) for i in range(bpe.vocab_size) if len(bpe.token_bytes(i)) == 1} == {
        bytes([b]) for b in range(256)
    }


# ------------------------------------------------------------------------------------------- parity
PARITY_CORPORA = [
    "tinyshakespeare", "us-presidential-addresses", "commoncrawl-dolma-samples", "nltk-webtext", "cnndm-frank",
]


@pytest.mark.parametrize("name", PARITY_CORPORA)
def test_tiktoken_ids_equal_tokenizers_ids_on_real_corpora(bpe, hf_ref, shared_data, name):
    docs = corpus(shared_data, name)
    assert sum(map(len, docs)) > 100_000
    ours = bpe.encode_batch(docs)  # tiktoken, threaded
    ref = [e.ids for e in hf_ref.encode_batch_fast(docs)]
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        if a != b:
            k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            pytest.fail(
                f"{name} doc {i}: first difference at token {k}: tiktoken {[bpe.token_bytes(t) for t in a[k:k+4]]}"
                f" vs tokenizers {[bpe.token_bytes(t) for t in b[k:k+4]]}"
            )
    assert sum(map(len, ours)) > 20_000
    # single-text encode agrees with the batch path
    assert bpe.encode(docs[0]) == ours[0]


_BOUNDARY_CATEGORIES = {"Zs", "Zl", "Zp", "Cc", "Cf", "Mn", "Mc", "Me", "Nd", "Nl", "No"}


def test_parity_on_random_unicode_and_every_boundary_class(bpe, hf_ref):
    """Pre-tokenisation regexes (oniguruma in HF, fancy-regex in tiktoken) must agree on \\s, \\p{L}, \\p{N}."""
    rng = random.Random(7)
    # every code point whose class matters to the regex (spaces, controls, format, marks, numbers) ...
    special_class = [c for c in range(0x110000) if unicodedata.category(chr(c)) in _BOUNDARY_CATEGORIES]
    # ... plus a random sample of all other scalar values
    sample = rng.sample(range(0x110000), 40_000)
    cps = special_class + [c for c in sample if not 0xD800 <= c <= 0xDFFF]
    rng.shuffle(cps)
    seps = ["", " ", "  ", "\n", "a", "7", "'s", "\u00a0", "\t"]
    texts, i = [], 0
    while i < len(cps):
        n = rng.randint(1, 8)
        texts.append("".join(chr(c) + rng.choice(seps) for c in cps[i : i + n]))
        i += n
    texts += _random_strings(1500, seed=11) + _FIXED
    ours = bpe.encode_batch(texts)
    ref = [e.ids for e in hf_ref.encode_batch_fast(texts)]
    bad = [t for t, a, b in zip(texts, ours, ref) if a != b]
    assert not bad, f"{len(bad)} mismatches, e.g. {[ascii(t) for t in bad[:3]]}"


def test_parity_for_a_vocab_trained_on_multilingual_web_text(shared_data):
    """Second vocabulary, min_frequency=1, trained on the messy many-language crawl: merges deep into
    non-Latin scripts, then encode the crawl itself (where those merges fire) and English."""
    docs = corpus(shared_data, "commoncrawl-dolma-samples")[::2]  # ~1.7 MB, to keep the test cheap
    tok = train_bpe(docs, vocab_size=3000, special_tokens=(EOT,), min_frequency=1)
    assert tok.backend == "tiktoken" and tok.vocab_size == 3000
    ref = HFTokenizer.from_str(tok.to_json_str())
    ref.encode_special_tokens = True
    texts = docs + corpus(shared_data, "cnndm-frank")
    assert tok.encode_batch(texts) == [e.ids for e in ref.encode_batch_fast(texts)]


def test_special_tokens_only_when_allowed(bpe, hf_ref):
    text = f"end of doc one.{EOT}Doc two<|pad|><|pad|> and {EOT}"
    plain = bpe.encode(text)
    assert bpe.eos_id not in plain and 1 not in plain  # literal text stays text by default
    assert plain == hf_ref.encode(text).ids
    assert bpe.decode(plain) == text
    full = bpe.encode(text, allowed_special="all")
    hf_special = HFTokenizer.from_str(bpe.to_json_str())  # HF default: added tokens are matched
    assert full == hf_special.encode(text).ids
    assert full.count(bpe.eos_id) == 2 and full.count(1) == 2
    only_eot = bpe.encode(text, allowed_special={EOT})
    assert only_eot.count(bpe.eos_id) == 2 and 1 not in only_eot
    assert bpe.decode(only_eot) == text
    assert bpe.decode(full, skip_special_tokens=True) == text.replace(EOT, "").replace("<|pad|>", "")
    # the hf backend gives the same ids in every mode
    for allowed in ((), "all", {EOT}):
        assert bpe.encode(text, allowed_special=allowed, backend="hf") == bpe.encode(text, allowed_special=allowed)
    assert bpe.encode_batch([text, text], allowed_special="all") == [full, full]
    with pytest.raises(TokenizerError, match="not special tokens"):
        bpe.encode(text, allowed_special={"<|nope|>"})
    with pytest.raises(TokenizerError, match="allowed_special"):
        bpe.encode(text, allowed_special=EOT)


def test_encode_batch_threads_and_backends_agree(bpe):
    texts = _random_strings(300, seed=3) + ["the quick brown fox"] * 50
    one = [bpe.encode(t) for t in texts]
    assert bpe.encode_batch(texts, num_threads=1) == one
    assert bpe.encode_batch(texts, num_threads=2) == one
    assert bpe.encode_batch(texts, num_threads=8) == one
    assert bpe.encode_batch(texts, backend="hf") == one
    assert bpe.encode_batch([]) == []
    with pytest.raises(TokenizerError, match="single str"):
        bpe.encode_batch("not a list")


def test_fast_path_falls_back_when_vocab_is_not_merge_consistent(bpe):
    """A vocabulary entry no merge produces: tiktoken would emit it, HF never does -> we must use HF."""
    spec = json.loads(bpe.to_json_str())
    extra = "Ġzqzq"  # byte-level form of " zqzq"
    assert extra not in spec["model"]["vocab"]
    spec["model"]["vocab"][extra] = bpe.vocab_size
    s = json.dumps(spec)
    naive_ranks = {bpe.token_bytes(i): i for i in range(2, bpe.vocab_size)} | {b" zqzq": bpe.vocab_size}
    naive = tiktoken.Encoding("naive", pat_str=GPT2_PAT, mergeable_ranks=naive_ranks, special_tokens={})
    assert naive.encode_ordinary("a zqzq")[-1] == bpe.vocab_size  # the wrong answer a naive build gives
    with pytest.warns(UserWarning, match="made by no merge"):
        odd = Tokenizer.from_json_str(s)
    assert odd.backend == "hf"
    ref = HFTokenizer.from_str(s)
    ref.encode_special_tokens = True
    assert odd.encode("a zqzq") == ref.encode("a zqzq").ids
    assert bpe.vocab_size not in odd.encode("a zqzq")
    with pytest.raises(TokenizerError, match="unavailable"):
        odd.encode("x", backend="tiktoken")


# ------------------------------------------------------------------------------------------- round trips
def test_bpe_round_trips_any_utf8(bpe):
    texts = _FIXED + _random_strings(3000, seed=1)
    ids = bpe.encode_batch(texts)
    assert bpe.decode_batch(ids) == texts
    for t, i in zip(texts, ids):
        assert bpe.decode_bytes(i) == t.encode("utf-8")


def test_decode_of_partial_utf8_never_raises_and_streams_exactly(bpe):
    for text in ["😀", "👨‍👩‍👧‍👦 family", "中文字符", "e\u0301"] + _random_strings(200, seed=5):
        ids = bpe.encode(text)
        dec = codecs.getincrementaldecoder("utf-8")()
        streamed = []
        for k in range(len(ids)):
            prefix = bpe.decode(ids[: k + 1])  # may end inside a character: U+FFFD, no exception
            assert isinstance(prefix, str)
            streamed.append(dec.decode(bpe.decode_bytes(ids[k : k + 1])))  # emits only complete characters
        streamed.append(dec.decode(b"", final=True))
        assert "".join(streamed) == text
    one_byte = [i for i in range(bpe.vocab_size) if bpe.token_bytes(i) == b"\xf0"][0]
    assert bpe.decode([one_byte]) == "\ufffd"
    assert bpe.decode_bytes([one_byte]) == b"\xf0"


def test_lone_surrogates_are_replaced_not_crashing(bpe):
    assert bpe.decode(bpe.encode("a\ud800b")) == "a\ufffdb"


def test_decode_accepts_numpy_and_rejects_bad_ids(bpe):
    np = pytest.importorskip("numpy")
    ids = bpe.encode("hello world")
    assert bpe.decode(np.array(ids, dtype=np.int64)) == "hello world"
    for bad in ([bpe.vocab_size], [-1], [10**12]):
        with pytest.raises(TokenizerError, match=r"outside this tokenizer's vocabulary .*0\.\.4095"):
            bpe.decode(bad)
    with pytest.raises(TokenizerError, match="must be ints"):
        bpe.decode([1.5])


# ------------------------------------------------------------------------------------------- char level
def test_char_tokenizer_matches_nanogpt(char, shared_data):
    text = _read(shared_data / "tinyshakespeare" / "input.txt")
    chars = sorted(set(text))
    assert char.kind == "char" and char.backend == "char"
    assert char.vocab_size == len(chars) == 65
    assert char.eos_id is None and char.special_tokens == {}
    stoi = {c: i for i, c in enumerate(chars)}
    ids = char.encode(text)
    assert ids == [stoi[c] for c in text]
    assert char.decode(ids) == text
    assert char.encode_batch(["First", "Citizen:\n"]) == [[stoi[c] for c in "First"], [stoi[c] for c in "Citizen:\n"]]
    # HF reads the same file and gives the same ids
    hf = HFTokenizer.from_str(char.to_json_str())
    assert hf.encode(text[:5000]).ids == ids[:5000]
    assert hf.decode(ids[:5000]) == text[:5000]


def test_char_unknown_character_error_names_char_codepoint_and_fix(char):
    with pytest.raises(TokenizerError) as ei:
        char.encode("naïve 😀")
    msg = str(ei.value)
    assert "'ï'" in msg and "U+00EF" in msg and "position 2" in msg and "re-train with train_char" in msg


def test_char_specials_and_round_trip_any_unicode():
    texts = _FIXED + _random_strings(500, seed=9)
    tok = train_char(iter(texts), special_tokens=(EOT,))
    n = len(set("".join(texts)) - set())  # every character seen, incl. those of the literal "<|endoftext|>"
    assert tok.vocab_size == n + 1 and tok.eos_id == n and tok.special_tokens == {EOT: n}
    assert tok.decode_batch(tok.encode_batch(texts)) == texts
    assert tok.decode_bytes(tok.encode("é😀")) == "é😀".encode()
    ids = tok.encode(f"ab{EOT}c", allowed_special="all")
    assert ids[2] == tok.eos_id and len(ids) == 4
    assert len(tok.encode(f"ab{EOT}c")) == 4 + len(EOT) - 1  # literal text by default
    assert tok.decode(ids) == f"ab{EOT}c" and tok.decode(ids, skip_special_tokens=True) == "abc"
    # the `tokenizers` backend agrees
    assert tok.encode(f"ab{EOT}c", allowed_special="all", backend="hf") == ids
    assert tok.encode_batch(texts[:50], backend="hf") == tok.encode_batch(texts[:50])


# ------------------------------------------------------------------------------------------- files, ids, determinism
def test_save_load_id_is_sha256_of_file(bpe, char, tmp_path):
    for tok in (bpe, char):
        p = Path(tok.save(tmp_path / tok.kind / "tokenizer.json"))
        data = p.read_bytes()
        assert tok.id == hashlib.sha256(data).hexdigest()
        again = Tokenizer.load(p)
        assert again.id == tok.id and again.kind == tok.kind and again == tok
        assert Tokenizer.load(p.parent).id == tok.id  # a directory holding tokenizer.json works too
        again.save(tmp_path / "resaved.json")
        assert (tmp_path / "resaved.json").read_bytes() == data
        assert pickle.loads(pickle.dumps(tok)).id == tok.id
    # HF reads our BPE file directly (and so does transformers' fast tokenizer)
    hf = HFTokenizer.from_file(str(tmp_path / "bpe" / "tokenizer.json"))
    assert hf.encode("Hello, world!").ids == bpe.encode("Hello, world!")
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "bpe" / "tokenizer.json"))
    assert fast("Hello, world!")["input_ids"] == bpe.encode("Hello, world!")


def test_training_is_deterministic_across_processes(shared_data):
    text = _read(shared_data / "tinyshakespeare" / "input.txt")[:300_000]
    a = train_bpe([text], vocab_size=600)
    b = train_bpe(iter([text]), vocab_size=600)
    assert a.to_json_str() == b.to_json_str() and a.id == b.id
    code = (
        "import sys; from gptcore.tokenizer import train_bpe, train_char; t = open(sys.argv[1]).read()[:300_000]; "
        "print(train_bpe([t], vocab_size=600).id, train_char([t]).id)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(shared_data / "tinyshakespeare" / "input.txt")],
        cwd=REPO, capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "12345", "PATH": ""},
    ).stdout.split()
    assert out == [a.id, train_char([text]).id]


def test_training_errors_are_clear():
    too_small = r"vocab_size must be >= 256 byte tokens \+ 1 special token\(s\) = 257, got 200; fix: vocab_size >= 257"
    with pytest.raises(TokenizerError, match=too_small):
        train_bpe(["hello"], vocab_size=200)
    with pytest.raises(TokenizerError, match="= 258"):
        train_bpe(["hello"], vocab_size=257, special_tokens=(EOT, "<|pad|>"))
    for fn in (lambda t: train_bpe(t, vocab_size=300), train_char):
        with pytest.raises(TokenizerError, match="corpus is empty"):
            fn([])
        with pytest.raises(TokenizerError, match="corpus is empty"):
            fn(iter(["", ""]))
        with pytest.raises(TokenizerError, match="wrap it in a list"):
            fn("a single string")
        with pytest.raises(TokenizerError, match="item 1 is bytes"):
            fn(["ok", b"bytes"])
    with pytest.raises(TokenizerError, match="duplicates"):
        train_bpe(["x"], vocab_size=300, special_tokens=(EOT, EOT))
    with pytest.raises(TokenizerError, match="special_tokens"):
        train_char(["x"], special_tokens=EOT)
    with pytest.raises(TokenizerError, match="min_frequency"):
        train_bpe(["x"], vocab_size=300, min_frequency=-1)
    with pytest.warns(UserWarning, match="only supports"):
        small = train_bpe(["tiny corpus"], vocab_size=1000)
    assert 257 <= small.vocab_size < 1000
    assert small.decode(small.encode("anything at all ✓")) == "anything at all ✓"


def test_unknown_file_formats_are_refused_clearly(tmp_path):
    from tokenizers import models

    cases = {
        "text.json": b"this is not json",
        "list.json": b"[1, 2, 3]",
        "pickle.bin": pickle.dumps({"a": 1}),
    }
    wp = HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    cases["wordpiece.json"] = wp.to_str().encode()
    expect = {
        "text.json": "not JSON",
        "list.json": "not a Hugging Face `tokenizers` file",
        "pickle.bin": "not UTF-8",
        "wordpiece.json": "unsupported tokenizer model type 'WordPiece'",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TokenizerError, match=expect[name]):
            Tokenizer.load(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.json")
