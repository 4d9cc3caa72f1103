"""What a job records about itself through the real services: per-layer errors for every target,
held-out block errors, the call timeline, peak memory, per-artifact quality, and the manifests that
carry it all to `bitsmith report`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from bitsmith.demo import CALIB_FILES, DEMO_MODEL, EVAL_FILES
from bitsmith.manifest import read_manifest
from bitsmith.report import ReportData, render_report
from bitsmith.v1 import common_pb2, job_pb2, job_pb2_grpc
from google.protobuf.json_format import MessageToDict

from tests.integration.conftest import Stack

LINEARS_PER_BLOCK = 7
BLOCKS = 4


@pytest.fixture(scope="module")
def jobs(stack: Stack) -> Iterator[job_pb2_grpc.JobServiceStub]:
    with grpc.insecure_channel(stack.address) as channel:
        yield job_pb2_grpc.JobServiceStub(channel)


def _run(jobs: job_pb2_grpc.JobServiceStub, out: Path, *, formats: list[common_pb2.OutputFormat],
         mode: int = common_pb2.CALIBRATION_MODE_SEQUENTIAL, holdout: int | None = 2, evaluate: bool = False,
         gate: common_pb2.QualityGate | None = None, method: int = common_pb2.METHOD_GPTQ) -> job_pb2.Job:
    calibration = common_pb2.CalibrationSpec(files=[str(f) for f in CALIB_FILES], samples=8, seq_len=128, mode=mode)
    if holdout is not None:
        calibration.holdout_samples = holdout
    spec = job_pb2.QuantizeJob(
        model_path=str(DEMO_MODEL),
        recipe=common_pb2.Recipe(method=method, scheme=common_pb2.QuantScheme(bits=4, group_size=128),  # type: ignore[arg-type]
                                 gptq=common_pb2.GPTQOptions(damp_percent=0.01, true_sequential=True),
                                 awq=common_pb2.AWQOptions(grid=10, duo_scaling=True, clip=True, clip_grid=10,
                                                           max_shrink=0.5, clip_tokens=256)),
        calibration=calibration,
        output=common_pb2.OutputSpec(path=str(out), formats=formats),
        eval=common_pb2.EvalSpec(files=[str(EVAL_FILES[0])] if evaluate else [], seq_len=256,
                                 gate=gate or common_pb2.QualityGate()),
    )
    job = jobs.Submit(job_pb2.SubmitRequest(job=spec), timeout=60)
    for _ in jobs.Watch(job_pb2.WatchJobRequest(job_id=job.job_id), timeout=900):
        pass
    return jobs.Get(job_pb2.GetJobRequest(job_id=job.job_id), timeout=60)


GPTQ_V2 = common_pb2.OutputFormat(format=common_pb2.FORMAT_GPTQ, variant="gptq_v2")
Q4_K_M = common_pb2.OutputFormat(format=common_pb2.FORMAT_GGUF, variant="Q4_K_M")


def test_every_layer_block_call_and_artifact_is_recorded(jobs: job_pb2_grpc.JobServiceStub, tmp_path: Path) -> None:
    job = _run(jobs, tmp_path / "out", formats=[GPTQ_V2, Q4_K_M])
    assert job.state == common_pb2.JOB_STATE_SUCCEEDED, job.error
    d = job.diagnostics

    by_target: dict[str, list[common_pb2.LayerDiagnostics]] = {}
    for layer in d.layers:
        by_target.setdefault(layer.target, []).append(layer)
    assert sorted(by_target) == ["", "gguf:Q4_K_M"]
    for target, layers in by_target.items():
        assert len({layer.name for layer in layers}) == len(layers) == BLOCKS * LINEARS_PER_BLOCK, target
        assert all(0 < layer.error < layer.weight_energy and layer.rtn_error > 0 for layer in layers)
        assert sum(layer.error for layer in layers) < 0.8 * sum(layer.rtn_error for layer in layers)
    integer = by_target[""]
    assert {(layer.grid, layer.bits_per_weight) for layer in integer} == {("w4 g128 asym", 4 + 20 / 128)}
    assert {layer.grid for layer in by_target["gguf:Q4_K_M"]} <= {"Q4_K", "Q6_K"}
    q = next(layer for layer in integer if layer.name == "model.layers.0.self_attn.q_proj")
    assert q.parameters == 256 * 256 and q.block == 0 and q.method == common_pb2.METHOD_GPTQ

    assert [(b.block, b.samples) for b in d.blocks] == [(i, 2) for i in range(BLOCKS)]
    assert all(0.0 < b.output_error < 1.0 for b in d.blocks)

    phases = {p.phase: p for p in d.phases}
    assert {"plan", "calibrate", "solve", "pack", "publish"} <= set(phases)
    # q/k/v, o, gate/up, down per block for each target; the mix splits a group whose types differ.
    assert phases["solve"].calls >= 2 * BLOCKS * 4
    for phase, total in phases.items():
        spans = [s for s in d.timeline if s.phase == phase]
        assert total.seconds == pytest.approx(sum(s.duration_s for s in spans)) and total.calls == len(spans)
    assert {s.service for s in d.timeline} == {"calibrator", "solver", "packer"}
    assert all(s.start_s >= 0 and s.duration_s >= 0 for s in d.timeline)
    assert 0 < d.timeline[-1].start_s + d.timeline[-1].duration_s <= d.wall_s
    usage = {s.service: s for s in d.services}
    assert usage["solver"].usage.device == "cpu" and usage["solver"].usage.peak_host_bytes > 100 << 20
    calibrating = [s.duration_s for s in d.timeline if s.service == "calibrator"]
    assert usage["calibrator"].busy_s == pytest.approx(sum(calibrating))

    gptq, gguf = job.artifacts
    assert gptq.bits_per_weight == pytest.approx(4 + 20 / 128)
    assert 4.5 < gguf.bits_per_weight < 6.6  # Q4_K with some Q6_K
    for artifact in job.artifacts:
        manifest = read_manifest(Path(artifact.path))
        assert manifest.bits_per_weight == pytest.approx(artifact.bits_per_weight)
        assert manifest.diagnostics["layers"] == MessageToDict(d, preserving_proto_field_name=True)["layers"]
        page = render_report(ReportData.from_artifact_dir(Path(artifact.path)))
        assert page.count('id="layer:') == 2 * BLOCKS * LINEARS_PER_BLOCK and page.count('id="block:') == BLOCKS


def test_awq_layers_are_measured_against_the_float_model_not_their_own_clipping(
        jobs: job_pb2_grpc.JobServiceStub, tmp_path: Path) -> None:
    job = _run(jobs, tmp_path / "out", formats=[common_pb2.OutputFormat(format=common_pb2.FORMAT_AWQ)],
               method=common_pb2.METHOD_AWQ)
    assert job.state == common_pb2.JOB_STATE_SUCCEEDED, job.error
    layers = job.diagnostics.layers
    assert len(layers) == BLOCKS * LINEARS_PER_BLOCK and all(layer.method == common_pb2.METHOD_AWQ for layer in layers)
    # RTN of AWQ's own (scaled, clipped) weight would equal its error; RTN of the checkpoint's does not.
    assert sum(layer.error != pytest.approx(layer.rtn_error) for layer in layers) >= len(layers) // 2
    assert sum(layer.error for layer in layers) < sum(layer.rtn_error for layer in layers)
    assert all(0 < layer.error < layer.weight_energy for layer in layers)


@pytest.mark.parametrize(("mode", "holdout", "blocks"), [
    (common_pb2.CALIBRATION_MODE_PARALLEL, None, BLOCKS),  # default: samples / 16, at least 1
    (common_pb2.CALIBRATION_MODE_SEQUENTIAL, 0, 0),
])
def test_held_out_samples_follow_the_request(jobs: job_pb2_grpc.JobServiceStub, tmp_path: Path, mode: int,
                                             holdout: int | None, blocks: int) -> None:
    job = _run(jobs, tmp_path / "out", formats=[GPTQ_V2], mode=mode, holdout=holdout)
    assert job.state == common_pb2.JOB_STATE_SUCCEEDED, job.error
    assert [(b.block, b.samples) for b in job.diagnostics.blocks] == [(i, 1) for i in range(blocks)]
    assert all(0.0 < b.output_error < 1.0 for b in job.diagnostics.blocks)


def test_a_negative_holdout_is_refused_at_submit(jobs: job_pb2_grpc.JobServiceStub, tmp_path: Path) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        _run(jobs, tmp_path / "out", formats=[GPTQ_V2], holdout=-1)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "holdout" in str(refused.value.details())
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_every_artifact_is_evaluated_and_gated(jobs: job_pb2_grpc.JobServiceStub, tmp_path: Path) -> None:
    job = _run(jobs, tmp_path / "out", formats=[GPTQ_V2, Q4_K_M], evaluate=True)
    assert job.state == common_pb2.JOB_STATE_SUCCEEDED, job.error
    gptq, gguf = job.artifacts
    for artifact in (gptq, gguf):
        (result,) = artifact.metrics
        assert result.dataset == str(EVAL_FILES[0]) and result.ppl > result.reference_ppl > 1
        assert read_manifest(Path(artifact.path)).metrics[str(EVAL_FILES[0])]["ppl"] == pytest.approx(result.ppl)
    assert gptq.metrics[0].ppl != gguf.metrics[0].ppl
    assert list(job.metrics) == list(gptq.metrics)
    assert {p.phase: p for p in job.diagnostics.phases}["evaluate"].calls == 2
    assert {s.service for s in job.diagnostics.timeline} >= {"runtime_cpu"}
    page = render_report(ReportData.from_job(job))
    assert 'id="artifact:gptq:' in page and 'id="artifact:gguf:Q4_K_M:' in page

    failed = _run(jobs, tmp_path / "gated", formats=[GPTQ_V2, Q4_K_M], evaluate=True,
                  gate=common_pb2.QualityGate(max_kl=1e-6))
    assert failed.state == common_pb2.JOB_STATE_FAILED
    assert "gptq " in failed.error and "gguf:Q4_K_M " in failed.error and "KL" in failed.error
    assert not list((tmp_path / "gated").glob("*/manifest.json"))
