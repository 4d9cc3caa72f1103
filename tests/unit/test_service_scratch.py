"""What the calibrator and the solver put in the store: a group's Hessian only (the solver reads the
checkpoint's weights itself), dropped once the block advances; solved weights read once per block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bitsmith.demo import CALIB_FILES, DEMO_MODEL
from bitsmith.errors import ConfigError
from bitsmith.models import load_checkpoint
from bitsmith.pipeline import solve_group
from bitsmith.rpc.convert import (
    gptq_from_proto,
    method_from_proto,
    quantized_ref_from_proto,
    scheme_from_proto,
    tensor_ref_from_proto,
)
from bitsmith.store import ArtifactStore
from bitsmith.v1 import calibrator_pb2, common_pb2, solver_pb2
from bitsmith_services.calibrator.server import Calibrator
from bitsmith_services.registry import Activations
from bitsmith_services.solver.server import Solver

CPU = torch.device("cpu")


def test_collect_stores_only_the_hessian_the_solver_reads_the_checkpoint_and_finish_drops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ArtifactStore(tmp_path)
    calibrator = Calibrator(store, device=CPU, activations=Activations.HOST)
    solver = Solver(store, device=CPU)
    model_path = str(DEMO_MODEL)
    block = calibrator.Plan(calibrator_pb2.PlanRequest(model_path=model_path), None).blocks[0]  # type: ignore[arg-type]
    inputs = calibrator.Start(calibrator_pb2.StartRequest(
        job_id="j", model_path=model_path,
        calibration=common_pb2.CalibrationSpec(files=[str(f) for f in CALIB_FILES], samples=2, seq_len=32)),
        None).inputs  # type: ignore[arg-type]

    def collect(names: list[str], applied: list[common_pb2.QuantizedRef]) -> list[common_pb2.LinearStats]:
        return list(calibrator.Collect(calibrator_pb2.CollectRequest(
            job_id="j", model_path=model_path, block=0, names=names, inputs=inputs, applied=applied),
            None).stats)  # type: ignore[arg-type]

    qkv = list(block.groups[0].names)
    stats = collect(qkv, [])
    assert not any(s.HasField("weight") for s in stats)
    assert {s.hessian.key for s in stats} == {"jobs/j/stats/block-0/q_proj+k_proj+v_proj.safetensors"}
    request = solver_pb2.SolveRequest(
        job_id="j", block=0, prefix=block.prefix, stats=stats, method=common_pb2.METHOD_GPTQ,
        scheme=common_pb2.QuantScheme(bits=4, group_size=128, sym=False),
        gptq=common_pb2.GPTQOptions(damp_percent=0.01), model_path=model_path)
    solved = solver.Solve(request, None).solved  # type: ignore[arg-type]

    model = load_checkpoint(DEMO_MODEL)
    expected = solve_group([model.linear_weight(0, n) for n in qkv], store.get_tensor(tensor_ref_from_proto(
        stats[0].hessian)), method=method_from_proto(request.method), scheme=scheme_from_proto(request.scheme),
        options=gptq_from_proto(request.gptq), label="qkv")
    for msg, want in zip(solved, expected, strict=True):
        got = store.get_quantized(quantized_ref_from_proto(msg.quantized))
        assert torch.equal(got.codes, want.weight.codes)  # type: ignore[union-attr]

    reads: list[object] = []
    real = store.get_quantized
    monkeypatch.setattr(store, "get_quantized", lambda ref: (reads.append(ref), real(ref))[1])
    applied = [s.quantized for s in solved]
    collect(list(block.groups[1].names), applied)
    calibrator.Advance(calibrator_pb2.AdvanceRequest(job_id="j", model_path=model_path, block=0, inputs=inputs,
                                                     applied=applied), None)  # type: ignore[arg-type]
    assert len(reads) == len(applied)  # read and verified once, then kept for the block's later steps
    assert store.resolve("jobs/j/stats/block-0").exists()  # solves of other targets may still read them
    calibrator.Finish(calibrator_pb2.FinishRequest(job_id="j", model_path=model_path, block=0),
                      None)  # type: ignore[arg-type]
    assert not store.resolve("jobs/j/stats/block-0").exists()
    assert all(store.resolve(s.quantized.codes.key).is_file() for s in solved)

    request.ClearField("model_path")
    with pytest.raises(ConfigError, match="names no checkpoint"):
        solver.Solve(request, None)  # type: ignore[arg-type]

