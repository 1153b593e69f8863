"""language_id step: langid's naive-Bayes model (shipped inside the langid package, no download),
scored for a whole batch at once with numpy.

    batch = build_step("language_id", {"languages": ["en"], "min_score": 0.5})(batch)
    # adds columns lang ("en") and lang_score (0..1, langid's normalised probability)

langid walks each document's bytes through a byte-level automaton in a Python loop and then
multiplies feature counts with its model; here the walk runs in lockstep over all documents of a
batch (one numpy gather per byte position) and each state's feature log-probabilities are folded
in advance, so a document's score is a sum in byte order (the same whatever else is in the batch).
Results equal langid.classify on the same (truncated) text. Does not: segment mixed-language documents.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from pipelines.data.steps import Batch, Step, register_step

_MODELS: dict[tuple[str, ...], _LangidModel] = {}  # per-process cache, keyed by the candidate set

# The 97 classes of the model shipped in langid 1.1.6 (checked against the model in the tests).
LANGID_LANGUAGES = frozenset(
    "af am an ar as az be bg bn br bs ca cs cy da de dz el en eo es et eu fa fi fo fr ga gl gu he hi hr "
    "ht hu hy id is it ja jv ka kk km kn ko ku ky la lb lo lt lv mg mk ml mn mr ms mt nb ne nl nn no oc "
    "or pa pl ps pt qu ro ru rw se si sk sl sq sr sv sw ta te th tl tr ug uk ur vi vo wa xh zh zu".split())


def _cache_path() -> Path:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("langid")
    except PackageNotFoundError:  # vendored/odd installs: still cache, keyed by the model size
        from langid.langid import model

        v = f"len{len(model)}"
    root = Path(os.environ.get("RAYGPT_CACHE_DIR") or Path.home() / ".cache" / "raygpt")
    return root / f"langid-{v}-model.npz"


_ARRAY_NAMES = {"nextmove", "out_cnt", "out_ptr", "out_idx", "ptc", "pc", "classes"}


def _load_arrays() -> dict[str, np.ndarray]:
    """The langid model as plain arrays. Unpickling langid's bundled model string takes seconds, so the
    arrays are cached once per machine (derived from the package's own model, no download)."""
    path = _cache_path()
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        if set(arrays) == _ARRAY_NAMES:
            return arrays
    except (OSError, ValueError, KeyError):
        pass
    from langid.langid import LanguageIdentifier, model

    ident = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    n_states = len(ident.tk_nextmove) // 256
    out_cnt = np.zeros(n_states, dtype=np.int64)
    for s, feats in ident.tk_output.items():
        out_cnt[s] = len(feats)
    out_ptr = np.concatenate([[0], np.cumsum(out_cnt)])[:-1]  # CSR row starts
    out_idx = np.zeros(int(out_cnt.sum()), dtype=np.int64)
    for s, feats in ident.tk_output.items():
        if feats:
            out_idx[out_ptr[s]: out_ptr[s] + len(feats)] = feats
    arrays = {
        "nextmove": np.asarray(ident.tk_nextmove, dtype=np.uint16),
        "out_cnt": out_cnt, "out_ptr": out_ptr, "out_idx": out_idx,
        "ptc": np.asarray(ident.nb_ptc, dtype=np.float32), "pc": np.asarray(ident.nb_pc, dtype=np.float32),
        "classes": np.asarray([str(c) for c in ident.nb_classes]),
    }
    try:  # atomic: a concurrent reader sees the old state or the whole file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass  # read-only home: just rebuild next time
    return arrays


class _LangidModel:
    def __init__(self, candidates: tuple[str, ...]):
        a = _load_arrays()
        self.nextmove = a["nextmove"].astype(np.int64)  # (n_states * 256,) automaton transitions
        n_states = len(self.nextmove) // 256
        ptc, pc, classes = a["ptc"], a["pc"], [str(c) for c in a["classes"]]
        if candidates:  # as langid's set_languages: keep only these classes
            keep = np.array([c in candidates for c in classes])
            ptc, pc, classes = ptc[:, keep], pc[keep], [c for c in classes if c in candidates]
        # Entering state s adds the log-probabilities of all features that s emits: fold them per
        # state once, so scoring is one gather-add per byte instead of feature counts + a matmul.
        cnt, ptr, idx = a["out_cnt"], a["out_ptr"], a["out_idx"]
        state_logp = np.zeros((n_states, len(classes)), dtype=np.float64)  # (S, L)
        has = np.flatnonzero(cnt)
        state_logp[has] = np.add.reduceat(ptc[idx].astype(np.float64), ptr[has], axis=0)
        self.state_logp = state_logp
        self.pc = pc.astype(np.float64)  # (L,)
        self.classes = classes

    def classify(self, texts: list[str], max_bytes: int, chunk: int = 512) -> tuple[list[str], list[float]]:
        langs: list[str] = []
        scores: list[float] = []
        for s in range(0, len(texts), chunk):
            la, sc = self._classify_chunk(texts[s: s + chunk], max_bytes)
            langs.extend(la)
            scores.extend(sc)
        return langs, scores

    def _classify_chunk(self, texts: list[str], max_bytes: int) -> tuple[list[str], list[float]]:
        n = len(texts)
        raw = [t[:max_bytes].encode("utf-8", "replace")[:max_bytes] for t in texts]
        lens = np.fromiter(map(len, raw), dtype=np.int64, count=n)
        order = np.argsort(-lens, kind="stable")  # longest first: the live rows are always a prefix
        lens_sorted = lens[order]
        width = int(lens_sorted[0]) if n else 0
        logp = np.zeros((n, len(self.classes)), dtype=np.float64)  # (n, L), rows in `order`
        if width:
            buf = np.frombuffer(b"".join(raw[i].ljust(width, b"\0") for i in order), dtype=np.uint8)
            byts = buf.reshape(n, width).astype(np.int64)  # (n, W)
            states = np.zeros(n, dtype=np.int64)
            nextmove, state_logp = self.nextmove, self.state_logp
            live = n
            for j in range(width):
                while lens_sorted[live - 1] <= j:
                    live -= 1
                s = nextmove[(states[:live] << 8) + byts[:live, j]]
                states[:live] = s
                logp[:live] += state_logp[s]  # each document sums in byte order: batch-independent
        logp = logp[np.argsort(order)] + self.pc
        best = logp.argmax(axis=1)
        with np.errstate(over="ignore"):
            prob = 1.0 / np.exp(logp - logp[np.arange(n), best][:, None]).sum(axis=1)
        return [self.classes[b] for b in best], np.round(prob, 6).tolist()


def get_model(candidates: tuple[str, ...] = ()) -> _LangidModel:
    m = _MODELS.get(candidates)
    if m is None:
        m = _MODELS[candidates] = _LangidModel(candidates)
    return m


@dataclasses.dataclass(frozen=True)
class LanguageIdConfig:
    """language_id: languages: ISO 639-1 codes to keep ([] = keep all, only annotate). min_score:
    minimum normalised probability of the predicted language. max_chars: characters scored per document
    (the head, at most that many UTF-8 bytes; langid is accurate well before 1000). candidates: restrict the model to these languages
    (faster, and avoids rare-language confusions when the corpus' languages are known)."""

    languages: list[str] = dataclasses.field(default_factory=list)
    min_score: float = 0.0
    max_chars: int = 1000
    candidates: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"language_id.min_score must be in [0, 1], got {self.min_score}")
        if self.max_chars < 20:
            raise ValueError(f"language_id.max_chars must be >= 20, got {self.max_chars}")
        for code in list(self.languages) + list(self.candidates):
            if code not in LANGID_LANGUAGES:
                raise ValueError(f"language_id: unknown language code {code!r}; langid knows the ISO 639-1 "
                                 f"codes {' '.join(sorted(LANGID_LANGUAGES))}")
        if self.candidates and self.languages and not set(self.languages) <= set(self.candidates):
            raise ValueError(f"language_id.languages {self.languages} must be a subset of candidates "
                             f"{self.candidates} (or leave candidates empty)")


@register_step
class LanguageId(Step):
    name = "language_id"
    Config = LanguageIdConfig
    columns = {"lang": "", "lang_score": 0.0}
    reasons = ("lang_xx", "low_score")

    def setup(self) -> None:
        self._allowed = frozenset(self.config.languages)
        self._candidates = tuple(sorted(self.config.candidates))

    def classify(self, texts: list[str]) -> tuple[list[str], list[float]]:
        return get_model(self._candidates).classify(texts, self.config.max_chars)

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["drop"])
        drops = list(batch["drop"])
        langs = list(batch.get("lang") or [""] * n)
        scores = list(batch.get("lang_score") or [0.0] * n)
        alive = [i for i, d in enumerate(drops) if not d]
        if alive:
            texts = batch["text"]
            la, sc = self.classify([texts[i] for i in alive])
            allowed, min_score = self._allowed, self.config.min_score
            for i, lang, score in zip(alive, la, sc):
                langs[i], scores[i] = lang, score
                if allowed and lang not in allowed:
                    drops[i] = f"{self.name}:lang_{lang}"
                elif score < min_score:
                    drops[i] = f"{self.name}:low_score"
        out = dict(batch)
        out["drop"], out["lang"], out["lang_score"] = drops, langs, scores
        return out
