"""RunLock on an object store (s3:// against a real moto server): exclusive create, one winner of many."""

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

    with fsspec.open(url, "rb", **opts) as f:
        return json.loads(f.read())


def test_s3_lock_is_exclusive_and_released(s3_opts):
    url = "s3://runs/out/_locks/dt=2024-05-01.lock"
    with RunLock(url, ttl_s=60, storage_options=s3_opts) as lock:
        assert _read(url, s3_opts)["token"] == lock.token
        with pytest.raises(LockHeld, match="another run holds s3://runs/out/_locks/dt=2024-05-01.lock"):
            RunLock(url, ttl_s=60, storage_options=s3_opts).acquire()
    import fsspec

    assert not fsspec.core.url_to_fs(url, **s3_opts)[0].exists(url)


def test_s3_only_one_of_many_contenders_wins(s3_opts):
    url = "s3://runs/out/_locks/race.lock"
    winners, losers = [], []
    barrier = threading.Barrier(6)

    def contend():
        lk = RunLock(url, ttl_s=60, storage_options=s3_opts)
        barrier.wait()
        try:
            winners.append(lk.acquire())
        except LockHeld:
            losers.append(lk)

    threads = [threading.Thread(target=contend) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
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
