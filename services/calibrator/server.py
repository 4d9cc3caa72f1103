"""CalibratorService over `bitsmith.models` and `bitsmith.calib`.

Stateless between calls: every request names the model and the store keys it works on, so any
replica can serve any block, and a restarted calibrator continues from the activations in the store.
Loaded checkpoints are cached per process (the skeleton only; block weights load per block).
The exceptions are `Activations.HOST` and `Activations.DEVICE`, which keep a job's activations in this
process (see `activations`): the price of not writing the calibration set to the store once per block.

Blocks compute on the service's device; Hessians leave it for the host as soon as a step is done, and so
do activations except with `Activations.DEVICE`, so the device holds one block and one chunk of
activations at a time (plus the block's solved weights, see `SolvedWeights`, and with `DEVICE` the
calibration set's current inputs and outputs). After every call the service logs the call's seconds
and the device's peak memory so far (`peak_gpu_bytes`).

Only what the solver cannot get elsewhere goes to the store: Collect writes a group's Hessian, not
its weights (the solver reads the checkpoint's own; AWQ's rescaled weights are already in the store).

Asymmetric calibration (`GPTQOptions.asymmetric_calibration`) runs the float model's stream beside the
quantized one: the coordinator hands each Collect and Advance the float model's inputs to the block
(`reference`) as well; Collect adds each input's cross statistics with them (stored beside its
Hessian), and Advance forwards them through the float block into the next block's (`reference_outputs`).

Advance and Finish split the end of a block, so the block loop can move on while solves of a block
still run: Advance computes the next block's inputs and keeps the block's statistics; Finish, once
every solve of the block is done, deletes its Hessians. In parallel mode (`float_outputs`) Advance
forwards the float block, which needs no solved weight, and keeps the block's held-out input rows (in
memory with `Activations.HOST` or `DEVICE`, else in the store beside the Hessians); Finish then measures the
block's output error on them with the solved weights applied, and drops them. In sequential mode
Advance has the solved weights anyway and measures the error itself.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from bitsmith.devices import (
    AUTO,
    MatmulPrecision,
    PhaseTimes,
    matmul_precision,
    peak_memory_bytes,
    release_cached_memory,
    resolve_device,
)
from bitsmith.errors import ConfigError, FormatError, NotFoundError
from bitsmith.rpc.convert import (
    awq_from_proto,
    format_from_proto,
    quantized_ref_from_proto,
    recipe_from_proto,
    scheme_from_proto,
    tensor_ref_from_proto,
    tensor_ref_to_proto,
    usage_to_proto,
)
from bitsmith.rpc.server import ServiceBinding
from bitsmith.rpc.server import create_server as _create_server
from bitsmith.store import ArtifactStore, StoredWeight, job_key
from bitsmith.v1 import calibrator_pb2, calibrator_pb2_grpc, common_pb2
from bitsmith_services.calibrator.activations import HeldActivations, fits_on_device
from bitsmith_services.registry import Activations

if TYPE_CHECKING:
    import torch
    from bitsmith.models import CheckpointModel
    from bitsmith.quantized import Quantized
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

log = logging.getLogger("bitsmith.calibrator")


_LOADING = threading.Lock()
"""Checkpoints load one at a time: concurrent first Plans (several Submits at once) would otherwise load
the same model twice and race on transformers' lazily imported names ("cannot import name AutoConfig")."""


R = TypeVar("R")


def _computes(method: Callable[[Calibrator, Any, grpc.ServicerContext], R]
              ) -> Callable[[Calibrator, Any, grpc.ServicerContext], R]:
    """Run a call that computes on the model, at the service's matmul precision, one at a time per
    calibrator (the precision is a process-wide torch setting). Jobs share the cached model,
    and a block's forward swaps the job's parameters in for its duration (`functional_call`) with the
    job's capture hooks on it: two jobs in the same block at once would see each other's weights."""
    @functools.wraps(method)
    def run(self: Calibrator, request: Any, context: grpc.ServicerContext) -> R:
        with self._computing, matmul_precision(self._device, self._precision):
            return method(self, request, context)

    return run


def _model(path: str, device: str, compute_dtype: torch.dtype) -> CheckpointModel:
    with _LOADING:
        return _cached_model(path, device, compute_dtype)


@functools.lru_cache(maxsize=2)
def _cached_model(path: str, device: str, compute_dtype: torch.dtype) -> CheckpointModel:
    from bitsmith.models import load_checkpoint

    return load_checkpoint(Path(path), device=device, compute_dtype=compute_dtype)


def _on_device(weight: Quantized, device: torch.device) -> Quantized:
    """An integer-grid weight moved to `device`, so it dequantizes there (ggml blocks decode on the host)."""
    from bitsmith.quantized import QuantizedWeight

    if not isinstance(weight, QuantizedWeight) or device.type == "cpu":
        return weight
    return replace(weight, codes=weight.codes.to(device), scales=weight.scales.to(device),
                   zeros=weight.zeros.to(device), g_idx=weight.g_idx.to(device))


def _stats_key(job_id: str, block: int, *parts: str) -> str:
    """Where a block's Hessians (and, in store mode, its kept held-out rows) live: apart from its solved
    weights, so Finish can drop them alone."""
    return job_key(job_id, "stats", f"block-{block}", *parts)


HELD_OUT_KEY = ("held-out", "inputs.safetensors")
"""Under a block's `_stats_key`: the held-out input rows a parallel-mode Advance keeps for Finish (a folder
of its own, so no group's Hessian file can take the name)."""


class SolvedWeights:
    """The solved weights of each job's current block, read and verified once, kept on the device.

    True-sequential calibration applies a block's solved linears in every later step of the block
    (q/k/v in three Collects and the Advance); reading and hashing them from the store each time cost
    as much as the steps' compute. A weight is kept under its full reference (which includes its
    sha256), so a hit is exactly the bytes verified at the first read; moving to another block of
    the job drops the previous block's.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, tuple[int, dict[StoredWeight, Quantized]]] = {}

    def get(self, job_id: str, block: int, ref: StoredWeight, store: ArtifactStore, device: torch.device
            ) -> Quantized:
        with self._lock:
            held_block, held = self._jobs.get(job_id, (block, {}))
            if held_block != block:
                held = {}
            self._jobs[job_id] = (block, held)
            weight = held.get(ref)
        if weight is None:
            weight = _on_device(store.get_quantized(ref), device)
            with self._lock:
                held[ref] = weight
        return weight

    def release(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)


def _calibration_rows(inputs: torch.Tensor, holdout: int) -> torch.Tensor:
    """The samples statistics and searches may see: all but the last `holdout` (held out)."""
    if not 0 <= holdout < len(inputs):
        raise ConfigError(f"holdout {holdout} leaves no calibration samples of {len(inputs)}")
    return inputs[: len(inputs) - holdout]


def _block_prefix(model: CheckpointModel, block: int) -> str:
    first = model.groups(block)[0][0]
    return model.full_name(block, first)[: -len(first) - 1]


class Calibrator(calibrator_pb2_grpc.CalibratorServiceServicer):
    def __init__(self, store: ArtifactStore, *, device: torch.device, activations: Activations = Activations.STORE,
                 matmul_precision: MatmulPrecision = MatmulPrecision.HIGH) -> None:
        self._store = store
        self._device = device
        self._precision = matmul_precision
        self._activations = activations
        self._held = HeldActivations() if activations is not Activations.STORE else None
        self._solved = SolvedWeights()
        self._computing = threading.Lock()

    def _model(self, path: str) -> CheckpointModel:
        return _model(path, str(self._device), self._precision.compute_dtype)

    def _report(self, rpc: str, started: float, request_block: int = -1, names: list[str] | None = None,
                times: PhaseTimes | None = None) -> None:
        """Log the call's seconds (and its phases': fetching inputs, forward, storing results) and the
        device's peak memory so far (what a GPU host must have for this model), and give the cached memory
        back for the solver that may share the device."""
        release_cached_memory(self._device)
        extra: dict[str, object] = {"rpc": rpc, "block": request_block, "device": str(self._device),
                                    "linears": names or [], "seconds": round(time.perf_counter() - started, 4)}
        if times is not None:
            extra["phases"] = times.seconds
        if self._device.type == "cuda":
            extra["peak_gpu_bytes"] = peak_memory_bytes(self._device)
        log.info("calibrator call done", extra=extra)

    def _inputs(self, job_id: str, ref: common_pb2.TensorRef) -> torch.Tensor:
        stored = tensor_ref_from_proto(ref)
        return self._store.get_tensor(stored) if self._held is None else self._held.get(job_id, stored, self._store)

    def _drop_older(self, job_id: str, ref: common_pb2.TensorRef) -> None:
        """An Advance has its inputs: the activations held from before them may go (no-op in the store)."""
        if self._held is not None:
            self._held.drop_older(job_id, tensor_ref_from_proto(ref))

    def _put_activations(self, job_id: str, name: str, tensor: torch.Tensor, *, stream: str = "inputs"
                         ) -> common_pb2.TensorRef:
        key = job_key(job_id, name)
        if self._held is not None:
            return tensor_ref_to_proto(self._held.put(job_id, key, "hidden", tensor, stream=stream))
        return tensor_ref_to_proto(self._store.put_tensors(key, {"hidden": tensor})["hidden"])

    def _overrides(self, job_id: str, applied: RepeatedCompositeFieldContainer[common_pb2.QuantizedRef],
                   block: int, model: CheckpointModel, scaled: Mapping[str, torch.Tensor], *, cache: bool = True
                   ) -> dict[str, torch.Tensor]:
        """AWQ's rescaled parameters (`scaled`, as `_scaled` read them), then the dense weights of the linears
        already quantized (from them) on top, keyed by block-local parameter name. `cache=False` reads the
        solved weights without keeping them (a finished block's: the job's current block keeps its own)."""
        local = {model.full_name(block, n): n for group in model.groups(block) for n in group}
        overrides = dict(scaled)
        for msg in applied:
            if msg.name not in local:
                raise ConfigError(f"{msg.name!r} is not a linear of block {block}")
            ref = quantized_ref_from_proto(msg)
            solved = (self._solved.get(job_id, block, ref, self._store, self._device) if cache
                      else _on_device(self._store.get_quantized(ref), self._device))
            overrides[f"{local[msg.name]}.weight"] = solved.dequantize()
        return overrides

    def _keep_held_out(self, job_id: str, block: int, rows: torch.Tensor) -> None:
        """Keep a block's held-out input rows until its Finish."""
        if self._held is not None:
            self._held.keep_held_out(job_id, block, rows)
        else:
            self._store.put_tensors(_stats_key(job_id, block, *HELD_OUT_KEY), {"hidden": rows}, durable=False)

    def _held_out(self, job_id: str, block: int) -> torch.Tensor | None:
        """The held-out input rows Advance kept for `block`; None when there are none."""
        if self._held is not None:
            return self._held.held_out(job_id, block)
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        key = _stats_key(job_id, block, *HELD_OUT_KEY)
        path = self._store.resolve(key)
        try:
            return load_file(str(path))["hidden"]
        except FileNotFoundError:
            return None
        except (SafetensorError, KeyError) as exc:
            raise FormatError(f"store key {key!r} holds no readable held-out rows: {exc}") from exc

    def _drop_held_out(self, job_id: str, block: int) -> None:
        if self._held is not None:
            self._held.drop_held_out(job_id, block)
        # In store mode the rows lie under the block's statistics prefix, which Finish deletes.

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

    @_computes
    def Start(self, request: calibrator_pb2.StartRequest, context: grpc.ServicerContext
              ) -> calibrator_pb2.StartResponse:
        import torch
        from bitsmith.calib.data import calibration_and_holdout_tokens, default_holdout

        spec = request.calibration
        model = self._model(request.model_path)
        started = time.perf_counter()
        tokens, held = calibration_and_holdout_tokens(
            Path(request.model_path), [Path(f) for f in spec.files], samples=spec.samples, seq_len=spec.seq_len,
            seed=spec.seed,
            holdout=spec.holdout_samples if spec.HasField("holdout_samples") else default_holdout(spec.samples),
        )
        hidden = model.embed(torch.cat([tokens, held]))
        if self._activations is Activations.DEVICE:
            hidden = fits_on_device(hidden, self._device)
        elif self._activations is Activations.HOST and self._device.type == "cuda":
            hidden = hidden.pin_memory()
        inputs = self._put_activations(request.job_id, "inputs-0.safetensors", hidden)
        self._report("Start", started)
        return calibrator_pb2.StartResponse(inputs=inputs, holdout=len(held), usage=usage_to_proto(self._device))

    @_computes
    def Collect(self, request: calibrator_pb2.CollectRequest, context: grpc.ServicerContext
                ) -> calibrator_pb2.CollectResponse:
        from bitsmith.pipeline import collect_stats

        started = time.perf_counter()
        times = PhaseTimes(self._device)
        model = self._model(request.model_path)
        names = list(request.names)
        scaled = {t.name: t.tensor for t in request.scaled}
        hessians = {}
        if request.HasField("inputs"):
            with times.phase("inputs"):
                inputs = _calibration_rows(self._inputs(request.job_id, request.inputs), request.holdout)
                awq = self._scaled(request.scaled)
                overrides = self._overrides(request.job_id, request.applied, request.block, model, awq)
                reference = None
                if request.HasField("reference"):  # asymmetric calibration: the float model's stream beside
                    reference = (_calibration_rows(self._inputs(request.job_id, request.reference), request.holdout),
                                 awq)
            with times.phase("forward"):
                hessians = collect_stats(model, request.block, names, inputs, overrides, reference)
        elif request.HasField("reference"):
            raise ConfigError(f"block {request.block}: a Collect without inputs has no stream to cross with "
                              "the float model's")
        # Linears of one group share their input: store each distinct Hessian (and cross statistics) once.
        stored: dict[int, str] = {}
        for n, captured in hessians.items():
            stored.setdefault(id(captured.hessian), n)
        tensors = {f"{stored[id(c.hessian)]}.{kind}": t for c in hessians.values()
                   for kind, t in (("hessian", c.hessian), ("cross", c.cross)) if t is not None}
        group = "+".join(n.rsplit(".", 1)[-1] for n in names)
        with times.phase("store"):
            refs = self._store.put_tensors(_stats_key(request.job_id, request.block, f"{group}.safetensors"),
                                           tensors, durable=False) if tensors else {}
        stats = []
        for n in names:
            msg = common_pb2.LinearStats(name=n)
            if f"{n}.weight" in scaled:  # AWQ's rescaled weight; unset: the solver reads the checkpoint's
                msg.weight.CopyFrom(scaled[f"{n}.weight"])
            if n in hessians:
                captured = hessians[n]
                owner = stored[id(captured.hessian)]
                msg.hessian.CopyFrom(tensor_ref_to_proto(refs[f"{owner}.hessian"]))
                if captured.cross is not None:
                    msg.cross.CopyFrom(tensor_ref_to_proto(refs[f"{owner}.cross"]))
                msg.tokens = captured.tokens
                msg.input_absmax = captured.absmax
            stats.append(msg)
        self._report("Collect", started, request.block, names, times)
        return calibrator_pb2.CollectResponse(stats=stats, usage=usage_to_proto(self._device))

    @_computes
    def Advance(self, request: calibrator_pb2.AdvanceRequest, context: grpc.ServicerContext
                ) -> calibrator_pb2.AdvanceResponse:
        from bitsmith.calib import forward_block
        from bitsmith.calib.stats import relative_output_error

        started = time.perf_counter()
        times = PhaseTimes(self._device)
        model = self._model(request.model_path)
        with times.phase("inputs"):
            inputs = self._inputs(request.job_id, request.inputs)
            self._drop_older(request.job_id, request.inputs)
        if not 0 <= request.holdout < len(inputs):
            raise ConfigError(f"block {request.block}: holdout {request.holdout} of {len(inputs)} samples")
        reply = calibrator_pb2.AdvanceResponse()
        tail = len(inputs) - request.holdout
        held = inputs[tail:]
        stream: tuple[torch.Tensor, torch.Tensor] | None = None  # the float model's inputs and outputs
        if request.HasField("reference") and request.float_outputs:
            raise ConfigError(f"block {request.block}: parallel mode advances the float model's stream "
                              "itself; a second one (asymmetric calibration) is for sequential mode")
        with times.phase("inputs"):  # AWQ's parameters: unused by parallel mode's float block
            awq = {} if request.float_outputs else self._scaled(request.scaled)
        if request.HasField("reference"):
            with times.phase("inputs"):
                float_inputs = self._inputs(request.job_id, request.reference)
                self._drop_older(request.job_id, request.reference)
            with times.phase("forward"):
                stream = float_inputs, forward_block(model, request.block, float_inputs, awq)
            with times.phase("store"):
                reply.reference_outputs.CopyFrom(self._put_activations(
                    request.job_id, f"reference-{request.block + 1}.safetensors", stream[1], stream="reference"))
        if request.float_outputs:
            # Parallel mode: the next block calibrates on the float block's outputs, which need no solve
            # of this block; the output error waits for Finish, on the held-out rows kept here.
            with times.phase("forward"):
                hidden = forward_block(model, request.block, inputs, {})
            if request.holdout:
                self._keep_held_out(request.job_id, request.block, held)
        else:
            # The quantized block's outputs, and its output error on the held-out rows: against the float
            # block on the same inputs or, with the float model's stream (asymmetric calibration, which
            # solves for it), against the float model's outputs, relative to what its float block adds.
            with times.phase("inputs"):
                overrides = self._overrides(request.job_id, request.applied, request.block, model, awq)
            with times.phase("forward"):
                hidden = forward_block(model, request.block, inputs, overrides)
            if request.holdout:
                with times.phase("error"):
                    start, end = stream if stream is not None else (held, forward_block(model, request.block, held, {}))
                    reply.output_error = relative_output_error(start[-request.holdout:], hidden[tail:],
                                                               end[-request.holdout:])
        with times.phase("store"):
            outputs = self._put_activations(request.job_id, f"inputs-{request.block + 1}.safetensors", hidden)
        reply.outputs.CopyFrom(outputs)
        self._report("Advance", started, request.block, times=times)
        reply.usage.CopyFrom(usage_to_proto(self._device))
        return reply

    @_computes
    def Finish(self, request: calibrator_pb2.FinishRequest, context: grpc.ServicerContext
               ) -> calibrator_pb2.FinishResponse:
        from bitsmith.calib import forward_block
        from bitsmith.calib.stats import relative_output_error

        started = time.perf_counter()
        if request.holdout < 0:
            raise ConfigError(f"block {request.block}: negative holdout {request.holdout}")
        reply = calibrator_pb2.FinishResponse()
        if request.measure and request.holdout:
            held = self._held_out(request.job_id, request.block)
            if held is None:
                raise NotFoundError(
                    f"block {request.block} of job {request.job_id!r} has no held-out rows to measure: no "
                    "parallel-mode Advance kept them, the block was finished already, or (activations in host "
                    "memory) this calibrator was restarted or another replica served the job")
            if len(held) != request.holdout:
                raise ConfigError(
                    f"block {request.block}: holdout {request.holdout}, but Advance kept {len(held)} rows")
            model = self._model(request.model_path)
            overrides = self._overrides(request.job_id, request.applied, request.block, model,
                                        self._scaled(request.scaled), cache=False)
            quantized = forward_block(model, request.block, held, overrides)
            reference = forward_block(model, request.block, held, {})
            reply.output_error = relative_output_error(held, quantized, reference)
        self._drop_held_out(request.job_id, request.block)
        self._store.delete_prefix(_stats_key(request.job_id, request.block))
        self._report("Finish", started, request.block)
        reply.usage.CopyFrom(usage_to_proto(self._device))
        return reply

    @_computes
    def Scale(self, request: calibrator_pb2.ScaleRequest, context: grpc.ServicerContext
              ) -> calibrator_pb2.ScaleResponse:
        from bitsmith.algos.awq import awq_block
        from bitsmith.rpc.convert import grid_search_from_proto

        model = self._model(request.model_path)
        if not request.targets:
            raise ConfigError(f"block {request.block}: Scale names no target linears")
        inputs = _calibration_rows(self._inputs(request.job_id, request.inputs), request.holdout)
        transform = awq_block(
            model, request.block, inputs, {t.name: scheme_from_proto(t.scheme) for t in request.targets},
            awq_from_proto(request.awq),
            grid_search=grid_search_from_proto(request.grid_search) if request.HasField("grid_search") else None,
            clip={t.name for t in request.targets if t.clip},
        )
        block = f"block-{request.block}"
        refs = self._store.put_tensors(job_key(request.job_id, block, "scaled.safetensors"), transform.tensors)
        references = (self._store.put_tensors(job_key(request.job_id, block, "references.safetensors"),
                                              transform.references) if transform.references else {})
        return calibrator_pb2.ScaleResponse(
            scaled=[common_pb2.NamedTensor(name=name, tensor=tensor_ref_to_proto(ref)) for name, ref in refs.items()],
            references=[common_pb2.NamedTensor(name=name, tensor=tensor_ref_to_proto(ref))
                        for name, ref in references.items()],
            report_json=json.dumps(transform.report.to_dict()), usage=usage_to_proto(self._device),
        )


    def Release(self, request: calibrator_pb2.ReleaseRequest, context: grpc.ServicerContext
                ) -> calibrator_pb2.ReleaseResponse:
        if self._held is not None:
            self._held.release(request.job_id)
        self._solved.release(request.job_id)
        self._store.delete_prefix(job_key(request.job_id))
        return calibrator_pb2.ReleaseResponse()


def create_server(address: str, *, store_root: Path, device: str = AUTO,
                  activations: Activations = Activations.STORE,
                  matmul_precision: MatmulPrecision = MatmulPrecision.HIGH) -> tuple[grpc.Server, int]:
    """Serve the calibrator, computing on `device` ("auto": CUDA when there is one) at `matmul_precision`,
    keeping activations between blocks where `activations` says. It imports the model code first, so a
    job's first Plan does not wait for it."""
    from bitsmith.models import preload

    preload()
    servicer = Calibrator(ArtifactStore(store_root), device=resolve_device(device), activations=activations,
                          matmul_precision=matmul_precision)
    binding = ServiceBinding.of(servicer, calibrator_pb2, calibrator_pb2_grpc, "CalibratorService")
    return _create_server(address, [binding], component="calibrator")
