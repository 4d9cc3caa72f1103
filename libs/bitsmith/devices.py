"""The compute device a process works on, chosen once from what the operator asked for.

Services that compute (the calibrator and the solver) take a device name from their command line;
"auto" means the first CUDA GPU where torch sees one, else the CPU, so the same command serves a GPU
node and a laptop. An explicit "cuda" on a machine without one is refused at start-up, not at the
first request.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import TYPE_CHECKING

from bitsmith.errors import ConfigError

if TYPE_CHECKING:
    import torch

AUTO = "auto"
"""CUDA when available, else the CPU."""


class MatmulPrecision(StrEnum):
    """How a calibrator's block forwards and Hessian products run.

    `HIGHEST` and `HIGH` compute in float32 (torch's `set_float32_matmul_precision` names): `HIGH` lets a
    GPU's tensor cores take float32 inputs as TensorFloat-32 (10-bit mantissa, float32 accumulation),
    several times the throughput of `HIGHEST`'s exact float32; the CPU always computes exact float32.
    `BFLOAT16` runs the block forward itself in bfloat16, as peer tools calibrate and as most checkpoints
    are stored: half the bytes of every activation moved or kept, the fused (flash) attention, and
    bfloat16 tensor cores; the Hessians are exact float32 sums of the bfloat16 inputs' products. On an
    H100 an 8B-shaped block's forward over 128 x 2048 tokens took 0.23 s against 0.66 s with TF32.
    """

    HIGHEST = "highest"
    HIGH = "high"
    BFLOAT16 = "bfloat16"

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype a block forward computes in (and its activations are kept in)."""
        import torch

        return torch.bfloat16 if self is MatmulPrecision.BFLOAT16 else torch.float32


@contextmanager
def matmul_precision(device: torch.device, precision: MatmulPrecision) -> Iterator[None]:
    """Compute float32 products on `device` at `precision` inside the block (a process-wide torch setting:
    callers that share a process must not overlap; the CPU is left alone)."""
    import torch

    if device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    # With bfloat16 forwards the float32 products left (AWQ's search statistics, for one) take TF32.
    torch.set_float32_matmul_precision(MatmulPrecision.HIGH.value if precision is MatmulPrecision.BFLOAT16
                                       else precision.value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def resolve_device(name: str = AUTO) -> torch.device:
    """The torch device for `name` ("auto", "cpu", "cuda", "cuda:N"); refuses devices this machine lacks."""
    import torch

    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}: expected auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for, but torch sees no CUDA GPU here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} was asked for, but only {torch.cuda.device_count()} GPUs are visible")
    elif device.type != "cpu":
        raise ConfigError(f"device {name!r} is not supported: expected auto, cpu, cuda or cuda:N")
    return device


def peak_memory_bytes(device: torch.device) -> int:
    """Most bytes torch's allocator held on `device` since the last reset; 0 on the CPU (not tracked)."""
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0


def peak_host_bytes() -> int:
    """Peak resident set size so far of this process or of the largest of its finished children
    (llama.cpp evaluates in a worker process): what a host must have for what it served."""
    import resource
    import sys

    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def release_cached_memory(device: torch.device) -> None:
    """Hand the allocator's unused cached blocks back to the driver (no-op on the CPU).

    The calibrator and the solver of a one-GPU host share the device from two processes; memory one
    keeps cached after a call is memory the other's next call cannot have.
    """
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()


class PhaseTimes:
    """Seconds per named phase of one piece of work on `device`, for its end-of-call log line.

    A GPU runs work asynchronously, so a phase ends with a synchronize: its seconds are the device's work
    issued inside it, not just the launches. One synchronize per phase costs nothing next to a block's
    forward, and it is what tells a slow call's transfers from its compute.
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        import torch

        started = time.perf_counter()
        try:
            yield
        finally:
            if self._device.type == "cuda":
                torch.cuda.synchronize(self._device)
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - started, 4)
