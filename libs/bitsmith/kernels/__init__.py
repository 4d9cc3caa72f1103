"""GPU kernels for bitsmith's algorithms, each with a torch twin that defines what it computes.

`select` picks the kernel or the twin for a problem and says why; Triton is imported only when a
kernel is first launched, so importing this package (or `bitsmith.algos`) never loads it.
"""

from __future__ import annotations

from enum import StrEnum


class KernelPreference(StrEnum):
    """Which implementation a kernel-backed step may use (see `bitsmith.kernels.select`)."""

    AUTO = "auto"
    """The fastest one that can implement the problem."""
    TRITON = "triton"
    """The Triton kernel or an error (never a silent fallback)."""
    REFERENCE = "reference"
    """The torch twin, on any device."""


__all__ = ["KernelPreference"]
