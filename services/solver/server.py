"""SolverService over `bitsmith.algos`.

One request carries the linears of one group (those that share an input, like q/k/v); the library
solves them with one factorization. Results go to the artifact store; the reply carries references
and the per-linear errors the job report shows.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from bitsmith.errors import ConfigError
from bitsmith.rpc.convert import (
    ggml_scheme_from_proto,
    gptq_from_proto,
    method_from_proto,
    quantized_ref_to_proto,
    scheme_from_proto,
    tensor_ref_from_proto,
)
from bitsmith.rpc.server import ServiceBinding
from bitsmith.rpc.server import create_server as _create_server
from bitsmith.store import ArtifactStore, job_key
from bitsmith.v1 import solver_pb2, solver_pb2_grpc


class Solver(solver_pb2_grpc.SolverServiceServicer):
    def __init__(self, store: ArtifactStore) -> None:
        self._store = store

    def Solve(self, request: solver_pb2.SolveRequest, context: grpc.ServicerContext
              ) -> solver_pb2.SolveResponse:
        from bitsmith.pipeline import solve_group

        if not request.stats:
            raise ConfigError("a solve request needs at least one linear")
        names = [s.name for s in request.stats]
        weights = [self._store.get_tensor(tensor_ref_from_proto(s.weight)) for s in request.stats]
        hessian_keys = {(s.hessian.key, s.hessian.name) for s in request.stats if s.HasField("hessian")}
        if len(hessian_keys) > 1:
            raise ConfigError(f"linears {names} do not share one input Hessian; solve them separately")
        first = request.stats[0]
        hessian = self._store.get_tensor(tensor_ref_from_proto(first.hessian)) if hessian_keys else None
        label = ",".join(f"{request.prefix}.{n}" for n in names)
        scheme = ggml_scheme_from_proto(request.ggml) if request.HasField("ggml") else scheme_from_proto(request.scheme)
        outcomes = solve_group(weights, hessian, method=method_from_proto(request.method), scheme=scheme,
                               options=gptq_from_proto(request.gptq), label=label)
        solved = []
        for name, outcome in zip(names, outcomes, strict=True):
            full = f"{request.prefix}.{name}" if request.prefix else name
            ref = self._store.put_quantized(
                job_key(request.job_id, f"block-{request.block}", f"{name}.quantized.safetensors"), full, outcome.weight
            )
            solved.append(solver_pb2.SolvedLinear(
                quantized=quantized_ref_to_proto(full, ref), error=outcome.error, rtn_error=outcome.rtn_error,
                damp_percent=outcome.damp_percent,
            ))
        return solver_pb2.SolveResponse(solved=solved)


def create_server(address: str, *, store_root: Path) -> tuple[grpc.Server, int]:
    binding = ServiceBinding.of(Solver(ArtifactStore(store_root)), solver_pb2, solver_pb2_grpc, "SolverService")
    return _create_server(address, [binding], component="solver")
