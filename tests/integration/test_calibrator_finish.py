"""Advance and Finish split the end of a block: Advance moves on and keeps the block's statistics (solves
of the block may still read them); Finish drops them and, in parallel mode, measures the block's output
error on the held-out rows Advance kept. Through real calibrator and solver services, with the
activations in the store and in the calibrator's memory."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from bitsmith.calib import forward_block
from bitsmith.calib.data import calibration_and_holdout_tokens
from bitsmith.calib.stats import relative_output_error
from bitsmith.demo import CALIB_FILES, DEMO_MODEL
from bitsmith.models import CheckpointModel, load_checkpoint
from bitsmith.rpc.convert import quantized_ref_from_proto
from bitsmith.store import ArtifactStore
from bitsmith.v1 import calibrator_pb2, calibrator_pb2_grpc, common_pb2, solver_pb2, solver_pb2_grpc
from bitsmith_services.registry import Activations, Role, ServiceOptions, start_service

SAMPLES, SEQ_LEN, HOLDOUT = 4, 32, 2
MODEL = str(DEMO_MODEL)
_jobs = itertools.count()


@dataclass
class Services:
    calibrator: calibrator_pb2_grpc.CalibratorServiceStub
    solver: solver_pb2_grpc.SolverServiceStub
    store: ArtifactStore


@pytest.fixture(scope="module", params=list(Activations), ids=lambda a: a.value)
def services(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    root = tmp_path_factory.mktemp("store")
    calibrator, calibrator_port = start_service(Role.CALIBRATOR, "127.0.0.1:0", root,
                                                options=ServiceOptions(activations=request.param))
    solver, solver_port = start_service(Role.SOLVER, "127.0.0.1:0", root)
    with (grpc.insecure_channel(f"127.0.0.1:{calibrator_port}") as calibrator_channel,
          grpc.insecure_channel(f"127.0.0.1:{solver_port}") as solver_channel):
        yield Services(calibrator=calibrator_pb2_grpc.CalibratorServiceStub(calibrator_channel),
                       solver=solver_pb2_grpc.SolverServiceStub(solver_channel), store=ArtifactStore(root))
    calibrator.stop(grace=1).wait()
    solver.stop(grace=1).wait()


@pytest.fixture(scope="module")
def model() -> CheckpointModel:
    return load_checkpoint(DEMO_MODEL)


@dataclass
class Block0:
    """A job started, block 0 collected and solved (every linear): what Advance and Finish are given."""

    job_id: str
    inputs: common_pb2.TensorRef
    holdout: int
    solves: list[solver_pb2.SolveRequest]
    applied: list[common_pb2.QuantizedRef]


def _solve_block0(services: Services) -> Block0:
    job_id = f"finish-{next(_jobs)}"
    plan = services.calibrator.Plan(calibrator_pb2.PlanRequest(model_path=MODEL), timeout=120)
    started = services.calibrator.Start(calibrator_pb2.StartRequest(
        job_id=job_id, model_path=MODEL,
        calibration=common_pb2.CalibrationSpec(files=[str(f) for f in CALIB_FILES], samples=SAMPLES, seq_len=SEQ_LEN,
                                               holdout_samples=HOLDOUT)), timeout=120)
    assert started.holdout == HOLDOUT
    block = plan.blocks[0]
    solves, applied = [], []
    for group in block.groups:
        stats = services.calibrator.Collect(calibrator_pb2.CollectRequest(
            job_id=job_id, model_path=MODEL, block=0, names=list(group.names), inputs=started.inputs,
            holdout=started.holdout), timeout=120).stats
        solve = solver_pb2.SolveRequest(
            job_id=job_id, block=0, prefix=block.prefix, stats=stats, method=common_pb2.METHOD_GPTQ,
            scheme=common_pb2.QuantScheme(bits=4, group_size=128, sym=False),
            gptq=common_pb2.GPTQOptions(damp_percent=0.01), model_path=MODEL)
        solves.append(solve)
        applied += [s.quantized for s in services.solver.Solve(solve, timeout=120).solved]
    return Block0(job_id=job_id, inputs=started.inputs, holdout=started.holdout, solves=solves, applied=applied)


def _expected_error(services: Services, model: CheckpointModel, block: Block0) -> float:
    """The block's output error computed here from the model: the quantized block (the solved weights
    applied) against the float one, on the held-out samples."""
    tokens, held = calibration_and_holdout_tokens(DEMO_MODEL, CALIB_FILES, samples=SAMPLES, seq_len=SEQ_LEN,
                                                  holdout=HOLDOUT)
    rows = model.embed(torch.cat([tokens, held]))[-block.holdout:]
    local = {model.full_name(0, n): n for group in model.groups(0) for n in group}
    overrides = {f"{local[ref.name]}.weight": services.store.get_quantized(quantized_ref_from_proto(ref)).dequantize()
                 for ref in block.applied}
    assert len(overrides) == sum(len(g) for g in model.groups(0))
    return relative_output_error(rows, forward_block(model, 0, rows, overrides), forward_block(model, 0, rows, {}))


def _stats_dir(services: Services, job_id: str) -> Path:
    return services.store.resolve(f"jobs/{job_id}/stats/block-0")


def _advance(services: Services, block: Block0, *, float_outputs: bool) -> calibrator_pb2.AdvanceResponse:
    reply: calibrator_pb2.AdvanceResponse = services.calibrator.Advance(calibrator_pb2.AdvanceRequest(
        job_id=block.job_id, model_path=MODEL, block=0, inputs=block.inputs, applied=block.applied,
        holdout=block.holdout, float_outputs=float_outputs), timeout=120)
    return reply


def _finish(services: Services, block: Block0, *, measure: bool, holdout: int | None = None, index: int = 0
            ) -> calibrator_pb2.FinishResponse:
    reply: calibrator_pb2.FinishResponse = services.calibrator.Finish(calibrator_pb2.FinishRequest(
        job_id=block.job_id, model_path=MODEL, block=index, applied=block.applied,
        holdout=block.holdout if holdout is None else holdout, measure=measure), timeout=120)
    return reply


def _assert_stats_gone(services: Services, block: Block0) -> None:
    assert not _stats_dir(services, block.job_id).exists()
    with pytest.raises(grpc.RpcError) as failed:
        services.solver.Solve(block.solves[0], timeout=120)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert "does not exist" in (failed.value.details() or "")


def test_parallel_advance_keeps_the_stats_and_finish_measures_then_drops_them(
        services: Services, model: CheckpointModel) -> None:
    block = _solve_block0(services)
    advanced = _advance(services, block, float_outputs=True)
    assert not advanced.HasField("output_error")
    assert advanced.outputs.shape == [SAMPLES + HOLDOUT, SEQ_LEN, model.config.hidden_size]
    # The block's solves (another target's, say) still run on its statistics after Advance.
    assert services.solver.Solve(block.solves[0], timeout=120).solved
    assert _stats_dir(services, block.job_id).is_dir()

    finished = _finish(services, block, measure=True)
    expected = _expected_error(services, model, block)
    assert 0 < expected < 1
    assert finished.HasField("output_error")
    assert finished.output_error == pytest.approx(expected, rel=1e-6)
    _assert_stats_gone(services, block)
    # The kept rows went with it: measuring again finds none.
    with pytest.raises(grpc.RpcError) as again:
        _finish(services, block, measure=True)
    assert again.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no held-out rows" in (again.value.details() or "")
    assert not _finish(services, block, measure=False).HasField("output_error")  # finishing again is harmless

    # A sequential Advance of the same block with the same solved weights measures the same error.
    assert _advance(services, block, float_outputs=False).output_error == pytest.approx(expected, rel=1e-6)


def test_sequential_advance_measures_and_keeps_the_stats_until_finish(
        services: Services, model: CheckpointModel) -> None:
    block = _solve_block0(services)
    advanced = _advance(services, block, float_outputs=False)
    assert advanced.HasField("output_error")
    assert advanced.output_error == pytest.approx(_expected_error(services, model, block), rel=1e-6)
    assert services.solver.Solve(block.solves[0], timeout=120).solved
    assert _stats_dir(services, block.job_id).is_dir()
    assert not (_stats_dir(services, block.job_id) / "held-out").exists()  # nothing kept for Finish

    finished = _finish(services, block, measure=False)
    assert not finished.HasField("output_error")
    _assert_stats_gone(services, block)


def test_finish_without_kept_rows_is_refused_and_the_service_keeps_serving(services: Services) -> None:
    block = _solve_block0(services)
    # Block 1 was never advanced, so no rows were kept for it.
    with pytest.raises(grpc.RpcError) as failed:
        _finish(services, block, measure=True, index=1)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert "block 1" in (failed.value.details() or "") and "no held-out rows" in (failed.value.details() or "")
    # Nor for block 0 after a sequential Advance.
    _advance(services, block, float_outputs=False)
    with pytest.raises(grpc.RpcError) as sequential:
        _finish(services, block, measure=True)
    assert sequential.value.code() == grpc.StatusCode.NOT_FOUND
    assert _stats_dir(services, block.job_id).is_dir()  # a refused Finish drops nothing

    # Without held-out samples there is nothing to measure, and no error.
    assert not _finish(services, block, measure=True, holdout=0).HasField("output_error")
    _assert_stats_gone(services, block)
    assert len(services.calibrator.Plan(calibrator_pb2.PlanRequest(model_path=MODEL), timeout=120).blocks) == 4


def test_release_drops_the_kept_rows(services: Services) -> None:
    block = _solve_block0(services)
    _advance(services, block, float_outputs=True)
    services.calibrator.Release(calibrator_pb2.ReleaseRequest(job_id=block.job_id), timeout=120)
    with pytest.raises(grpc.RpcError) as failed:
        _finish(services, block, measure=True)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND


def test_collect_and_advance_log_where_their_seconds_went(services: Services, caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    """Each Collect and Advance logs its phases (fetching inputs, forward, storing what it made, and a
    sequential Advance its held-out output error): what tells a slow block's transfers from its compute on a
    GPU."""
    with caplog.at_level("INFO", logger="bitsmith.calibrator"):
        block = _solve_block0(services)
        _advance(services, block, float_outputs=False)
    calls = [r for r in caplog.records if r.getMessage() == "calibrator call done" and r.rpc in ("Collect", "Advance")]
    assert [r.rpc for r in calls] == ["Collect"] * 4 + ["Advance"]
    for record in calls:
        phases = record.phases
        assert set(phases) == {"inputs", "forward", "store"} | ({"error"} if record.rpc == "Advance" else set()), \
            record.rpc
        assert all(s >= 0 for s in phases.values())
        assert sum(phases.values()) <= record.seconds + 1e-3, (record.rpc, phases, record.seconds)
