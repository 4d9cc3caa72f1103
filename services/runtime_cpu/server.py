"""RuntimeService on CPU over `bitsmith.runtimes`: Evaluate an artifact, Generate from it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
from bitsmith.errors import ConfigError
from bitsmith.rpc.server import ServiceBinding
from bitsmith.rpc.server import create_server as _create_server
from bitsmith.v1 import common_pb2, runtime_pb2, runtime_pb2_grpc

MAX_NEW_TOKENS = 4096


class CpuRuntime(runtime_pb2_grpc.RuntimeServiceServicer):
    def Evaluate(self, request: runtime_pb2.EvaluateRequest, context: grpc.ServicerContext
                 ) -> runtime_pb2.EvaluateResponse:
        from bitsmith.runtimes import evaluate_path

        results = evaluate_path(
            Path(request.artifact_path), [Path(f) for f in request.data_files], seq_len=request.seq_len or 512,
            reference=Path(request.reference_model_path) if request.reference_model_path else None,
        )
        return runtime_pb2.EvaluateResponse(results=[
            common_pb2.EvalResult(dataset=r.dataset, ppl=r.ppl, tokens=r.tokens, kl=r.kl, top1=r.top1,
                                  reference_ppl=r.reference_ppl)
            for r in results
        ])

    def Generate(self, request: runtime_pb2.GenerateRequest, context: grpc.ServicerContext
                 ) -> Iterator[runtime_pb2.GenerateChunk]:
        from bitsmith.runtimes import generate_greedy

        if not 0 < request.max_new_tokens <= MAX_NEW_TOKENS:
            raise ConfigError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}, got {request.max_new_tokens}")
        for text in generate_greedy(Path(request.artifact_path), request.prompt, request.max_new_tokens,
                                    should_stop=lambda: not context.is_active()):
            yield runtime_pb2.GenerateChunk(text=text)


def create_server(address: str, *, store_root: Path) -> tuple[grpc.Server, int]:
    """`store_root` is unused: the runtime reads artifacts, not the scratch store."""
    binding = ServiceBinding(
        CpuRuntime(),
        runtime_pb2_grpc.add_RuntimeServiceServicer_to_server,
        runtime_pb2.DESCRIPTOR.services_by_name["RuntimeService"].full_name,
    )
    return _create_server(address, [binding], component="runtime_cpu")
