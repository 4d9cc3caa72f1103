"""Runs one job across the worker services: calibrate and solve block by block, pack, evaluate
every artifact, publish. The block loop is the library's (`bitsmith.pipeline.run_sequential`); this
module only gives it a backend whose steps are gRPC calls and whose handles are references into the
store. Every call is made inside the job's `JobRecorder`, so the job ends with its diagnostics (per
layer errors, held-out block errors, timeline, peak memory) in the job store and in each manifest.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from bitsmith.errors import BitsmithError, CancelledError, FormatError, GateFailedError
from bitsmith.rpc.convert import artifact_name, format_from_proto
from bitsmith.runtimes import ENGINES, HOME_TARGET, Target
from bitsmith.schemes import Method
from bitsmith.telemetry import current_trace_id, setup_tracing
from bitsmith.v1 import (
    calibrator_pb2,
    calibrator_pb2_grpc,
    common_pb2,
    job_pb2,
    packer_pb2,
    packer_pb2_grpc,
    runtime_pb2,
    runtime_pb2_grpc,
    solver_pb2,
    solver_pb2_grpc,
)
from bitsmith_services.coordinator.diagnostics import JobRecorder
from bitsmith_services.coordinator.jobstore import JobStore
from bitsmith_services.coordinator.placement import ServiceAddresses, Worker
from bitsmith_services.coordinator.retry import WorkerLink, retrying
from bitsmith_services.registry import RUNTIME_ROLES, Role

if TYPE_CHECKING:
    from bitsmith.pipeline import ProgressEvent
    from bitsmith.recipes import Assignment
    from bitsmith.schemes import QuantScheme, Scheme

log = logging.getLogger("bitsmith.coordinator")

STEP_TIMEOUT_S = 3600.0
"""Deadline of one block step; generous because a 70B block on a slow GPU is minutes, not hours."""


@dataclass(frozen=True, slots=True)
class SolverStub:
    """One solver replica: its stub, and where it runs (for leases, node labels and the timeline)."""

    worker: Worker
    stub: solver_pb2_grpc.SolverServiceStub


@dataclass
class Stubs:
    """gRPC stubs of every worker role (every solver replica), over channels the coordinator keeps open."""

    calibrator: calibrator_pb2_grpc.CalibratorServiceStub
    solvers: list[SolverStub]
    packer: packer_pb2_grpc.PackerServiceStub
    runtimes: dict[Role, runtime_pb2_grpc.RuntimeServiceStub]
    links: list[WorkerLink]

    @classmethod
    def connect(cls, addresses: ServiceAddresses, locate: Callable[[Role, int], str] | None = None) -> Stubs:
        """Stubs over one link per worker; a worker that went away is waited for, and looked up again
        through `locate` (the placement's current address of a role's replica), not given up on (see `retry`)."""
        def link(role: Role, stub: Callable[[grpc.Channel], Any], replica: int = 0, address: str = "") -> WorkerLink:
            return WorkerLink(role.value, address or addresses[role], stub,
                              (lambda: locate(role, replica)) if locate else None)

        links = {Role.CALIBRATOR: link(Role.CALIBRATOR, calibrator_pb2_grpc.CalibratorServiceStub),
                 Role.PACKER: link(Role.PACKER, packer_pb2_grpc.PackerServiceStub),
                 **{role: link(role, runtime_pb2_grpc.RuntimeServiceStub) for role in RUNTIME_ROLES.values()}}
        solvers = [link(Role.SOLVER, solver_pb2_grpc.SolverServiceStub, i, worker.address)
                   for i, worker in enumerate(addresses.solvers)]
        return cls(
            calibrator=retrying(links[Role.CALIBRATOR], calibrator_pb2_grpc.CalibratorServiceStub),
            solvers=[SolverStub(worker, retrying(solver, solver_pb2_grpc.SolverServiceStub))
                     for worker, solver in zip(addresses.solvers, solvers, strict=True)],
            packer=retrying(links[Role.PACKER], packer_pb2_grpc.PackerServiceStub),
            runtimes={role: retrying(links[role], runtime_pb2_grpc.RuntimeServiceStub)
                      for role in RUNTIME_ROLES.values()},
            links=[*links.values(), *solvers],
        )

    @staticmethod
    def runtime_role(fmt: int, *, fp8: bool) -> Role:
        """The runtime that proves an artifact of proto format `fmt`: its format's home target, except that
        an artifact holding FP8 linears (`fp8`) is proven on NVIDIA, whose engine alone applies FP8
        activations (its torch twins do so on a machine without a GPU)."""
        library_format = format_from_proto(fmt)
        if fp8 and library_format in ENGINES[Target.NVIDIA]:
            return RUNTIME_ROLES[Target.NVIDIA]
        return RUNTIME_ROLES[HOME_TARGET[library_format]]

    def close(self) -> None:
        for link in self.links:
            link.close()


class SolverPool:
    """The solver replicas leased to one job: each solve takes a free one, so as many solves run at once
    as the job holds replicas (the block loop's concurrency)."""

    def __init__(self, solvers: Sequence[SolverStub]) -> None:
        self._free: queue.SimpleQueue[SolverStub] = queue.SimpleQueue()
        for solver in solvers:
            self._free.put(solver)
        self.size = len(solvers)

    @contextmanager
    def take(self) -> Iterator[SolverStub]:
        solver = self._free.get()
        try:
            yield solver
        finally:
            self._free.put(solver)


class RpcBackend:
    """`bitsmith.pipeline.Backend` whose handles are TensorRef / LinearStats / QuantizedRef / NamedTensor
    messages; AWQ's scaled parameters travel as block-local NamedTensors. Solves may run on several
    threads at once (one per leased solver replica); the other steps run on the loop's thread.

    With `cross_statistics` (`Plan.cross_statistics`) the backend also carries the float model's stream:
    Start's inputs, advanced by each Advance beside the quantized stream and handed to every Collect, whose
    stats then bring cross statistics; only the primary target's solves receive them.
    """

    def __init__(self, stubs: Stubs, solvers: SolverPool, job_id: str, spec: job_pb2.QuantizeJob,
                 prefixes: Sequence[str], recorder: JobRecorder, primary_key: str, *,
                 cross_statistics: bool = False) -> None:
        self._stubs = stubs
        self._solvers = solvers
        self._job_id = job_id
        self._spec = spec
        self._prefixes = prefixes
        self._recorder = recorder
        self._primary_key = primary_key
        self._holdout = 0
        self._references: dict[int, dict[str, common_pb2.TensorRef]] = {}  # AWQ's pre-clipping weights by block
        self._cross_statistics = cross_statistics
        self._float_stream: common_pb2.TensorRef | None = None  # the float model's inputs to the current block

    def start(self) -> common_pb2.TensorRef:
        with self._recorder.call("calibrate", Role.CALIBRATOR, "Start"):
            reply = self._stubs.calibrator.Start(
                calibrator_pb2.StartRequest(job_id=self._job_id, model_path=self._spec.model_path,
                                            calibration=self._spec.calibration),
                timeout=STEP_TIMEOUT_S,
            )
        self._recorder.usage(Role.CALIBRATOR, reply.usage)
        self._holdout = reply.holdout
        if self._cross_statistics:
            self._float_stream = reply.inputs  # the embeddings: both streams start equal
        return reply.inputs

    def scale(self, bid: int, inputs: common_pb2.TensorRef, targets: Mapping[str, QuantScheme],
              clip: frozenset[str]) -> dict[str, common_pb2.NamedTensor]:
        from bitsmith.rpc.convert import scheme_to_proto

        recipe = self._spec.recipe
        request = calibrator_pb2.ScaleRequest(
            job_id=self._job_id, model_path=self._spec.model_path, block=bid, inputs=inputs,
            targets=[calibrator_pb2.ScaleTarget(name=n, scheme=scheme_to_proto(s), clip=n in clip)
                     for n, s in targets.items()],
            awq=recipe.awq, holdout=self._holdout,
        )
        if recipe.gptq.HasField("grid_search"):
            request.grid_search.CopyFrom(recipe.gptq.grid_search)
        with self._recorder.call("scale", Role.CALIBRATOR, "Scale", block=bid):
            reply = self._stubs.calibrator.Scale(request, timeout=STEP_TIMEOUT_S)
        self._recorder.usage(Role.CALIBRATOR, reply.usage)
        self._references[bid] = {t.name.removesuffix(".weight"): t.tensor for t in reply.references}
        return {t.name: t for t in reply.scaled}

    def collect(self, bid: int, names: Sequence[str], inputs: common_pb2.TensorRef | None,
                applied: Mapping[str, common_pb2.QuantizedRef], scaled: Mapping[str, common_pb2.NamedTensor],
                ) -> Sequence[common_pb2.LinearStats]:
        request = calibrator_pb2.CollectRequest(
            job_id=self._job_id, model_path=self._spec.model_path, block=bid, names=list(names),
            applied=list(applied.values()), scaled=list(scaled.values()), holdout=self._holdout,
        )
        if inputs is not None:
            request.inputs.CopyFrom(inputs)
            if self._float_stream is not None:
                request.reference.CopyFrom(self._float_stream)
        with self._recorder.call("calibrate", Role.CALIBRATOR, "Collect", block=bid):
            reply = self._stubs.calibrator.Collect(request, timeout=STEP_TIMEOUT_S)
        self._recorder.usage(Role.CALIBRATOR, reply.usage)
        return reply.stats

    def solve(self, bid: int, names: Sequence[str], assignment: Assignment,
              stats: Sequence[common_pb2.LinearStats], scaled: Mapping[str, common_pb2.NamedTensor], *,
              target: str = "") -> dict[str, common_pb2.QuantizedRef]:
        from bitsmith.rpc.convert import method_to_proto, set_solve_grid

        wanted = set(names)
        request = solver_pb2.SolveRequest(
            job_id=self._job_id, block=bid, prefix=self._prefixes[bid],
            stats=[s for s in stats if s.name in wanted], method=method_to_proto(assignment.method),
            gptq=self._spec.recipe.gptq, model_path=self._spec.model_path,
        )
        references = self._references.get(bid, {})
        for linear in request.stats:
            if linear.name in references:
                linear.reference.CopyFrom(references[linear.name])
            if target:  # an extra target's linears do not see the primary's quantized stream
                linear.ClearField("cross")
        set_solve_grid(request, assignment.scheme)
        with self._solvers.take() as solver, self._recorder.call("solve", Role.SOLVER, "Solve", block=bid,
                                                                 worker=solver.worker.address):
            reply = solver.stub.Solve(request, timeout=STEP_TIMEOUT_S)
        self._recorder.usage(Role.SOLVER, reply.usage)
        for solved in reply.solved:
            self._recorder.layer(_layer_diagnostics(solved, bid, target or self._primary_key, request.method,
                                                    assignment.scheme))
        prefix = self._prefixes[bid] + "."
        return {s.quantized.name.removeprefix(prefix): s.quantized for s in reply.solved}

    def advance(self, bid: int, inputs: common_pb2.TensorRef, applied: Mapping[str, common_pb2.QuantizedRef],
                scaled: Mapping[str, common_pb2.NamedTensor], *, float_outputs: bool) -> common_pb2.TensorRef:
        request = calibrator_pb2.AdvanceRequest(job_id=self._job_id, model_path=self._spec.model_path, block=bid,
                                                inputs=inputs, applied=list(applied.values()),
                                                scaled=list(scaled.values()), holdout=self._holdout,
                                                float_outputs=float_outputs)
        if self._float_stream is not None:
            request.reference.CopyFrom(self._float_stream)
        with self._recorder.call("calibrate", Role.CALIBRATOR, "Advance", block=bid):
            reply = self._stubs.calibrator.Advance(request, timeout=STEP_TIMEOUT_S)
        self._recorder.usage(Role.CALIBRATOR, reply.usage)
        if self._float_stream is not None:
            if not reply.HasField("reference_outputs"):
                raise FormatError(f"block {bid}: the calibrator did not advance the float model's stream "
                                  "(a calibrator without asymmetric calibration?)")
            self._float_stream = reply.reference_outputs
        if reply.HasField("output_error"):
            self._recorder.block(bid, reply.output_error, self._holdout)
        return reply.outputs

    def finish(self, bid: int, applied: Mapping[str, common_pb2.QuantizedRef],
               scaled: Mapping[str, common_pb2.NamedTensor], *, measure: bool) -> None:
        with self._recorder.call("calibrate", Role.CALIBRATOR, "Finish", block=bid):
            reply = self._stubs.calibrator.Finish(
                calibrator_pb2.FinishRequest(job_id=self._job_id, model_path=self._spec.model_path, block=bid,
                                             applied=list(applied.values()), scaled=list(scaled.values()),
                                             holdout=self._holdout, measure=measure),
                timeout=STEP_TIMEOUT_S,
            )
        self._recorder.usage(Role.CALIBRATOR, reply.usage)
        self._references.pop(bid, None)
        if reply.HasField("output_error"):
            self._recorder.block(bid, reply.output_error, self._holdout)


def _layer_diagnostics(solved: solver_pb2.SolvedLinear, block: int, target: str, method: int,
                       scheme: Scheme) -> common_pb2.LayerDiagnostics:
    """One solved linear as the report shows it (its grid's nominal bits, errors, size)."""
    quantized = solved.quantized
    if quantized.HasField("ggml"):
        out_features, in_features = quantized.blocks.shape[0], quantized.in_features
    elif quantized.HasField("fp8"):
        out_features, in_features = quantized.fp8_data.shape
    else:
        out_features, in_features = quantized.codes.shape
    return common_pb2.LayerDiagnostics(
        name=solved.quantized.name, block=block, target=target, method=method, grid=scheme.label,  # type: ignore[arg-type]
        bits_per_weight=scheme.bits_per_weight(in_features), parameters=in_features * out_features,
        error=solved.error, rtn_error=solved.rtn_error, weight_energy=solved.weight_energy,
        damp_percent=solved.damp_percent,
    )


def check_gate(gate: common_pb2.QualityGate,
               results: Sequence[tuple[str, Sequence[common_pb2.EvalResult]]]) -> None:
    """Raise GateFailedError naming every artifact, dataset and metric that missed the job's gate."""
    misses = []
    for artifact, r in ((name, r) for name, evaluated in results for r in evaluated):
        if gate.HasField("max_ppl_increase_pct") and r.HasField("reference_ppl"):
            increase = 100.0 * (r.ppl / r.reference_ppl - 1.0)
            if increase > gate.max_ppl_increase_pct:
                misses.append(f"{artifact} {r.dataset}: perplexity +{increase:.2f}% > {gate.max_ppl_increase_pct}%")
        if gate.HasField("max_kl") and r.HasField("kl") and r.kl > gate.max_kl:
            misses.append(f"{artifact} {r.dataset}: KL {r.kl:.5f} > {gate.max_kl}")
        if gate.HasField("min_top1") and r.HasField("top1") and r.top1 < gate.min_top1:
            misses.append(f"{artifact} {r.dataset}: top-1 {r.top1:.4f} < {gate.min_top1}")
    if misses:
        raise GateFailedError("quality gate failed: " + "; ".join(misses))


class JobRunner:
    """Executes one job to a terminal state, recording every step in the job store."""

    def __init__(self, jobs: JobStore, stubs: Stubs, job_id: str, cancelled: threading.Event,
                 solvers: Sequence[SolverStub]) -> None:
        self._jobs = jobs
        self._stubs = stubs
        self._job_id = job_id
        self._cancelled = cancelled
        self._solvers = solvers

    def _stop_requested(self) -> bool:
        return self._cancelled.is_set()

    def run(self) -> None:
        tracer = setup_tracing("bitsmith-coordinator").get_tracer("bitsmith.coordinator")
        with tracer.start_as_current_span("job", attributes={"bitsmith.job_id": self._job_id}):
            job = self._jobs.get(self._job_id)
            job.trace_id = current_trace_id()
            job.solvers[:] = [solver.worker.address for solver in self._solvers]
            self._jobs.update(job)
            self._jobs.transition(self._job_id, common_pb2.JOB_STATE_RUNNING, message="job started")
            state, error, message = common_pb2.JOB_STATE_SUCCEEDED, "", "artifacts published"
            recorder = JobRecorder()
            try:
                self._execute(job.spec, recorder)
            except CancelledError:
                state, message = common_pb2.JOB_STATE_CANCELLED, "cancelled; partial output removed"
            except BitsmithError as exc:
                state, error = common_pb2.JOB_STATE_FAILED, f"{type(exc).__name__}: {exc}"
            except grpc.RpcError as exc:
                state, error = common_pb2.JOB_STATE_FAILED, f"{exc.code().name}: {exc.details()}"
            except Exception as exc:
                log.exception("job %s crashed", self._job_id)
                state, error = common_pb2.JOB_STATE_FAILED, f"internal error: {type(exc).__name__}: {exc}"
            if state != common_pb2.JOB_STATE_SUCCEEDED:
                discard_outputs(self._stubs, job.spec)
            self._release_scratch()
            job = self._jobs.get(self._job_id)
            job.diagnostics.CopyFrom(recorder.diagnostics(job.trace_id))
            self._jobs.update(job)
            self._jobs.transition(self._job_id, state, error=error, message=message)

    def _release_scratch(self) -> None:
        try:
            self._stubs.calibrator.Release(calibrator_pb2.ReleaseRequest(job_id=self._job_id), timeout=60)
        except grpc.RpcError:
            log.warning("could not release the scratch tensors of job %s", self._job_id, exc_info=True)

    def _event(self, phase: str, message: str, *, block: int = -1, num_blocks: int = 0, step: int = 0,
               total: int = 0) -> None:
        self._jobs.append_event(self._job_id, phase=phase, message=message, block=block,
                                num_blocks=num_blocks, step=step, total_steps=total)

    def _check_cancel(self) -> None:
        if self._stop_requested():
            raise CancelledError(f"job {self._job_id} was cancelled")

    def _execute(self, spec: job_pb2.QuantizeJob, recorder: JobRecorder) -> None:
        from bitsmith.pipeline import Plan, QuantizedModel, run_sequential
        from bitsmith.rpc.convert import recipe_from_proto
        from bitsmith.targets import JobTargets, job_targets

        outputs = [(format_from_proto(f.format), f.variant or None) for f in spec.output.formats]
        recipe = recipe_from_proto(spec.recipe)
        targets = job_targets(recipe, outputs, Path(spec.model_path))
        with recorder.call("plan", Role.CALIBRATOR, "Plan"):
            model_plan = self._stubs.calibrator.Plan(calibrator_pb2.PlanRequest(model_path=spec.model_path),
                                                     timeout=600)
        plan = Plan(num_blocks=len(model_plan.blocks),
                    groups=[[list(g.names) for g in b.groups] for b in model_plan.blocks],
                    recipe=targets.primary or recipe, extra=targets.extra,
                    parallel=spec.calibration.mode == common_pb2.CALIBRATION_MODE_PARALLEL)
        prefixes = [b.prefix for b in model_plan.blocks]
        total = (plan.solve_steps if targets.recipes else 0) + len(spec.output.formats) * (
            2 if spec.eval.files else 1) + 1
        done = 0

        def on_event(event: ProgressEvent) -> None:
            nonlocal done
            if event.phase == "solve":
                done += 1
            self._event(event.phase, event.message, block=event.block, num_blocks=event.num_blocks,
                        step=done, total=total)

        solvers = SolverPool(self._solvers)
        backend = RpcBackend(self._stubs, solvers, self._job_id, spec, prefixes, recorder, targets.primary_key,
                             cross_statistics=plan.cross_statistics)
        result: QuantizedModel[common_pb2.QuantizedRef, common_pb2.NamedTensor] = (
            run_sequential(plan, backend, on_event=on_event, should_stop=self._stop_requested,
                           concurrency=solvers.size)
            if targets.recipes else QuantizedModel({}, {}))
        solved = {targets.primary_key: result.quantized, **result.extra}
        packed: list[tuple[str, common_pb2.Artifact]] = []
        for fmt, (library_format, variant) in zip(spec.output.formats, outputs, strict=True):
            self._check_cancel()
            key = JobTargets.key_of(library_format, variant)
            quantized = solved.get(key, {})
            with recorder.call("pack", Role.PACKER, "Pack"):
                reply = self._stubs.packer.Pack(
                    packer_pb2.PackRequest(job_id=self._job_id, model_path=spec.model_path,
                                           quantized=list(quantized.values()), format=fmt,
                                           out_path=_format_out(spec, fmt), recipe=spec.recipe,
                                           dense=[common_pb2.NamedTensor(name=name, tensor=t.tensor)
                                                  for name, t in result.dense.items()]),
                    timeout=STEP_TIMEOUT_S,
                )
            recorder.usage(Role.PACKER, reply.usage)
            reply.artifact.bits_per_weight = _bits_per_weight(recorder.layers_of(key))
            packed.append((reply.staging_path, reply.artifact))
            done += 1
            self._event("pack", f"packed {format_from_proto(fmt.format).value} ({reply.artifact.bytes} bytes)",
                        step=done, total=total)
        if spec.eval.files:
            for staged, artifact in packed:
                self._check_cancel()
                name = artifact_name(artifact)
                self._event("evaluate", f"evaluating the written {name} artifact", step=done, total=total)
                role = Stubs.runtime_role(artifact.format, fp8=Method.FP8 in recipe.methods)
                with recorder.call("evaluate", role, "Evaluate"):
                    evaluated = self._stubs.runtimes[role].Evaluate(
                        runtime_pb2.EvaluateRequest(artifact_path=staged, reference_model_path=spec.model_path,
                                                    data_files=list(spec.eval.files),
                                                    seq_len=spec.eval.seq_len or 512),
                        timeout=STEP_TIMEOUT_S,
                    )
                recorder.usage(role, evaluated.usage)
                artifact.metrics.extend(evaluated.results)
                done += 1
                self._event("evaluate", f"{name}: " + "; ".join(f"{Path(r.dataset).name}: ppl {r.ppl:.3f}"
                                                                 for r in evaluated.results), step=done, total=total)
            check_gate(spec.eval.gate, [(artifact_name(a), a.metrics) for _, a in packed])
        self._check_cancel()
        artifacts = []
        diagnostics = recorder.diagnostics(current_trace_id())
        for staging, artifact in packed:
            with recorder.call("publish", Role.PACKER, "Publish"):
                published = self._stubs.packer.Publish(
                    packer_pb2.PublishRequest(staging_path=staging, out_path=artifact.path, metrics=artifact.metrics,
                                              trace_id=current_trace_id(), diagnostics=diagnostics,
                                              bits_per_weight=artifact.bits_per_weight),
                    timeout=600,
                )
            # The manifest records the format; the job its variant, bits per weight and metrics.
            published.variant = artifact.variant
            published.bits_per_weight = artifact.bits_per_weight
            published.metrics.extend(artifact.metrics)
            artifacts.append(published)
        discard_outputs(self._stubs, spec)  # staging left by a Pack a restarted packer never finished
        done += 1
        self._event("publish", ", ".join(a.path for a in artifacts), step=done, total=total)
        job = self._jobs.get(self._job_id)
        job.artifacts.extend(artifacts)
        if artifacts:
            job.metrics.extend(artifacts[0].metrics)
        self._jobs.update(job)


def _bits_per_weight(layers: Sequence[common_pb2.LayerDiagnostics]) -> float:
    """Bits per weight over the quantized linears of one target, weighted by their size (0: none)."""
    parameters = sum(layer.parameters for layer in layers)
    return sum(layer.bits_per_weight * layer.parameters for layer in layers) / parameters if parameters else 0.0


def discard_outputs(stubs: Stubs, spec: job_pb2.QuantizeJob) -> None:
    """Remove every staging directory of the job's outputs (also ones a crash left mid-pack)."""
    for fmt in spec.output.formats:
        out = _format_out(spec, fmt)
        try:
            stubs.packer.Discard(packer_pb2.DiscardRequest(out_path=out), timeout=60)
        except grpc.RpcError:
            log.warning("could not discard the staging directories of %s", out, exc_info=True)


def _format_out(spec: job_pb2.QuantizeJob, fmt: common_pb2.OutputFormat) -> str:
    """One format writes to the output path itself; several write to one sub-directory each."""
    if len(spec.output.formats) == 1:
        return spec.output.path
    name = format_from_proto(fmt.format).value
    return f"{spec.output.path}/{name}{'-' + fmt.variant if fmt.variant else ''}"
