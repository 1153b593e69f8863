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
