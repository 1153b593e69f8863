"""The GPU lane: every test here is marked `gpu` and skips (with the reason) where CUDA is absent.

    pytest -m gpu tests/gpu -q          # on a machine with a CUDA GPU (2+ GPUs: NCCL across 2 ranks)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# reuse the CPU training tests' helpers (tiny char dataset, debug-preset TrainConfig)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines" / "train"))


from gpu_testlib import cuda_count


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    reason = None
    if cuda_count() == 0:
        import torch

        reason = (f"no CUDA GPU here (torch {torch.__version__}, torch.cuda.is_available() is False, "
                  f"CUDA build {torch.version.cuda}); run `pytest -m gpu tests/gpu` on a GPU machine")
    for item in items:
        if Path(str(item.fspath)).resolve().parent == here:
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def char_data(tmp_path_factory) -> Path:
    from train_testlib import make_dataset, shakespeare_text

    paras = [p for p in shakespeare_text(None, 40_000).split("\n\n") if p.strip()]
    return make_dataset(tmp_path_factory.mktemp("char") / "ds", paras, block_size=32)
