"""CalibratorService over `bitsmith.models` and `bitsmith.calib`.

Stateless between calls: every request names the model and the store keys it works on, so any
replica can serve any block, and a restarted calibrator continues from the activations in the store.
Loaded checkpoints are cached per process (the skeleton only; block weights load per block).
The exception is `Activations.HOST`, which keeps a job's activations in this process (see
`activations`): the price of not writing the calibration set to the store once per block.

Blocks compute on the service's device; weights, Hessians and activations leave it for the host as
soon as a step is done, so the device holds one block and one chunk of activations at a time. After
every call the service logs the device's peak memory so far (`peak_gpu_bytes`).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from bitsmith.devices import AUTO, peak_memory_bytes, release_cached_memory, resolve_device
from bitsmith.errors import ConfigError
from bitsmith.rpc.convert import (
    awq_from_proto,
    format_from_proto,
    quantized_ref_from_proto,
    recipe_from_proto,
    scheme_from_proto,
    tensor_ref_from_proto,
    tensor_ref_to_proto,
)
from bitsmith.rpc.server import ServiceBinding
from bitsmith.rpc.server import create_server as _create_server
from bitsmith.store import ArtifactStore, job_key
from bitsmith.v1 import calibrator_pb2, calibrator_pb2_grpc, common_pb2
from bitsmith_services.calibrator.activations import HostActivations, StreamingDigest
from bitsmith_services.registry import Activations

if TYPE_CHECKING:
    import torch
    from bitsmith.models import CheckpointModel
    from bitsmith.quantized import GGMLWeight, QuantizedWeight
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

log = logging.getLogger("bitsmith.calibrator")


@functools.lru_cache(maxsize=2)
def _model(path: str, device: str) -> CheckpointModel:
    from bitsmith.models import load_checkpoint

    return load_checkpoint(Path(path), device=device)


def _on_device(weight: QuantizedWeight | GGMLWeight, device: torch.device) -> QuantizedWeight | GGMLWeight:
    """An integer-grid weight moved to `device`, so it dequantizes there (ggml blocks decode on the host)."""
    from bitsmith.quantized import QuantizedWeight

    if not isinstance(weight, QuantizedWeight) or device.type == "cpu":
        return weight
    return replace(weight, codes=weight.codes.to(device), scales=weight.scales.to(device),
                   zeros=weight.zeros.to(device), g_idx=weight.g_idx.to(device))


def _block_prefix(model: CheckpointModel, block: int) -> str:
    first = model.groups(block)[0][0]
    return model.full_name(block, first)[: -len(first) - 1]


class Calibrator(calibrator_pb2_grpc.CalibratorServiceServicer):
    def __init__(self, store: ArtifactStore, *, device: torch.device, activations: Activations = Activations.STORE
                 ) -> None:
        self._store = store
        self._device = device
        self._host = HostActivations() if activations is Activations.HOST else None

    def _model(self, path: str) -> CheckpointModel:
        return _model(path, str(self._device))

    def _report(self, rpc: str, request_block: int = -1) -> None:
        """Log the device's peak memory so far (what a GPU host must have for this model), and give the
        cached memory back for the solver that may share the device."""
        release_cached_memory(self._device)
        if self._device.type == "cuda":
            log.info("calibrator peak device memory", extra={"rpc": rpc, "block": request_block,
                                                              "device": str(self._device),
                                                              "peak_gpu_bytes": peak_memory_bytes(self._device)})

    def _inputs(self, job_id: str, ref: common_pb2.TensorRef) -> torch.Tensor:
        stored = tensor_ref_from_proto(ref)
        return self._store.get_tensor(stored) if self._host is None else self._host.get(job_id, stored, self._store)

    def _put_activations(self, job_id: str, name: str, tensor: torch.Tensor, sha256: str | None = None
                         ) -> common_pb2.TensorRef:
        key = job_key(job_id, name)
        if self._host is not None:
            return tensor_ref_to_proto(self._host.put(job_id, key, "hidden", tensor, sha256))
        return tensor_ref_to_proto(self._store.put_tensors(key, {"hidden": tensor})["hidden"])

    def _overrides(self, applied: RepeatedCompositeFieldContainer[common_pb2.QuantizedRef], block: int,
                   model: CheckpointModel, scaled: RepeatedCompositeFieldContainer[common_pb2.NamedTensor],
                   ) -> dict[str, torch.Tensor]:
        """AWQ's rescaled parameters, then the dense weights of the linears already quantized (from
        them) on top, keyed by block-local parameter name."""
        local = {model.full_name(block, n): n for group in model.groups(block) for n in group}
        overrides = self._scaled(scaled)
        for msg in applied:
            if msg.name not in local:
                raise ConfigError(f"{msg.name!r} is not a linear of block {block}")
            weight = _on_device(self._store.get_quantized(quantized_ref_from_proto(msg)), self._device).dequantize()
            overrides[f"{local[msg.name]}.weight"] = weight
        return overrides

    def _scaled(self, scaled: RepeatedCompositeFieldContainer[common_pb2.NamedTensor]) -> dict[str, torch.Tensor]:
        return {t.name: self._store.get_tensor(tensor_ref_from_proto(t.tensor)) for t in scaled}

    def Plan(self, request: calibrator_pb2.PlanRequest, context: grpc.ServicerContext
             ) -> calibrator_pb2.ModelPlan:
        from bitsmith.pipeline import check_recipe
        from bitsmith.targets import job_targets

        model = self._model(request.model_path)
        if request.HasField("recipe"):
            recipe = recipe_from_proto(request.recipe)
            outputs = [(format_from_proto(f.format), f.variant or None) for f in request.formats]
            for target in (job_targets(recipe, outputs, Path(request.model_path)).recipes.values()
                           if outputs else [recipe]):
                check_recipe(model, target)
        return calibrator_pb2.ModelPlan(
            architecture=str(model.config.model_type),
            blocks=[
                calibrator_pb2.BlockPlan(
                    prefix=_block_prefix(model, b),
                    groups=[calibrator_pb2.LinearGroup(names=g) for g in model.groups(b)],
                )
                for b in range(model.num_blocks)
            ],
        )

    def Start(self, request: calibrator_pb2.StartRequest, context: grpc.ServicerContext
              ) -> calibrator_pb2.StartResponse:
        from bitsmith.calib import calibration_tokens

        spec = request.calibration
        model = self._model(request.model_path)
        tokens = calibration_tokens(
            Path(request.model_path), [Path(f) for f in spec.files],
            samples=spec.samples, seq_len=spec.seq_len, seed=spec.seed,
        )
        hidden = model.embed(tokens)
        if self._host is not None and self._device.type == "cuda":
            hidden = hidden.pin_memory()
        return calibrator_pb2.StartResponse(inputs=self._put_activations(request.job_id, "inputs-0.safetensors",
                                                                         hidden))

    def Collect(self, request: calibrator_pb2.CollectRequest, context: grpc.ServicerContext
                ) -> calibrator_pb2.CollectResponse:
        from bitsmith.pipeline import collect_stats

        model = self._model(request.model_path)
        names = list(request.names)
        scaled = self._scaled(request.scaled)
        tensors = {f"{n}.weight": scaled[f"{n}.weight"] if f"{n}.weight" in scaled
                   else model.linear_weight(request.block, n, device="cpu") for n in names}
        hessians = {}
        if request.HasField("inputs"):
            inputs = self._inputs(request.job_id, request.inputs)
            overrides = self._overrides(request.applied, request.block, model, request.scaled)
            hessians = collect_stats(model, request.block, names, inputs, overrides)
        # Linears of one group share their input: store each distinct Hessian once.
        stored: dict[int, str] = {}
        for n, (h, _) in hessians.items():
            stored.setdefault(id(h), f"{n}.hessian")
            tensors[stored[id(h)]] = h
        group = "+".join(n.rsplit(".", 1)[-1] for n in names)
        refs = self._store.put_tensors(job_key(request.job_id, f"block-{request.block}", f"{group}.safetensors"),
                                       tensors)
        stats = []
        for n in names:
            msg = common_pb2.LinearStats(name=n, weight=tensor_ref_to_proto(refs[f"{n}.weight"]))
            if n in hessians:
                h, tokens = hessians[n]
                msg.hessian.CopyFrom(tensor_ref_to_proto(refs[stored[id(h)]]))
                msg.tokens = tokens
            stats.append(msg)
        self._report("Collect", request.block)
        return calibrator_pb2.CollectResponse(stats=stats)

    def Advance(self, request: calibrator_pb2.AdvanceRequest, context: grpc.ServicerContext
                ) -> calibrator_pb2.AdvanceResponse:
        from bitsmith.calib import forward_block

        model = self._model(request.model_path)
        inputs = self._inputs(request.job_id, request.inputs)
        overrides = self._overrides(request.applied, request.block, model, request.scaled)
        name = f"inputs-{request.block + 1}.safetensors"
        if self._host is None:
            hidden = forward_block(model, request.block, inputs, overrides)
            outputs = self._put_activations(request.job_id, name, hidden)
        else:
            digest = StreamingDigest()
            hidden = forward_block(model, request.block, inputs, overrides, on_chunk=digest.add)
            outputs = self._put_activations(request.job_id, name, hidden, digest.hexdigest())
        self._report("Advance", request.block)
        return calibrator_pb2.AdvanceResponse(outputs=outputs)

    def Scale(self, request: calibrator_pb2.ScaleRequest, context: grpc.ServicerContext
              ) -> calibrator_pb2.ScaleResponse:
        from bitsmith.algos.awq import awq_block
        from bitsmith.rpc.convert import grid_search_from_proto

        model = self._model(request.model_path)
        if not request.targets:
            raise ConfigError(f"block {request.block}: Scale names no target linears")
        inputs = self._inputs(request.job_id, request.inputs)
        transform = awq_block(
            model, request.block, inputs, {t.name: scheme_from_proto(t.scheme) for t in request.targets},
            awq_from_proto(request.awq),
            grid_search=grid_search_from_proto(request.grid_search) if request.HasField("grid_search") else None,
        )
        refs = self._store.put_tensors(job_key(request.job_id, f"block-{request.block}", "scaled.safetensors"),
                                       transform.tensors)
        return calibrator_pb2.ScaleResponse(
            scaled=[common_pb2.NamedTensor(name=name, tensor=tensor_ref_to_proto(ref)) for name, ref in refs.items()],
            report_json=json.dumps(transform.report.to_dict()),
        )


    def Release(self, request: calibrator_pb2.ReleaseRequest, context: grpc.ServicerContext
                ) -> calibrator_pb2.ReleaseResponse:
        if self._host is not None:
            self._host.release(request.job_id)
        self._store.delete_prefix(job_key(request.job_id))
        return calibrator_pb2.ReleaseResponse()


def create_server(address: str, *, store_root: Path, device: str = AUTO,
                  activations: Activations = Activations.STORE) -> tuple[grpc.Server, int]:
    """Serve the calibrator, computing on `device` ("auto": CUDA when there is one), keeping activations
    between blocks where `activations` says."""
    servicer = Calibrator(ArtifactStore(store_root), device=resolve_device(device), activations=activations)
    binding = ServiceBinding.of(servicer, calibrator_pb2, calibrator_pb2_grpc, "CalibratorService")
    return _create_server(address, [binding], component="calibrator")
