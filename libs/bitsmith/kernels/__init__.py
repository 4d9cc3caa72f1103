"""GPU kernels for bitsmith's algorithms, each with a torch twin that defines what it computes.

`select` picks the kernel or the twin for a problem and says why; Triton is imported only when a
kernel is first launched, so importing this package (or `bitsmith.algos`) never loads it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from typing import Generic, NamedTuple, Protocol, TypeVar

from bitsmith.errors import UnsupportedError


class KernelPreference(StrEnum):
    """Which implementation a kernel-backed step may use (see `bitsmith.kernels.select`)."""

    AUTO = "auto"
    """The fastest one that can implement the problem."""
    TRITON = "triton"
    """The Triton kernel or an error (never a silent fallback)."""
    REFERENCE = "reference"
    """The torch twin, on any device."""


F = TypeVar("F", bound=Callable[..., object])
"""An implementation: the kernel or its torch twin, with the same signature."""
S = TypeVar("S", bound="_Spec", contravariant=True)


class _Spec(Protocol):
    """What every kernel's spec says: the device it runs on."""

    @property
    def device_type(self) -> str: ...


class Candidate(NamedTuple, Generic[S, F]):
    """A fast implementation and the check that says whether it can compute a spec, and if not, why."""

    name: str
    run: F
    can_implement: Callable[[S], tuple[bool, str]]


@dataclass(frozen=True, slots=True)
class Choice(Generic[F]):
    """The chosen implementation, its name, and why it (and not a faster one) was chosen."""

    run: F
    name: str
    reason: str


REFERENCE_FORCED = "reference forced by preference"


def choose(
    spec: S,
    preference: KernelPreference,
    candidates: Sequence[Candidate[S, F]],
    reference: F,
    *,
    problem: str,
    log: logging.Logger,
    slow_path: str,
) -> Choice[F]:
    """The first of `candidates` (fastest first) that can compute `spec`, else the torch twin `reference`.

    `REFERENCE` forces the twin; `TRITON` demands a candidate and raises `UnsupportedError` ("no `problem`
    for `spec`") with every candidate's reason rather than fall back. On a CUDA device the fallback is
    logged to `log` as "`slow_path` on CUDA uses the torch twin", once per cause: it is worth a warning,
    not one per layer or token.
    """
    if preference == KernelPreference.REFERENCE:
        return Choice(reference, "reference", REFERENCE_FORCED)
    reasons = []
    for candidate in candidates:
        ok, reason = candidate.can_implement(spec)
        if ok:
            return Choice(candidate.run, candidate.name, reason)
        reasons.append(reason)
    reason = "; ".join(reasons)
    if preference == KernelPreference.TRITON:
        raise UnsupportedError(f"no {problem} for {spec}: {reason}")
    if spec.device_type == "cuda":
        _warn_once(log, slow_path, reason)
    return Choice(reference, "reference", reason)


@cache
def _warn_once(log: logging.Logger, slow_path: str, reason: str) -> None:
    log.warning("%s on CUDA uses the torch twin: %s", slow_path, reason)


__all__ = ["Candidate", "Choice", "KernelPreference", "choose"]
