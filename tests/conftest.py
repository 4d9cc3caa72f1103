"""Fixtures shared across test suites: the embedded demo model, opened once per session."""

from __future__ import annotations

import pytest
from bitsmith.demo import DEMO_MODEL


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
