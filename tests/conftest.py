"""Fixtures shared across test suites: the embedded demo model, opened once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from bitsmith.demo import DEMO_MODEL


@pytest.fixture(autouse=True)
def _default_dtype_stays_float32() -> Iterator[None]:
    """torch's default dtype is process-wide: a test (or a service thread it started) that leaves it
    changed fails itself here, instead of failing dozens of unrelated tests later in the run."""
    yield
    leaked = torch.get_default_dtype()
    if leaked != torch.float32:
        torch.set_default_dtype(torch.float32)
        pytest.fail(f"torch's default dtype was left at {leaked}")


@pytest.fixture(scope="session")
def demo_checkpoint():  # type: ignore[no-untyped-def]
    """The demo Llama opened block by block (`bitsmith.models.CheckpointModel`)."""
    from bitsmith.models import load_checkpoint

    return load_checkpoint(DEMO_MODEL)


@pytest.fixture(scope="session")
def demo_lm():  # type: ignore[no-untyped-def]
    """The demo Llama as a float32 transformers causal LM (treat as read-only)."""
    from bitsmith.models import load_causal_lm

    return load_causal_lm(DEMO_MODEL)
