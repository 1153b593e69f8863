"""Streamed training input from s3:// against a real S3-compatible server (moto on 127.0.0.1): the same batches
as from local disk, shards copied once per node into the node cache (file lock, verified, atomic), a shard
changed after prep refused, and a 2-worker run whose worker is killed after a checkpoint recovering with
the losses of an uninterrupted run (the machinery of test_train_ray.py, with the driver in a process of its
own, joined to the session's Ray as a job of its own whose runtime env gives the driver and the workers the
S3 endpoint and the cache directory; this process's environment never sees them).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_train_stream import write_tokens

from pipelines.config import ConfigError
from pipelines.train.data import ShardRows, TrainStream, open_dataset
from pipelines.train.shards import CACHE_ENV, cache_dir

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with a bucket `tokens`; yields (endpoint, upload(local_dir, prefix) -> s3 URL)."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1")
    client.create_bucket(Bucket="tokens")

    def upload(local: Path, prefix: str) -> str:
        for p in sorted(local.rglob("*")):
            if p.is_file():
                client.upload_file(str(p), "tokens", f"{prefix}/{p.relative_to(local).as_posix()}")
        return f"s3://tokens/{prefix}"

    yield endpoint, upload, client
    server.stop()


def _env(endpoint: str, cache: Path) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, CACHE_ENV: str(cache)}


@pytest.fixture
def s3_env(s3, monkeypatch, tmp_path):
    """This process talks to the moto server (s3fs reads the AWS_* variables) and caches in tmp_path/cache."""
    import s3fs

    for k, v in _env(s3[0], tmp_path / "cache").items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    yield tmp_path / "cache"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def local_big(tmp_path_factory) -> Path:
    return write_tokens(tmp_path_factory.mktemp("s3big") / "ds", 9000, rows_per_shard=2500)


def _cached_files(cache: Path) -> list[str]:
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())


def test_s3_batches_equal_local_and_shards_are_cached_once(s3, s3_env, local_big):
    url = s3[1](local_big, "big")
    ds = open_dataset(url)
    assert ds.is_remote and ds.manifest["id"] == open_dataset(str(local_big)).manifest["id"]
    remote, local = ds.split_rows("train"), open_dataset(str(local_big)).split_rows("train")
    a = TrainStream(remote, seed=1, micro_batch=16, grad_accum=2, world=2, rank=0, doc_mask=True)
    b = TrainStream(local, seed=1, micro_batch=16, grad_accum=2, world=2, rank=0, doc_mask=True)
    for step in (0, 1, 50, 141):
        for m in range(2):
            assert all(np.array_equal(x, y) for x, y in zip(a.micro_batch(step, m), b.micro_batch(step, m)))
    root = cache_dir(ds.manifest)
    tok = Path(ds.tokenizer_path())
    assert tok.parent == root and tok.read_bytes() == (local_big / "tokenizer.json").read_bytes()
    remote.take(np.arange(9000), ("input_ids",))  # every shard
    remote._pool.shutdown(wait=True)
    files = [f for f in _cached_files(root) if not f.split("/")[-1].startswith(".")]
    assert files == ["tokenizer.json"] + [f"train/part-0000{k}.parquet" for k in range(4)]
    assert not [p for p in root.rglob("*.tmp-*")]  # downloads land by rename only
    for f in files:
        assert (root / f).read_bytes() == (local_big / f).read_bytes()
    stamps = {f: (root / f).stat().st_mtime_ns for f in files}
    again = open_dataset(url).split_rows("train")  # another worker of this node: no second download
    again.take(np.arange(0, 9000, 7), ("input_ids",))
    assert stamps == {f: (root / f).stat().st_mtime_ns for f in files}


def test_a_second_process_waits_for_the_lock_and_uses_the_first_ones_copy(s3, s3_env, local_big, tmp_path):
    """The node cache's lock: while one process holds it (downloading), another waits, then takes the file
    that the first one put in place instead of downloading it again."""
    import fcntl

    url = s3[1](local_big, "lock") + "/train/part-00000.parquet"
    size = (local_big / "train" / "part-00000.parquet").stat().st_size
    dest = tmp_path / "node" / "part-00000.parquet"
    dest.parent.mkdir()
    code = ("import sys; from pathlib import Path; from pipelines.train.shards import cached_copy; "
            "print('waiting', flush=True); "
            f"print(cached_copy({url!r}, Path({str(dest)!r}), size={size}, sha256=None), flush=True)")
    with open(dest.parent / f".{dest.name}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, **_env(s3[0], tmp_path / "unused")})
        assert p.stdout.readline().strip() == "waiting"
        time.sleep(1.0)
        assert p.poll() is None  # blocked on the lock
        dest.write_bytes(b"x" * size)  # what "the first process" downloaded
        fcntl.flock(lock, fcntl.LOCK_UN)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and out.strip() == str(dest) and dest.read_bytes() == b"x" * size
    # and concurrent first downloads all end with one verified copy, no temp files left
    dest2 = tmp_path / "node2" / "part-00000.parquet"
    code2 = code.replace(str(dest), str(dest2))
    procs = [subprocess.Popen([sys.executable, "-c", code2], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **_env(s3[0], tmp_path / "unused")}) for _ in range(3)]
    assert all(p.wait(timeout=180) == 0 for p in procs)
    assert dest2.read_bytes() == (local_big / "train" / "part-00000.parquet").read_bytes()
    assert [p.name for p in dest2.parent.iterdir() if ".tmp-" in p.name] == []


def test_shard_changed_after_prep_is_refused_by_the_cache(s3, s3_env, local_big):
    url = s3[1](local_big, "changed")
    data = bytearray((local_big / "train" / "part-00001.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    s3[2].put_object(Bucket="tokens", Key="changed/train/part-00001.parquet", Body=bytes(data))
    rows = open_dataset(url).split_rows("train")
    with pytest.raises(ConfigError) as e:
        rows.take(np.array([2600]), ("input_ids",))
    msg = str(e.value)
    assert "\n" not in msg and f"{url}/train/part-00001.parquet" in msg and "sha256" in msg
    assert not (cache_dir(rows.manifest) / "train" / "part-00001.parquet").exists()  # nothing cached


# ---- resume after a kill, on s3 input ---------------------------------------------------------------------

# joins the session's Ray (argv[3]) as a job whose runtime env (argv[4]) every worker of the job inherits
DRIVER = """
import json, sys
from pathlib import Path
import ray
ray.init(address=sys.argv[3], runtime_env={"env_vars": json.loads(sys.argv[4])}, logging_level=30)  # WARNING
from test_train_ray import _cfg
from pipelines.train.trainer import run
res = run(_cfg(sys.argv[1], Path(sys.argv[2]), max_failures=1, **{"testing.throttle_s": 0.3}))
print("RESULT", json.dumps({"steps": res.steps}))
"""


@pytest.mark.slow
def test_killed_worker_on_s3_input_recovers_with_identical_losses(ray_session, ref_run, char_data, s3, tmp_path):
    from test_train_ray import STEPS, _kill_after_checkpoint
    from train_testlib import train_losses

    url = s3[1](char_data, "char")
    ref = ref_run[0]  # uninterrupted, from local disk, in this process's Ray (16 steps, the same first 12)
    rd, cache, out = tmp_path / "s3run", tmp_path / "cache", {}
    # the session Ray's job env (dashboard address, thread counts) + the S3 endpoint and the node cache
    job_env = {**(ray_session.get_runtime_context().runtime_env.get("env_vars") or {}), **_env(s3[0], cache)}
    env = {**os.environ, **_env(s3[0], cache),
           "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    addr = ray_session.get_runtime_context().gcs_address
    killer = _kill_after_checkpoint(rd, 4, rank=1, out=out)
    proc = subprocess.run([sys.executable, "-c", DRIVER, url, str(rd), addr, json.dumps(job_env)], env=env,
                          capture_output=True, text=True, timeout=1500, cwd=str(tmp_path))
    killer.join(timeout=5)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.split("RESULT", 1)[1])["steps"] == STEPS
    assert out.get("killed"), "the worker was never killed"
    attempts = (rd / "workers" / "attempts.jsonl").read_text().splitlines()
    assert len(attempts) == 4, attempts  # 2 workers x 2 attempts
    got, want = train_losses(rd), train_losses(ref)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert abs(got[s] - want[s]) <= 1e-6, (s, got[s], want[s])
    # the node's cache: each file once (2 workers x 2 attempts and the driver shared it), no temp files
    root = cache / json.loads((char_data / "manifest.json").read_text())["id"]
    files = [f for f in _cached_files(root) if not f.split("/")[-1].startswith(".")]
    assert files == ["tokenizer.json", "train/part-00000.parquet", "val/part-00000.parquet"]
    assert not list(root.rglob("*.tmp-*"))
    cfg = json.loads((rd / "config.json").read_text())
    assert cfg["config"]["data"] == url


def test_shard_rows_refuse_pickling(local_big):
    rows = ShardRows(open_dataset(str(local_big)).manifest, "train")
    with pytest.raises(TypeError, match="split_rows"):
        pickle.dumps(rows)
