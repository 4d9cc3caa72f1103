"""RuntimeService for NVIDIA GPUs over `bitsmith.nvidia`: GPTQ, AWQ, compressed-tensors (int and FP8),
ModelOpt and TensorRT-LLM artifacts with their quantized linears on bitsmith's kernels.

Evaluate reports the GPU's peak memory with the scores; Generate streams text and ends with the prompt
and decode tokens/s the engine timed itself. On Ray the role asks for one GPU (`num_gpus=1`) where the
cluster has GPUs. Without a GPU the same service runs the kernels' torch twins on the CPU — the
numbers are the artifact's, the speed is not a GPU's — so CI and laptops exercise this very path.
The servicer is runtime_cpu's `Runtime`, given the NVIDIA target.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from bitsmith.runtimes import Target
from bitsmith_services.runtime_cpu.server import create_runtime_server


def create_server(address: str, *, store_root: Path) -> tuple[grpc.Server, int]:
    """`store_root` is unused: the runtime reads artifacts, not the scratch store."""
    from bitsmith.nvidia import default_device

    return create_runtime_server(address, Target.NVIDIA, component="runtime_nvidia", device=default_device())
