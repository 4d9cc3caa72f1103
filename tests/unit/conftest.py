"""Fixtures the format tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from bitsmith.demo import DEMO_MODEL
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Small tensors: one intra-op thread is as fast alone and far faster on a busy machine (a module asks for
    it with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    """The demo model's tensors as stored, loaded once per module."""
    return load_file(DEMO_MODEL / "model.safetensors")
