"""Shared test set-up: Triton runs under its interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; run on a GPU machine")
    for item in items:
        if "gpu" in item.keywords and not GPU:
            item.add_marker(skip_gpu)


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels (interpreted on CPU) for the ops under test."""
    monkeypatch.setenv("FASTFLAT_BACKEND", "triton")


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("FASTFLAT_BACKEND", "torch")


@pytest.fixture
def device():
    return "cuda" if GPU else "cpu"
