"""Helpers of the GPU lane (tests/gpu): `pytest -m gpu tests/gpu`. Does not: start Ray or touch a GPU itself."""

from __future__ import annotations


def cuda_count() -> int:
    """CUDA devices this process sees (0 without CUDA or with a CPU-only torch)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
