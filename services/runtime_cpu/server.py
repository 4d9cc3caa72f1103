"""RuntimeService on CPU over `bitsmith.runtimes`: Evaluate an artifact, Generate from it.

runtime_cpu runs checkpoints and GPTQ / AWQ / compressed-tensors artifacts through torch, ONNX artifacts
through ONNX Runtime and GGUF artifacts through llama.cpp (in a worker process per file, so a file that
crashes llama.cpp fails its call, not the service). `Runtime` is the servicer of every runtime target
(`bitsmith.runtimes.Target`: the engines it has by format); runtime_apple and runtime_nvidia reuse it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from bitsmith.errors import ConfigError
from bitsmith.rpc.convert import eval_result_to_proto, usage_to_proto
from bitsmith.rpc.server import ServiceBinding
from bitsmith.rpc.server import create_server as _create_server
from bitsmith.runtimes import Target
from bitsmith.v1 import runtime_pb2, runtime_pb2_grpc

if TYPE_CHECKING:
    import torch

MAX_NEW_TOKENS = 4096
DEFAULT_CHUNK_INTERVAL_MS = 10
"""A GenerateRequest without `chunk_interval_ms` gets this: below what a reader of the stream notices, above
a small model's decode step (so the stream's cost stays a small share of its time)."""


class Runtime(runtime_pb2_grpc.RuntimeServiceServicer):
    """Evaluate / Generate on `target`'s engines (an artifact of a format the target does not run:
    FAILED_PRECONDITION); usage reports `device`'s peak memory where the target computes on one."""

    def __init__(self, target: Target, device: torch.device | None = None) -> None:
        self.target = target
        self.device = device

    def Evaluate(self, request: runtime_pb2.EvaluateRequest, context: grpc.ServicerContext
                 ) -> runtime_pb2.EvaluateResponse:
        from bitsmith.runtimes import evaluate_path

        results = evaluate_path(
            Path(request.artifact_path), [Path(f) for f in request.data_files], seq_len=request.seq_len or 512,
            reference=Path(request.reference_model_path) if request.reference_model_path else None,
            target=self.target,
        )
        return runtime_pb2.EvaluateResponse(results=[eval_result_to_proto(r) for r in results],
                                            usage=usage_to_proto(self.device))

    def Generate(self, request: runtime_pb2.GenerateRequest, context: grpc.ServicerContext
                 ) -> Iterator[runtime_pb2.GenerateChunk]:
        from bitsmith.runtimes import GenerationStats, generate_greedy

        if not 0 < request.max_new_tokens <= MAX_NEW_TOKENS:
            raise ConfigError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}, got {request.max_new_tokens}")
        interval_ms = (request.chunk_interval_ms if request.HasField("chunk_interval_ms")
                       else DEFAULT_CHUNK_INTERVAL_MS)
        for piece in generate_greedy(Path(request.artifact_path), request.prompt, request.max_new_tokens,
                                     should_stop=lambda: not context.is_active(), target=self.target,
                                     chunk_interval_s=interval_ms / 1e3):
            if isinstance(piece, GenerationStats):
                yield runtime_pb2.GenerateChunk(stats=runtime_pb2.GenerateStats(
                    prompt_tokens=piece.prompt.tokens, prompt_seconds=piece.prompt.seconds,
                    decode_tokens=piece.decode.tokens, decode_seconds=piece.decode.seconds,
                    generated_tokens=piece.generated_tokens))
            else:
                yield runtime_pb2.GenerateChunk(text=piece)


def create_runtime_server(address: str, target: Target, component: str, device: torch.device | None = None
                          ) -> tuple[grpc.Server, int]:
    """A RuntimeService for `target` (computing on `device`, where it reports that device's memory)."""
    binding = ServiceBinding.of(Runtime(target, device), runtime_pb2, runtime_pb2_grpc, "RuntimeService")
    return _create_server(address, [binding], component=component)


def create_server(address: str, *, store_root: Path) -> tuple[grpc.Server, int]:
    """`store_root` is unused: the runtime reads artifacts, not the scratch store."""
    return create_runtime_server(address, Target.CPU, component="runtime_cpu")
