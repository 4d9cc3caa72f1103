"""SolverService over `bitsmith.algos`.

One request carries the linears of one group (those that share an input, like q/k/v); the library
solves them with one factorization. A linear's weight is read from the checkpoint itself (the
request's `model_path`) unless its stats carry one (AWQ's rescaled weight, in the store); stats with
cross statistics (asymmetric calibration) are solved for the float model's outputs. Results go
to the artifact store as job scratch; the reply carries references and the per-linear errors the job
report shows, with tr(W·H·Wᵀ) of each linear so the report can put errors of layers of any size on
one scale.

The weights and Hessian of one request move to the service's device for the solve (on CUDA the
library picks its Triton kernels itself) and the results come back to the host for the store, so the
device holds one unit's problem at a time. After every solve the service logs the device's peak
memory so far (`peak_gpu_bytes`) and the call's seconds.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from bitsmith.devices import AUTO, peak_memory_bytes, release_cached_memory, resolve_device
from bitsmith.errors import ConfigError
from bitsmith.rpc.convert import (
    gptq_from_proto,
    method_from_proto,
    quantized_ref_to_proto,
    solve_grid,
    tensor_ref_from_proto,
    usage_to_proto,
)
from bitsmith.rpc.server import ServiceBinding
from bitsmith.rpc.server import create_server as _create_server
from bitsmith.store import ArtifactStore, job_key
from bitsmith.v1 import common_pb2, solver_pb2, solver_pb2_grpc

if TYPE_CHECKING:
    import torch
    from bitsmith.algos import GPTQResult
    from bitsmith.models.base import TensorIndex
    from bitsmith.schemes import GPTQOptions

log = logging.getLogger("bitsmith.solver")


@functools.lru_cache(maxsize=2)
def _checkpoint(path: str) -> TensorIndex:
    """Where the tensors of a checkpoint live (headers only; the calibrator's Plan validated it)."""
    from bitsmith.models.base import TensorIndex

    return TensorIndex(Path(path))


def _full_name(request: solver_pb2.SolveRequest, name: str) -> str:
    return f"{request.prefix}.{name}" if request.prefix else name


class Solver(solver_pb2_grpc.SolverServiceServicer):
    def __init__(self, store: ArtifactStore, *, device: torch.device) -> None:
        self._store = store
        self._device = device

    def _weight(self, request: solver_pb2.SolveRequest, stats: common_pb2.LinearStats) -> torch.Tensor:
        """The weight to solve, float32 on the device: the stats' own, else the checkpoint's."""
        if stats.HasField("weight"):
            return self._store.get_tensor(tensor_ref_from_proto(stats.weight)).to(self._device)
        if not request.model_path:
            raise ConfigError(f"{stats.name}: the stats carry no weight and the request names no checkpoint")
        return _checkpoint(request.model_path).read(f"{_full_name(request, stats.name)}.weight", self._device)

    def _errors(self, request: solver_pb2.SolveRequest, stats: common_pb2.LinearStats, weight: torch.Tensor,
                outcome: GPTQResult, hessian: torch.Tensor | None, options: GPTQOptions) -> tuple[float, float, float]:
        """(error, RTN's error, tr(W·H·Wᵀ)) of one solved linear for the job report.

        A linear AWQ rescaled is measured against its float weight before clipping, and RTN of the
        checkpoint's own weight is its baseline (`scaled_errors`): the solve's own numbers compare
        the clipped weight with itself.
        """
        from bitsmith.algos.awq import scaled_errors
        from bitsmith.algos.gptq import weight_energy
        from bitsmith.quantized import QuantizedWeight

        if hessian is None:
            return outcome.error, outcome.rtn_error, 0.0
        if not stats.HasField("weight") or not isinstance(outcome.weight, QuantizedWeight):
            return outcome.error, outcome.rtn_error, weight_energy(weight, hessian)
        original = _checkpoint(request.model_path).read(f"{_full_name(request, stats.name)}.weight", self._device)
        reference = (self._store.get_tensor(tensor_ref_from_proto(stats.reference)).to(self._device)
                     if stats.HasField("reference") else weight)
        return scaled_errors(original, reference, outcome.weight.dequantize(), hessian,
                             outcome.weight.scheme, options.grid_search)

    def Solve(self, request: solver_pb2.SolveRequest, context: grpc.ServicerContext
              ) -> solver_pb2.SolveResponse:
        from bitsmith.pipeline import solve_group

        started = time.perf_counter()
        if not request.stats:
            raise ConfigError("a solve request needs at least one linear")
        names = [s.name for s in request.stats]
        weights = [self._weight(request, s) for s in request.stats]
        hessian_keys = {(s.hessian.key, s.hessian.name) for s in request.stats if s.HasField("hessian")}
        if len(hessian_keys) > 1:
            raise ConfigError(f"linears {names} do not share one input Hessian; solve them separately")
        first = request.stats[0]
        hessian = (self._store.get_tensor(tensor_ref_from_proto(first.hessian)).to(self._device)
                   if hessian_keys else None)
        cross_keys = {(s.cross.key, s.cross.name) for s in request.stats if s.HasField("cross")}
        if cross_keys and (len(cross_keys) > 1 or len(cross_keys) != len(hessian_keys)
                           or not all(s.HasField("cross") for s in request.stats)):
            raise ConfigError(f"linears {names}: cross statistics must come with their one shared Hessian, "
                              "for every linear of the group")
        cross = self._store.get_tensor(tensor_ref_from_proto(first.cross)).to(self._device) if cross_keys else None
        label = ",".join(_full_name(request, n) for n in names)
        scheme = solve_grid(request)
        options = gptq_from_proto(request.gptq)
        outcomes = solve_group(weights, hessian, method=method_from_proto(request.method), scheme=scheme,
                               options=options, label=label,
                               input_absmax=first.input_absmax if first.HasField("hessian") else None,
                               cross=cross)
        solved = []
        for stats, weight, outcome in zip(request.stats, weights, outcomes, strict=True):
            name = stats.name
            full = _full_name(request, name)
            # One file per (linear, grid): a job's integer target and its GGUF mixes solve the same linear.
            grid = f".{request.ggml.type}" if request.HasField("ggml") else ""
            ref = self._store.put_quantized(
                job_key(request.job_id, f"block-{request.block}", f"{name}{grid}.quantized.safetensors"), full,
                outcome.weight, durable=False,
            )
            error, rtn_error, energy = self._errors(request, stats, weight, outcome, hessian, options)
            solved.append(solver_pb2.SolvedLinear(
                quantized=quantized_ref_to_proto(full, ref), error=error, rtn_error=rtn_error,
                damp_percent=outcome.damp_percent, weight_energy=energy,
            ))
        release_cached_memory(self._device)  # for the calibrator that may share the device
        extra: dict[str, object] = {"rpc": "Solve", "block": request.block, "device": str(self._device),
                                    "linears": names, "seconds": round(time.perf_counter() - started, 4)}
        if self._device.type == "cuda":
            extra["peak_gpu_bytes"] = peak_memory_bytes(self._device)
        log.info("solver call done", extra=extra)
        return solver_pb2.SolveResponse(solved=solved, usage=usage_to_proto(self._device))


def create_server(address: str, *, store_root: Path, device: str = AUTO) -> tuple[grpc.Server, int]:
    """Serve the solver, solving on `device` ("auto": CUDA when there is one)."""
    servicer = Solver(ArtifactStore(store_root), device=resolve_device(device))
    binding = ServiceBinding.of(servicer, solver_pb2, solver_pb2_grpc, "SolverService")
    return _create_server(address, [binding], component="solver")
