"""Readers: formats, compression, ranges, bad input as counted tombstones, local / memory:// / s3:// (moto).

    .venv/bin/python -m pytest tests/pipelines/data/test_read.py -q
"""

from __future__ import annotations

import gzip
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data.config import InputSpec, PrepError, ReadSpec
from pipelines.data.read import plan_reads, read_task


def _read_all(inputs, read=None, fields=(), want_raw=False, render=None):
    read = read or ReadSpec()
    rows = []
    for t in plan_reads(inputs, read):
        for b in read_task(t.to_dict(), inputs, read, list(fields), want_raw, render):
            n = len(b["text"])
            rows += [{k: b[k][i] for k in b} for i in range(n)]
    return rows


def test_text_modes_jsonl_parquet_csv_and_compression(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond para line 1\nline 2\n\n\nthird\n")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("gz doc")
    import zstandard

    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        b'{"text": "zst one", "id": 1}\n{"text": "zst two", "id": 2}\n'))
    pq.write_table(pa.table({"body": ["pq a", "pq b"], "title": ["t1", "t2"]}), tmp_path / "d.parquet")
    (tmp_path / "e.csv").write_text('text,title\n"csv, quoted\nmultiline",x\nplain,y\n')

    assert [r["text"] for r in _read_all([InputSpec(path=str(tmp_path / "a.txt"))])] == \
        ["first line\n\nsecond para line 1\nline 2\n\n\nthird\n"]
    lines = _read_all([InputSpec(path=str(tmp_path / "a.txt"), text_mode="line")])
    assert [(r["text"], r["source"].rsplit(":", 1)[1]) for r in lines] == [
        ("first line", "line 1"), ("second para line 1", "line 3"), ("line 2", "line 4"), ("third", "line 7")]
    paras = _read_all([InputSpec(path=str(tmp_path / "a.txt"), text_mode="paragraph")])
    assert [r["text"] for r in paras] == ["first line", "second para line 1\nline 2", "third"]
    assert paras[1]["source"].endswith("a.txt:line 3")
    assert [r["text"] for r in _read_all([InputSpec(path=str(tmp_path / "b.txt.gz"))])] == ["gz doc"]
    z = _read_all([InputSpec(path=str(tmp_path / "c.jsonl.zst"))])
    assert [r["text"] for r in z] == ["zst one", "zst two"] and z[1]["source"].endswith(":line 2")
    p = _read_all([InputSpec(path=str(tmp_path / "d.parquet"), text_field="body", fields=["title"])], fields=["title"])
    assert [(r["text"], r["title"]) for r in p] == [("pq a", "t1"), ("pq b", "t2")]
    c = _read_all([InputSpec(path=str(tmp_path / "e.csv"))])
    assert [r["text"] for r in c] == ["csv, quoted\nmultiline", "plain"]
    # a glob over the directory: sorted, each file by its own format
    allr = _read_all([InputSpec(path=str(tmp_path / "*"), text_field="text")])
    assert len({r["doc_id"] for r in allr}) == len(allr)  # doc ids unique


def test_ranges_match_a_single_pass(tmp_path):
    """A big line/paragraph file is cut into ranges at record boundaries; line numbers stay exact."""
    lines = [f"line {i} " + "x" * (i % 50) for i in range(20000)]
    body = "\n".join(l if i % 7 else "" for i, l in enumerate(lines)) + "\n"
    (tmp_path / "big.txt").write_text(body)
    for mode in ("line", "paragraph"):
        one = _read_all([InputSpec(path=str(tmp_path / "big.txt"), text_mode=mode)], ReadSpec(range_mb=100))
        many_tasks = plan_reads([InputSpec(path=str(tmp_path / "big.txt"), text_mode=mode)], ReadSpec(range_mb=0.05))
        assert len(many_tasks) > 5
        many = _read_all([InputSpec(path=str(tmp_path / "big.txt"), text_mode=mode)], ReadSpec(range_mb=0.05))
        assert [(r["text"], r["source"]) for r in many] == [(r["text"], r["source"]) for r in one]


def test_bad_input_becomes_counted_tombstones(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "ok.txt").write_text("a fine document")
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (d / "binary.txt").write_bytes(b"\x7fELF\x00\x01\x02" * 100)
    (d / "empty.txt").write_bytes(b"")
    (d / "rows.jsonl").write_bytes(b'{"text": "good"}\nnot json\n{"other": 1}\n[1, 2]\n{"text": 5}\n'
                                   b'{"text": "caf\xe9"}\n\n{"text": "also good"}\n{"text": "lone \\ud800 surrogate"}\n')
    (d / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    rows = _read_all([InputSpec(path=str(d / "*"), text_mode="file")])
    got = {(os.path.basename(r["source"]), r["drop"]) for r in rows if r["drop"]}
    assert got == {
        ("latin1.txt", "read:invalid_utf8"), ("binary.txt", "read:binary_file"), ("empty.txt", "read:empty_file"),
        ("rows.jsonl:line 2", "read:invalid_json"), ("rows.jsonl:line 3", "read:missing_text_field"),
        ("rows.jsonl:line 4", "read:not_an_object"), ("rows.jsonl:line 5", "read:text_not_string"),
        ("rows.jsonl:line 6", "read:invalid_utf8"), ("corrupt.parquet", "read:corrupt_parquet"),
    }
    assert sorted(r["text"] for r in rows if not r["drop"]) == ["a fine document", "also good", "good",
                                                                "lone \ufffd\ufffd\ufffd surrogate"]
    assert all(r["text"] == "" for r in rows if r["drop"])
    # raw mode keeps the bytes for the decode step instead of dropping them
    raw = _read_all([InputSpec(path=str(d / "latin1.txt"), encoding="raw")], want_raw=True)
    assert raw[0]["raw"] == "caf\xe9 cr\xe8me".encode("latin-1") and raw[0]["drop"] == ""


def test_huge_single_line_is_skipped_without_holding_it(tmp_path):
    """A 50 MB line: dropped as doc_too_long (never held whole); the next line still reads."""
    p = tmp_path / "huge.txt"
    with open(p, "wb") as f:
        f.write(b"before\n")
        chunk = b"y" * (1 << 20)
        for _ in range(50):
            f.write(chunk)
        f.write(b"\nafter\n")
    rows = _read_all([InputSpec(path=str(p), text_mode="line")], ReadSpec(max_doc_mb=4, range_mb=1000))
    assert [(r["text"], r["drop"], r["source"].rsplit(":", 1)[1]) for r in rows] == [
        ("before", "", "line 1"), ("", "read:doc_too_long", "line 2"), ("after", "", "line 3")]
    whole = _read_all([InputSpec(path=str(p), text_mode="file")], ReadSpec(max_doc_mb=4))
    assert [r["drop"] for r in whole] == ["read:doc_too_long"]


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(PrepError, match="matches no file"):
        plan_reads([InputSpec(path=str(tmp_path / "nope" / "*.txt"))], ReadSpec())


def test_memory_filesystem():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/raygpt-test/docs/a.jsonl", b'{"text": "mem one"}\n{"text": "mem two"}\n')
    fs.pipe("/raygpt-test/docs/b.txt", b"mem three")
    rows = _read_all([InputSpec(path="memory://raygpt-test/docs/*")])
    assert [r["text"] for r in rows] == ["mem one", "mem two", "mem three"]
    assert rows[0]["source"] == "memory:///raygpt-test/docs/a.jsonl:line 1"


@pytest.fixture(scope="module")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1 with one bucket of test files."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                      region_name="us-east-1")
    s3.create_bucket(Bucket="corpus")
    s3.put_object(Bucket="corpus", Key="docs/a.jsonl", Body=b'{"text": "s3 one"}\nnope\n{"text": "s3 two"}\n')
    s3.put_object(Bucket="corpus", Key="docs/b.txt.gz", Body=gzip.compress(b"s3 gz line\n\ns3 gz para"))
    opts = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    yield opts
    server.stop()


def test_s3_via_moto(s3_server):
    rows = _read_all([InputSpec(path="s3://corpus/docs/*.jsonl", storage_options=s3_server),
                      InputSpec(path="s3://corpus/docs/b.txt.gz", text_mode="paragraph", storage_options=s3_server)])
    assert [(r["text"], r["drop"]) for r in rows] == [
        ("s3 one", ""), ("", "read:invalid_json"), ("s3 two", ""), ("s3 gz line", ""), ("s3 gz para", "")]
    assert rows[1]["source"] == "s3://corpus/docs/a.jsonl:line 2"


@pytest.mark.slow
def test_s3_pipeline_end_to_end(s3_server, ray_session, tmp_path):
    """The whole pipeline on s3:// input (Ray workers read from the moto server)."""
    from pipelines.data import PrepConfig, run
    from pipelines.data.config import PackSpec, TokenizerSpec
    from pipelines.data.manifest import load_manifest, shard_paths

    cfg = PrepConfig(output=str(tmp_path / "out"), progress=False,
                     inputs=[InputSpec(path="s3://corpus/docs/*", text_mode="paragraph", storage_options=s3_server)],
                     tokenizer=TokenizerSpec(kind="char", special_tokens=["<|endoftext|>"]),
                     pack=PackSpec(block_size=8, val_fraction=0.0))
    m = run(cfg)
    assert load_manifest(tmp_path / "out")["id"] == m["id"]
    read = m["ledger"][0]
    assert read == {"step": "read", "rows_in": 5, "rows_out": 4, "drops": {"invalid_json": 1}}
    assert m["problems"]["examples"] == [{"source": "s3://corpus/docs/a.jsonl:line 2", "reason": "read:invalid_json"}]
    # credentials never reach the manifest
    assert m["config"]["inputs"][0]["storage_options"] == ["client_kwargs", "key", "secret"]
    t = pq.read_table(shard_paths(m, "train")[0])
    assert t.num_rows == m["splits"]["train"]["rows"] > 0
