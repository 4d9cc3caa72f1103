"""An FP8 job through the real services: static activation scales calibrated, one solve written as
compressed-tensors, ModelOpt and TensorRT-LLM, each proven on runtime_nvidia (its torch twins here) —
and runtime_nvidia's own Evaluate and Generate over gRPC."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from bitsmith.demo import CALIB_FILES, DEMO_MODEL, EVAL_FILES
from bitsmith.formats import get_format
from bitsmith.manifest import verify_manifest
from bitsmith.quantized import FP8Weight
from bitsmith.recipes import Recipe
from bitsmith.rpc import Calibration, Evaluation, JobState, OutputFormat, QuantizeRequest
from bitsmith.runtimes import Target, evaluate_path
from bitsmith.schemes import Format, FP8Scheme, Method
from bitsmith.v1 import runtime_pb2, runtime_pb2_grpc
from bitsmith_services.registry import Role

from .conftest import Stack


def test_an_fp8_job_writes_three_nvidia_formats_from_one_calibration_and_scores_them_on_runtime_nvidia(
        stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "fp8"
    request = QuantizeRequest(
        model=DEMO_MODEL, out=out, recipe=Recipe(method=Method.FP8, fp8=FP8Scheme(per_channel=False,
                                                                                 static_activations=True)),
        calibration=Calibration(files=CALIB_FILES, samples=8, seq_len=128),
        formats=tuple(OutputFormat.parse(f) for f in ("compressed-tensors", "modelopt", "trtllm")),
        evaluation=Evaluation(files=[EVAL_FILES[0]], seq_len=256),
    )
    job = stack.client.submit(request)
    done = job.wait(check=False)
    assert done.state == JobState.SUCCEEDED, done.error
    weights: dict[Format, dict[str, FP8Weight]] = {}
    for artifact in done.artifacts:
        verify_manifest(artifact.path)
        checkpoint = get_format(artifact.format).read(artifact.path)
        weights[artifact.format] = {n: w for n, w in checkpoint.quantized.items() if isinstance(w, FP8Weight)}
        assert len(weights[artifact.format]) == 28, artifact.format
        (metric,) = artifact.metrics
        assert metric.reference_ppl is not None and metric.kl is not None
        assert metric.ppl == pytest.approx(metric.reference_ppl, rel=0.03) and metric.kl < 0.01
    ct, modelopt = weights[Format.COMPRESSED_TENSORS], weights[Format.MODELOPT]
    for name, w in ct.items():
        assert w.input_scale is not None and modelopt[name].input_scale is not None, name
        assert torch.equal(w.data.view(torch.uint8), modelopt[name].data.view(torch.uint8)), name
        assert torch.equal(w.scale, modelopt[name].scale) and torch.equal(w.input_scale, modelopt[name].input_scale)
    evaluations = [s for s in done.diagnostics.timeline if s.phase == "evaluate"]
    assert {s.service for s in evaluations} == {Role.RUNTIME_NVIDIA.value}


def test_runtime_nvidia_serves_evaluate_and_generate(stack: Stack, tmp_path: Path) -> None:
    address = stack.addresses[Role.RUNTIME_NVIDIA]
    sample = tmp_path / "sample.txt"
    sample.write_text(EVAL_FILES[1].read_text(encoding="utf-8")[:3000], encoding="utf-8")
    with grpc.insecure_channel(address) as channel:
        stub = runtime_pb2_grpc.RuntimeServiceStub(channel)
        reply = stub.Evaluate(runtime_pb2.EvaluateRequest(artifact_path=str(DEMO_MODEL), data_files=[str(sample)],
                                                          seq_len=256), timeout=120)
        (result,) = reply.results
        assert result.ppl == pytest.approx(evaluate_path(DEMO_MODEL, [sample], seq_len=256,
                                                         target=Target.NVIDIA)[0].ppl, rel=1e-6)
        assert result.tokens_per_s > 0  # the engine timed itself
        chunks = list(stub.Generate(runtime_pb2.GenerateRequest(artifact_path=str(DEMO_MODEL), prompt="def main(",
                                                                max_new_tokens=8), timeout=120))
        assert "".join(c.text for c in chunks) and chunks[-1].HasField("stats")
        assert chunks[-1].stats.decode_tokens > 0 and chunks[-1].stats.decode_seconds > 0
        with pytest.raises(grpc.RpcError) as refused:
            stub.Evaluate(runtime_pb2.EvaluateRequest(artifact_path=str(tmp_path / "missing"),
                                                      data_files=[str(sample)]), timeout=60)
        assert refused.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


def test_the_cli_quantizes_to_fp8_and_scores_on_the_nvidia_target(stack: Stack, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from bitsmith_services.cli import main

    def run(*argv: str) -> int:
        capsys.readouterr()
        return main(list(argv))

    out = tmp_path / "modelopt"
    calib = [a for f in CALIB_FILES for a in ("--calib", str(f))]
    assert run("quantize", str(DEMO_MODEL), "--method", "fp8", "--fp8-static-activations", "--out", str(out),
               "--format", "modelopt", "--server", stack.address) != 0  # static scales need calibration text
    assert "fp8 static activations needs calibration" in capsys.readouterr().err.replace("\n", " ")
    assert run("quantize", str(DEMO_MODEL), "--method", "fp8", "--fp8-per-tensor", "--fp8-static-activations",
               *calib, "--samples", "8", "--seq-len", "64", "--format", "modelopt", "--out", str(out),
               "--server", stack.address, "--json") == 0
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())
    assert hf_quant["quantization"]["quant_algo"] == "FP8"
    assert run("eval", str(out), "--data", str(EVAL_FILES[1]), "--reference", str(DEMO_MODEL), "--seq-len", "256",
               "--target", "nvidia", "--json") == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["kl"] < 0.01 and scores["top1"] > 0.9
