"""RuntimeService on CPU over `bitsmith.runtimes`: Evaluate an artifact, Generate from it.

runtime_cpu runs checkpoints and GPTQ artifacts through torch and ONNX artifacts through ONNX Runtime
(`bitsmith.runtimes.CPU_FORMATS`). `Runtime` is the servicer of every runtime target; a target is the
set of formats it runs (runtime_apple reuses it with MLX).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from pathlib import Path

import grpc
from bitsmith.errors import ConfigError
from bitsmith.rpc.server import ServiceBinding
from bitsmith.rpc.server import create_server as _create_server
from bitsmith.schemes import Format
from bitsmith.v1 import common_pb2, runtime_pb2, runtime_pb2_grpc

MAX_NEW_TOKENS = 4096
CPU_FORMATS: frozenset[Format | None] = frozenset(
    {None, Format.GPTQ, Format.ONNX, Format.AWQ, Format.COMPRESSED_TENSORS}
)
"""Mirrors `bitsmith.runtimes.CPU_FORMATS` without importing it (that module is imported per call)."""


class Runtime(runtime_pb2_grpc.RuntimeServiceServicer):
    """Evaluate / Generate on the artifacts whose format is in `formats` (others: FAILED_PRECONDITION)."""

    def __init__(self, formats: Collection[Format | None]) -> None:
        self.formats = frozenset(formats)

    def Evaluate(self, request: runtime_pb2.EvaluateRequest, context: grpc.ServicerContext
                 ) -> runtime_pb2.EvaluateResponse:
        from bitsmith.runtimes import evaluate_path

        results = evaluate_path(
            Path(request.artifact_path), [Path(f) for f in request.data_files], seq_len=request.seq_len or 512,
            reference=Path(request.reference_model_path) if request.reference_model_path else None,
            formats=self.formats,
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
                                    should_stop=lambda: not context.is_active(), formats=self.formats):
            yield runtime_pb2.GenerateChunk(text=text)


def create_runtime_server(address: str, formats: Collection[Format | None], component: str
                          ) -> tuple[grpc.Server, int]:
    """A RuntimeService for the target that runs `formats`."""
    binding = ServiceBinding.of(Runtime(formats), runtime_pb2, runtime_pb2_grpc, "RuntimeService")
    return _create_server(address, [binding], component=component)


def create_server(address: str, *, store_root: Path) -> tuple[grpc.Server, int]:
    """`store_root` is unused: the runtime reads artifacts, not the scratch store."""
    return create_runtime_server(address, CPU_FORMATS, component="runtime_cpu")
