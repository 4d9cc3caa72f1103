"""RuntimeService for Apple silicon: MLX artifacts executed by mlx (`mx.quantized_matmul` via mlx-lm).

On a Mac mlx runs on the GPU (Metal); on Linux, where CI tests it, on mlx's CPU backend (`mlx[cpu]`).
GGUF on Apple goes through runtime_cpu's llama.cpp path. The servicer is runtime_cpu's `Runtime`,
given the formats this target runs.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from bitsmith.runtimes import Target
from bitsmith_services.runtime_cpu.server import create_runtime_server


def create_server(address: str, *, store_root: Path) -> tuple[grpc.Server, int]:
    """`store_root` is unused: the runtime reads artifacts, not the scratch store."""
    return create_runtime_server(address, Target.APPLE, component="runtime_apple")
