"""RunLock on an object store (s3:// against a real moto server): exclusive create, one winner of many, stale
takeover and heartbeats by conditional overwrite (PUT If-Match)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from pipelines.ops.lock import LockHeld, RunLock


@pytest.fixture(scope="module")
def s3_opts():
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket="runs")
    yield {"key": "test", "secret": "test", "skip_instance_cache": True,
           "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    server.stop()


def _read(url, opts):
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **opts)
    return json.loads(fs.cat_file(path))  # a plain GET (open() reads If-Match its HEAD, which a heartbeat may race)


def test_s3_lock_is_exclusive_and_released(s3_opts):
    url = "s3://runs/out/_locks/dt=2024-05-01.lock"
    with RunLock(url, ttl_s=60, storage_options=s3_opts) as lock:
        assert _read(url, s3_opts)["token"] == lock.token
        with pytest.raises(LockHeld, match="another run holds s3://runs/out/_locks/dt=2024-05-01.lock"):
            RunLock(url, ttl_s=60, storage_options=s3_opts).acquire()
    import fsspec

    assert not fsspec.core.url_to_fs(url, **s3_opts)[0].exists(url)


def contend(url, opts, ttl_s, n=6):
    """n RunLocks on `url` acquiring at once, each in its own thread: (winners, losers)."""
    winners, losers = [], []
    barrier = threading.Barrier(n)

    def one():
        lk = RunLock(url, ttl_s=ttl_s, storage_options=opts)
        barrier.wait()
        try:
            winners.append(lk.acquire())
        except LockHeld:
            losers.append(lk)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return winners, losers


def test_s3_only_one_of_many_contenders_wins(s3_opts):
    url = "s3://runs/out/_locks/race.lock"
    winners, losers = contend(url, s3_opts, ttl_s=60)
    assert len(winners) == 1 and len(losers) == 5
    assert _read(url, s3_opts)["token"] == winners[0].token
    winners[0].release()


def test_s3_stale_lock_is_taken_over(s3_opts):
    import fsspec

    url = "s3://runs/out/_locks/stale.lock"
    old = time.time() - 7200
    with fsspec.open(url, "wb", **s3_opts) as f:
        f.write(json.dumps({"host": "elsewhere", "pid": 1, "token": "old", "started_at_epoch": old,
                            "heartbeat_at_epoch": old, "ttl_s": 3600}).encode())
    with RunLock(url, ttl_s=3600, storage_options=s3_opts) as lock:
        assert lock.took_over is not None and "ttl" in lock.took_over.reason
        assert _read(url, s3_opts)["token"] == lock.token


def _write(url, opts, **record):
    import fsspec

    with fsspec.open(url, "wb", **opts) as f:
        f.write(json.dumps(record).encode())


def test_s3_only_one_of_many_contenders_takes_a_stale_lock(s3_opts):
    url = "s3://runs/out/_locks/stale-race.lock"
    old = time.time() - 7200
    _write(url, s3_opts, host="elsewhere", pid=1, token="old", started_at_epoch=old, heartbeat_at_epoch=old, ttl_s=3600)
    winners, losers = contend(url, s3_opts, ttl_s=3600)
    assert len(winners) == 1 and len(losers) == 5  # the takeover is a PUT If-Match: the ETag judged stale
    assert winners[0].took_over is not None and _read(url, s3_opts)["token"] == winners[0].token
    winners[0].release()


def test_s3_heartbeat_refreshes_and_never_overwrites_a_takeover(s3_opts):
    url = "s3://runs/out/_locks/beat.lock"
    lock = RunLock(url, ttl_s=60, heartbeat_s=0.1, storage_options=s3_opts).acquire()
    first = _read(url, s3_opts)["heartbeat_at_epoch"]
    deadline = time.time() + 20
    while _read(url, s3_opts)["heartbeat_at_epoch"] == first and time.time() < deadline:
        time.sleep(0.05)
    assert _read(url, s3_opts)["heartbeat_at_epoch"] > first
    _write(url, s3_opts, host="elsewhere", pid=1, token="thief", heartbeat_at_epoch=time.time(), ttl_s=60)
    while not lock.lost and time.time() < deadline:
        time.sleep(0.05)
    assert lock.lost
    lock.release()
    assert _read(url, s3_opts)["token"] == "thief"
