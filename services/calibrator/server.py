"""CalibratorService over `bitsmith.models` and `bitsmith.calib`.

Stateless between calls: every request names the model and the store keys it works on, so any
replica can serve any block, and a restarted calibrator continues from the activations in the store.
Loaded checkpoints are cached per process (the skeleton only; block weights load per block).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
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

if TYPE_CHECKING:
    import torch
    from bitsmith.models import CheckpointModel
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer


@functools.lru_cache(maxsize=2)
def _model(path: str) -> CheckpointModel:
    from bitsmith.models import load_checkpoint

    return load_checkpoint(Path(path))


def _block_prefix(model: CheckpointModel, block: int) -> str:
    first = model.groups(block)[0][0]
    return model.full_name(block, first)[: -len(first) - 1]


class Calibrator(calibrator_pb2_grpc.CalibratorServiceServicer):
    def __init__(self, store: ArtifactStore) -> None:
        self._store = store

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
            weight = self._store.get_quantized(quantized_ref_from_proto(msg)).dequantize()
            overrides[f"{local[msg.name]}.weight"] = weight
        return overrides

    def _scaled(self, scaled: RepeatedCompositeFieldContainer[common_pb2.NamedTensor]) -> dict[str, torch.Tensor]:
        return {t.name: self._store.get_tensor(tensor_ref_from_proto(t.tensor)) for t in scaled}

    def Plan(self, request: calibrator_pb2.PlanRequest, context: grpc.ServicerContext
             ) -> calibrator_pb2.ModelPlan:
        from bitsmith.pipeline import check_recipe
        from bitsmith.targets import job_targets

        model = _model(request.model_path)
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
        model = _model(request.model_path)
        tokens = calibration_tokens(
            Path(request.model_path), [Path(f) for f in spec.files],
            samples=spec.samples, seq_len=spec.seq_len, seed=spec.seed,
        )
        refs = self._store.put_tensors(job_key(request.job_id, "inputs-0.safetensors"),
                                       {"hidden": model.embed(tokens)})
        return calibrator_pb2.StartResponse(inputs=tensor_ref_to_proto(refs["hidden"]))

    def Collect(self, request: calibrator_pb2.CollectRequest, context: grpc.ServicerContext
                ) -> calibrator_pb2.CollectResponse:
        from bitsmith.pipeline import collect_stats

        model = _model(request.model_path)
        names = list(request.names)
        scaled = self._scaled(request.scaled)
        tensors = {f"{n}.weight": scaled[f"{n}.weight"] if f"{n}.weight" in scaled
                   else model.linear_weight(request.block, n) for n in names}
        hessians = {}
        if request.HasField("inputs"):
            inputs = self._store.get_tensor(tensor_ref_from_proto(request.inputs))
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
        return calibrator_pb2.CollectResponse(stats=stats)

    def Advance(self, request: calibrator_pb2.AdvanceRequest, context: grpc.ServicerContext
                ) -> calibrator_pb2.AdvanceResponse:
        from bitsmith.calib import forward_block

        model = _model(request.model_path)
        inputs = self._store.get_tensor(tensor_ref_from_proto(request.inputs))
        overrides = self._overrides(request.applied, request.block, model, request.scaled)
        outputs = forward_block(model, request.block, inputs, overrides)
        refs = self._store.put_tensors(
            job_key(request.job_id, f"inputs-{request.block + 1}.safetensors"), {"hidden": outputs}
        )
        return calibrator_pb2.AdvanceResponse(outputs=tensor_ref_to_proto(refs["hidden"]))

    def Scale(self, request: calibrator_pb2.ScaleRequest, context: grpc.ServicerContext
              ) -> calibrator_pb2.ScaleResponse:
        from bitsmith.algos.awq import awq_block
        from bitsmith.rpc.convert import grid_search_from_proto

        model = _model(request.model_path)
        if not request.targets:
            raise ConfigError(f"block {request.block}: Scale names no target linears")
        inputs = self._store.get_tensor(tensor_ref_from_proto(request.inputs))
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
        self._store.delete_prefix(job_key(request.job_id))
        return calibrator_pb2.ReleaseResponse()


def create_server(address: str, *, store_root: Path) -> tuple[grpc.Server, int]:
    servicer = Calibrator(ArtifactStore(store_root))
    binding = ServiceBinding.of(servicer, calibrator_pb2, calibrator_pb2_grpc, "CalibratorService")
    return _create_server(address, [binding], component="calibrator")
