"""Fixtures for the training tests (helpers live in train_testlib.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_testlib import make_dataset, shakespeare_text


@pytest.fixture(scope="session")
def char_data(request, tmp_path_factory) -> Path:
    """Char-level Tiny Shakespeare (first 120k chars; synthetic text without ../shared/data), block 32."""
    try:
        shared = request.getfixturevalue("shared_data")
    except pytest.skip.Exception:
        shared = None
    text = shakespeare_text(shared)
    paras = [p for p in text.split("\n\n") if p.strip()]
    return make_dataset(tmp_path_factory.mktemp("char") / "ds", paras, block_size=32)


@pytest.fixture(scope="session")
def ref_run(ray_session, char_data, tmp_path_factory):
    """The uninterrupted 2-worker ZeRO-2 run (16 steps; its LR schedule decays over 16 steps whatever max_steps
    is, so its steps 1-12 are those of a 12-step run) that every interrupted run is compared with: the kill
    and resume drills of test_train_ray.py and the s3 kill drill of test_train_stream_s3.py share it."""
    from test_train_ray import _cfg

    from pipelines.train.trainer import run

    rd = tmp_path_factory.mktemp("ref") / "run"
    res = run(_cfg(char_data, rd, max_steps=16))
    return rd, res
