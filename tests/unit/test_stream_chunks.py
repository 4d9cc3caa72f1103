"""`coalesce`: how generated text is grouped into streamed chunks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bitsmith.errors import ConfigError
from bitsmith.runtimes import GenerationStats, Throughput, coalesce, generate_greedy

STATS = GenerationStats(prompt=Throughput(3, 0.1), decode=Throughput(9, 0.2), generated_tokens=10)


def _decoded(step_s: float, n: int = 10) -> Iterator[str | GenerationStats]:
    """`n` one-character tokens, one per `step_s`, then the stats, as an engine yields them."""
    for i in range(n):
        if i:
            time.sleep(step_s)
        yield chr(ord("a") + i)
    yield STATS


def test_zero_interval_sends_every_token() -> None:
    assert list(coalesce(_decoded(0.0), 0.0)) == [*"abcdefghij", STATS]


def test_tokens_within_the_interval_go_together_and_nothing_is_lost() -> None:
    out = list(coalesce(_decoded(0.002), 10.0))
    assert out == ["a", "bcdefghij", STATS]  # the first at once; the rest at the end, before the stats


def test_a_step_longer_than_the_interval_streams_token_by_token() -> None:
    assert list(coalesce(_decoded(0.02, n=4), 0.005)) == [*"abcd", STATS]


def test_bad_interval_is_refused() -> None:
    with pytest.raises(ConfigError, match="chunk interval"):
        next(generate_greedy(Path("."), "x", 1, chunk_interval_s=-1.0))
