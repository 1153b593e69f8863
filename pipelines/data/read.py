"""Readers: paths, globs and fsspec URLs -> batches of documents (text, drop, doc_id, source, fields...).

    tasks = plan_reads(cfg.inputs, cfg.read)            # on the driver: list files, split big ones
    for batch in read_task(tasks[0], cfg.inputs, ...):  # in a Ray Data task: stream one file range
        ...

Formats: plain text (one document per file, per line, or per blank-line paragraph), JSONL (text
field configurable), Parquet, CSV/TSV; `.gz` / `.zst` (any fsspec compression) by extension. Bad
input never raises: a binary file, an empty file, invalid UTF-8, an over-long line or document, a
non-JSON line, a missing text field, a corrupt Parquet file each becomes a tombstone row whose
`drop` is "read:<reason>" and whose `source` names the file and line, so it is counted in the ledger
and reported. Big uncompressed local line/paragraph/JSONL files are cut into byte ranges aligned on
record boundaries (line numbers computed here) so several tasks read one file in parallel.
Does not: decode legacy encodings (the `decode` step does, from the `raw` column) or clean text.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.utils import infer_compression

from pipelines.data.config import InputSpec, PrepError, ReadSpec
from pipelines.runtime import is_local

TEXT_EXT = {".txt", ".text", ".md", ".rst", ""}
JSONL_EXT = {".jsonl", ".ndjson", ".json"}
PARQUET_EXT = {".parquet", ".pq"}
CSV_EXT = {".csv", ".tsv"}
GLOB_CHARS = set("*?[")
BINARY_SNIFF = 8192
MB = 1 << 20


@dataclass
class ReadTask:
    """One unit of reading work: a whole file, or a byte range of an uncompressed local file."""

    input_idx: int
    uri: str  # canonical: absolute local path, or protocol://... for remote files
    fmt: str  # text | jsonl | parquet | csv
    mode: str  # file | line | paragraph (text only; jsonl is per line)
    start: int = 0
    end: int = -1  # -1 = to EOF
    line0: int = 1  # 1-based number of the first line at `start`
    order: int = 0  # global position of this task (file order, then range order)
    size: int = 0  # bytes this task reads (compressed size for compressed files; 0 = unknown)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.rsplit("/", 1)[-1].lower()
    comp = infer_compression(name)
    if comp:
        name = name.rsplit(".", 1)[0]
    ext = os.path.splitext(name)[1]
    if ext in JSONL_EXT:
        return "jsonl"
    if ext in PARQUET_EXT:
        return "parquet"
    if ext in CSV_EXT:
        return "csv"
    return "text"


def _is_glob(path: str) -> bool:
    return any(c in GLOB_CHARS for c in path.split("://", 1)[-1])


def _open_fs(spec: InputSpec) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        fs, root = fsspec.core.url_to_fs(spec.path, **(spec.storage_options or {}))
    except Exception as e:  # unknown protocol, missing driver package (gcsfs...), bad storage_options
        raise PrepError(f"inputs path {spec.path!r}: cannot open this filesystem ({type(e).__name__}: {e}); "
                        f"check the URL, install the fsspec driver for its protocol, or fix storage_options") from None
    return fs, root


def canonical_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    if is_local(fs):
        return os.path.abspath(path)
    return fs.unstrip_protocol(path)


def list_files(spec: InputSpec, index: int) -> list[str]:
    """Expand one input to a sorted list of canonical file URIs (hidden files skipped in dirs/globs)."""
    fs, root = _open_fs(spec)
    try:
        if _is_glob(spec.path):
            found = [p for p in fs.glob(root) if not fs.isdir(p)]
        elif fs.isdir(root):
            found = [p for p in fs.find(root)]
        elif fs.exists(root):
            found = [root]
        else:
            found = []
    except Exception as e:  # OSError, permission, network / auth errors of remote filesystems
        raise PrepError(f"inputs[{index}].path {spec.path!r}: cannot list it ({type(e).__name__}: {e})") from None
    if _is_glob(spec.path) or len(found) > 1:
        found = [p for p in found if not any(part.startswith(".") for part in p.split("/")[-1:])]
    found = sorted(found)
    if spec.max_files:
        found = found[: spec.max_files]
    return [canonical_uri(fs, p) for p in found]


def plan_reads(inputs: list[InputSpec], read: ReadSpec) -> list[ReadTask]:
    """All read tasks in a deterministic order; raises PrepError if an input matches no file."""
    tasks: list[ReadTask] = []
    for i, spec in enumerate(inputs):
        uris = list_files(spec, i)
        if not uris:
            raise PrepError(f"inputs[{i}].path {spec.path!r} matches no file; check the path (relative paths "
                            f"are resolved from {os.getcwd()!r})")
        fs, _ = _open_fs(spec)
        for uri in uris:
            fmt = detect_format(uri, spec.format)
            mode = spec.text_mode if fmt == "text" else ("line" if fmt == "jsonl" else "file")
            splittable = (is_local(fs) and infer_compression(uri) is None and mode in ("line", "paragraph"))
            try:
                size = os.path.getsize(uri) if is_local(fs) else int(fs.size(uri) or 0)
            except (OSError, TypeError):
                size = 0
            if splittable and size > read.range_mb * MB:
                tasks.extend(_split_ranges(i, uri, fmt, mode, int(read.range_mb * MB)))
            else:
                tasks.append(ReadTask(i, uri, fmt, mode, size=size))
    for k, t in enumerate(tasks):
        t.order = k
    return tasks


def _split_ranges(idx: int, uri: str, fmt: str, mode: str, target: int) -> list[ReadTask]:
    """Cut a local file at record boundaries near multiples of `target` bytes; count lines up to each cut."""
    size = os.path.getsize(uri)
    cuts = [0]
    with open(uri, "rb") as f:
        t = target
        while t < size:
            f.seek(t)
            f.readline()  # finish the current line
            if mode == "paragraph":
                while True:  # move to just after the next blank line
                    line = f.readline()
                    if not line or not line.strip():
                        break
            pos = f.tell()
            if pos >= size:
                break
            if pos > cuts[-1]:
                cuts.append(pos)
            t = max(pos, t) + target
        # line number at each cut: count newlines between consecutive cuts
        lines = [1]
        for a, b in zip(cuts[:-1], cuts[1:]):
            f.seek(a)
            n, left = 0, b - a
            while left > 0:
                chunk = f.read(min(left, 16 * MB))
                if not chunk:
                    break
                n += chunk.count(b"\n")
                left -= len(chunk)
            lines.append(lines[-1] + n)
    ends = cuts[1:] + [-1]
    return [ReadTask(idx, uri, fmt, mode, start=a, end=e, line0=ln, size=(e if e >= 0 else size) - a)
            for a, e, ln in zip(cuts, ends, lines)]


def doc_id_for(source: str) -> str:
    """Stable document id: sha1 of the source string (file URI plus line/record position)."""
    return hashlib.sha1(source.encode("utf-8", "surrogatepass")).hexdigest()


class _Batcher:
    """Accumulates records into column lists; emits a batch every `rows` records or `nbytes` of text."""

    def __init__(self, fields: list[str], want_raw: bool, rows: int, nbytes: int):
        self.fields, self.want_raw, self.rows, self.nbytes = fields, want_raw, rows, nbytes
        self._new()

    def _new(self) -> None:
        self.cols: dict[str, list] = {"text": [], "drop": [], "doc_id": [], "source": []}
        for f in self.fields:
            self.cols[f] = []
        if self.want_raw:
            self.cols["raw"] = []
        self.size = 0

    def add(self, source: str, text: str = "", drop: str = "", raw: bytes | None = None,
            extra: dict[str, str] | None = None) -> dict[str, list] | None:
        c = self.cols
        c["text"].append(text)
        c["drop"].append(drop)
        c["doc_id"].append(doc_id_for(source))
        c["source"].append(source)
        for f in self.fields:
            c[f].append((extra or {}).get(f, ""))
        if self.want_raw:
            c["raw"].append(raw)
        self.size += len(text) + (len(raw) if raw else 0)
        if len(c["text"]) >= self.rows or self.size >= self.nbytes:
            return self.flush()
        return None

    def flush(self) -> dict[str, list] | None:
        if not self.cols["text"]:
            return None
        out = self.cols
        self._new()
        return out


def _no_surrogates(s: str) -> str:
    """JSON "\\ud800" escapes decode to lone surrogates, which are not UTF-8 (Arrow, tokenizers refuse them):
    replace them with U+FFFD."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _decode(b: bytes, first: bool) -> str | None:
    try:
        return b.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError:
        return None


def read_task(task: dict[str, Any] | ReadTask, inputs: list[InputSpec], read: ReadSpec, fields: list[str],
              want_raw: bool, render: tuple[str, str] | None = None) -> Iterator[dict[str, list]]:
    """Stream one read task as batches of column lists (see module doc). Never raises on bad data."""
    t = task if isinstance(task, ReadTask) else ReadTask(**task)
    spec = inputs[t.input_idx]
    b = _Batcher(fields, want_raw, read.batch_rows, int(read.batch_mb * MB))
    r = _Reader(t, spec, read, fields, want_raw and spec.encoding == "raw", render)
    for rec in r.records():
        out = b.add(*rec)
        if out is not None:
            yield out
    out = b.flush()
    if out is not None:
        yield out


class _Reader:
    def __init__(self, t: ReadTask, spec: InputSpec, read: ReadSpec, fields: list[str], raw_mode: bool,
                 render: tuple[str, str] | None):
        self.t, self.spec, self.fields, self.raw_mode, self.render = t, spec, fields, raw_mode, render
        self.max_doc = int(read.max_doc_mb * MB)
        self.spec_fields = list(spec.fields)

    # -- records: tuples (source, text, drop, raw, extra) --------------------------------------------
    def records(self) -> Iterator[tuple]:
        t = self.t
        try:
            f = fsspec.open(t.uri, "rb", compression="infer", **(self.spec.storage_options or {})).open()
        except Exception as e:  # missing file after listing, permission, network...
            yield (t.uri, "", "read:open_failed", None, None)
            _log_problem(t.uri, f"open failed: {type(e).__name__}: {e}")
            return
        try:
            if t.fmt == "parquet":
                yield from self._parquet(f)
                return
            head = f.read(BINARY_SNIFF) if t.start == 0 else _peek_head(t.uri, self.spec)
            if t.start == 0:
                f = io.BufferedReader(_HeadRaw(head, f), buffer_size=MB)
            if b"\x00" in head and not self.raw_mode:  # raw mode: the decode step judges (UTF-16 has NULs)
                yield (t.uri, "", "read:binary_file", None, None)
                return
            if t.start == 0 and not head:
                yield (t.uri, "", "read:empty_file", None, None)
                return
            if t.start:
                f.seek(t.start)
            if t.fmt == "csv":
                yield from self._csv(f)
            elif t.fmt == "jsonl":
                yield from self._jsonl(f)
            elif t.mode == "file":
                yield from self._file(f)
            elif t.mode == "line":
                yield from self._lines(f)
            else:
                yield from self._paragraphs(f)
        except Exception as e:  # a read error mid-file (truncated gzip, network): count it, keep going
            yield (f"{t.uri}@byte {t.start}", "", "read:io_error", None, None)
            _log_problem(t.uri, f"{type(e).__name__}: {e}")
        finally:
            try:
                f.close()
            except Exception:
                pass

    def _text_record(self, source: str, data: bytes, first: bool) -> tuple:
        if self.raw_mode:
            return (source, "", "", data, None)
        text = _decode(data, first)
        if text is None:
            return (source, "", "read:invalid_utf8", None, None)
        return (source, text, "", None, None)

    def _lines_iter(self, f) -> Iterator[tuple[int, bytes | None]]:
        """(line number, line bytes without EOL) within the task's range; None for an over-long line."""
        t, lim = self.t, self.max_doc
        pos, ln = t.start, t.line0
        while t.end < 0 or pos < t.end:
            line = f.readline(lim + 1)
            if not line:
                return
            pos += len(line)
            if len(line) > lim and not line.endswith(b"\n"):
                # over-long line: skip the rest of it without holding it
                while True:
                    more = f.readline(MB)
                    if not more:
                        break
                    pos += len(more)
                    if more.endswith(b"\n"):
                        break
                yield ln, None
            else:
                yield ln, line.rstrip(b"\r\n")
            ln += 1

    def _lines(self, f) -> Iterator[tuple]:
        uri = self.t.uri
        for ln, line in self._lines_iter(f):
            if line is None:
                yield (f"{uri}:line {ln}", "", "read:doc_too_long", None, None)
            elif line.strip():
                yield self._text_record(f"{uri}:line {ln}", line, ln == 1)

    def _paragraphs(self, f) -> Iterator[tuple]:
        uri = self.t.uri
        buf: list[bytes] = []
        size, start, too_long = 0, 0, False
        for ln, line in self._lines_iter(f):
            if line is not None and not line.strip():
                if buf or too_long:
                    yield self._para(uri, start, buf, too_long)
                buf, size, too_long = [], 0, False
                continue
            if not buf and not too_long:
                start = ln
            if line is None or size + len(line) > self.max_doc:
                too_long, buf = True, []
                continue
            if not too_long:
                buf.append(line)
                size += len(line) + 1
        if buf or too_long:
            yield self._para(uri, start, buf, too_long)

    def _para(self, uri: str, start: int, buf: list[bytes], too_long: bool) -> tuple:
        if too_long:
            return (f"{uri}:line {start}", "", "read:doc_too_long", None, None)
        return self._text_record(f"{uri}:line {start}", b"\n".join(buf), start == 1)

    def _file(self, f) -> Iterator[tuple]:
        uri = self.t.uri
        data = f.read(self.max_doc + 1)
        if len(data) > self.max_doc:
            yield (uri, "", "read:doc_too_long", None, None)
            return
        if not data.strip():
            yield (uri, "", "read:empty_file", None, None)
            return
        yield self._text_record(uri, data, True)

    def _extra(self, rec: dict, source: str) -> tuple[dict[str, str] | None, str]:
        out = {}
        for k in self.spec_fields:
            v = rec.get(k)
            if v is None:
                return None, "read:missing_field"
            out[k] = _no_surrogates(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
        return out, ""

    def _structured(self, rec: Any, source: str) -> tuple:
        """A parsed JSONL/CSV/Parquet record -> (source, text, drop, raw, extra)."""
        if not isinstance(rec, dict):
            return (source, "", "read:not_an_object", None, None)
        extra, drop = self._extra(rec, source)
        if drop:
            return (source, "", drop, None, None)
        if self.render is not None:  # SFT: the document text is the rendered example
            text = self.render[0].format_map(extra) + self.render[1].format_map(extra)
            return (source, text, "", None, extra)
        v = rec.get(self.spec.text_field)
        if v is None:
            return (source, "", "read:missing_text_field", None, None)
        if isinstance(v, bytes):
            if self.raw_mode:
                return (source, "", "", v, extra)
            v = _decode(v, False)
            if v is None:
                return (source, "", "read:invalid_utf8", None, None)
        if not isinstance(v, str):
            return (source, "", "read:text_not_string", None, None)
        v = _no_surrogates(v)
        if len(v) > self.max_doc:
            return (source, "", "read:doc_too_long", None, None)
        if not v.strip():
            return (source, "", "read:empty_text", None, None)
        return (source, v, "", None, extra)

    def _jsonl(self, f) -> Iterator[tuple]:
        uri = self.t.uri
        for ln, line in self._lines_iter(f):
            src = f"{uri}:line {ln}"
            if line is None:
                yield (src, "", "read:doc_too_long", None, None)
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except UnicodeDecodeError:
                yield (src, "", "read:invalid_utf8", None, None)
                continue
            except ValueError:
                yield (src, "", "read:invalid_json", None, None)
                continue
            yield self._structured(rec, src)

    def _csv(self, f) -> Iterator[tuple]:
        uri = self.t.uri
        name = uri.lower()
        if infer_compression(name):
            name = name.rsplit(".", 1)[0]
        delim = "\t" if name.endswith(".tsv") else ","
        csv.field_size_limit(max(self.max_doc, 1 << 20))
        text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="strict", newline="")
        reader = csv.reader(text, delimiter=delim)
        try:
            header = next(reader)
        except StopIteration:
            yield (uri, "", "read:empty_file", None, None)
            return
        except UnicodeDecodeError:
            yield (f"{uri}:line 1", "", "read:invalid_utf8", None, None)
            return
        except csv.Error:
            yield (f"{uri}:line 1", "", "read:invalid_csv", None, None)
            return
        need = ([] if self.render is not None else [self.spec.text_field]) + self.spec_fields
        missing = [c for c in need if c not in header]
        if missing:
            reason = "read:missing_text_field" if self.spec.text_field in missing and self.render is None \
                else "read:missing_field"
            yield (uri, "", reason, None, None)
            return
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError:
                yield (f"{uri}:line {start}", "", "read:invalid_utf8", None, None)
                return  # cannot resynchronise a text stream after a decode error
            except csv.Error:
                yield (f"{uri}:line {start}", "", "read:invalid_csv", None, None)
                continue
            if not row:
                continue
            yield self._structured(dict(zip(header, row)), f"{uri}:line {start}")

    def _parquet(self, f) -> Iterator[tuple]:
        import pyarrow.parquet as pq

        uri = self.t.uri
        try:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
        except Exception:
            yield (uri, "", "read:corrupt_parquet", None, None)
            return
        need = ([] if self.render is not None else [self.spec.text_field]) + self.spec_fields
        missing = [c for c in need if c not in names]
        if missing:
            reason = "read:missing_text_field" if self.spec.text_field in missing and self.render is None \
                else "read:missing_field"
            yield (uri, "", reason, None, None)
            return
        n = 0
        try:
            for rb in pf.iter_batches(batch_size=1024, columns=need):
                cols = {c: rb.column(c).to_pylist() for c in need}
                for j in range(rb.num_rows):
                    yield self._structured({c: cols[c][j] for c in need}, f"{uri}#record {n}")
                    n += 1
        except Exception:
            yield (f"{uri}#record {n}", "", "read:corrupt_parquet", None, None)


class _HeadRaw(io.RawIOBase):
    """A raw stream that replays `head` (already read for sniffing) before the rest of `f`."""

    def __init__(self, head: bytes, f):
        self._head, self._f, self._pos = head, f, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._pos < len(self._head):
            n = min(len(b), len(self._head) - self._pos)
            b[:n] = self._head[self._pos:self._pos + n]
            self._pos += n
            return n
        data = self._f.read(len(b))
        n = len(data)
        b[:n] = data
        return n

    def close(self) -> None:
        try:
            self._f.close()
        finally:
            super().close()


def _peek_head(uri: str, spec: InputSpec) -> bytes:
    with fsspec.open(uri, "rb", compression="infer", **(spec.storage_options or {})) as g:
        return g.read(BINARY_SNIFF)


def _log_problem(uri: str, msg: str) -> None:
    import logging

    logging.getLogger("raygpt.data.read").warning("%s: %s", uri, msg)
