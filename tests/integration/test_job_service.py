"""JobService end to end on real gRPC services: jobs, progress, idempotency, cancel, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import pytest
import torch
from bitsmith.demo import DEMO_MODEL
from bitsmith.errors import (
    AlreadyExistsError,
    BitsmithError,
    ConfigError,
    ServiceUnavailableError,
)
from bitsmith.manifest import verify_manifest
from bitsmith.recipes import ModuleOverride
from bitsmith.rpc import Client, JobState, QualityGate
from bitsmith.schemes import Format, Method, QuantScheme
from bitsmith_services.registry import Activations, Role, ServiceOptions
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from safetensors.torch import load_file, save_file

from .conftest import Stack, make_request, running_stack

SUCCEEDED = JobState.SUCCEEDED


def _copy_model(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, model)
    for f in model.iterdir():
        f.chmod(0o644)
    return model


def test_gptq_job_writes_a_verified_artifact_with_metrics(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "gptq"
    job = stack.client.submit(make_request(out, evaluate=True))
    events = list(job.watch())
    done = job.wait(check=False)

    assert done.state == SUCCEEDED, done.error
    sequences = [e.sequence for e in events]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    phases = [e.phase for e in events]
    assert phases[0] == "queued" and phases[-1] == "done"
    assert phases.count("solve") == 4 * 4  # 4 blocks x 4 true-sequential groups
    assert {e.block for e in events if e.phase == "solve"} == {0, 1, 2, 3}
    assert events[-1].step == events[-1].total_steps

    manifest = verify_manifest(out)
    (artifact,) = done.artifacts
    assert artifact.path == out and artifact.sha256 == manifest.digest
    assert artifact.bytes == sum(f.bytes for f in manifest.files)
    assert manifest.trace_id == done.trace_id != ""
    (metric,) = done.metrics
    assert metric.ppl > metric.reference_ppl > 1.0  # quantization costs a little
    assert 0.0 < metric.kl < 0.5 and 0.5 < metric.top1 <= 1.0
    assert manifest.metrics[metric.dataset]["ppl"] == pytest.approx(metric.ppl)
    assert not list(tmp_path.glob(".*partial*")), "no staging directory may remain"


def test_rtn_job_needs_no_calibration(stack: Stack, tmp_path: Path) -> None:
    done = stack.client.submit(make_request(tmp_path / "rtn", method=Method.RTN, calibrate=False)).wait(check=False)
    assert done.state == SUCCEEDED, done.error
    config = json.loads((tmp_path / "rtn" / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4


def test_submit_is_idempotent_on_client_request_id(stack: Stack, tmp_path: Path) -> None:
    request = make_request(tmp_path / "idem", method=Method.RTN, request_id="req-42")
    first = stack.client.submit(request)
    again = stack.client.submit(request)
    assert again.id == first.id
    first.wait()
    # Even after the output exists, the same request id answers with the same job.
    assert stack.client.submit(request).id == first.id
    assert sum(j.proto.spec.client_request_id == "req-42" for j in stack.client.jobs()) == 1


def test_cancel_stops_the_job_and_removes_partial_output(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "cancelled"
    job = stack.client.submit(make_request(out, samples=32, seq_len=256))
    for event in job.watch():
        if event.phase == "solve":
            job.cancel()
            break
    done = job.wait(check=False)
    assert done.state == JobState.CANCELLED
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))
    assert not (stack.home / "store" / "jobs" / job.id).exists(), "scratch tensors are removed"


def test_quality_gate_fails_the_job_with_numbers_and_writes_nothing(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "gated"
    request = make_request(out, method=Method.RTN, evaluate=True, gate=QualityGate(max_kl=1e-9))
    done = stack.client.submit(request).wait(check=False)
    assert done.state == JobState.FAILED and done.error is not None
    assert "quality gate failed" in done.error and "KL" in done.error
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize(
    ("mutate", "error", "needle"),
    [
        (lambda m, t: t.update(model_path=str(t["tmp"] / "missing")), BitsmithError, "missing"),
        (lambda m, t: t.update(group_size=96), ConfigError, "does not divide"),
        (lambda m, t: (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:5000]),
         ConfigError, "model.safetensors"),
        (lambda m, t: (m / "config.json").write_text(
            json.dumps({**json.loads((m / "config.json").read_text()), "model_type": "gpt_bigcode",
                        "architectures": ["GPTBigCodeForCausalLM"]})), BitsmithError, "gpt_bigcode"),
        (lambda m, t: _poison(m), ConfigError, "nan"),
        (lambda m, t: (t["tmp"] / "out").mkdir() or (t["tmp"] / "out" / "x").write_text("x"),
         AlreadyExistsError, "not an empty directory"),
    ],
    ids=["missing-model", "group-size", "truncated-safetensors", "unknown-architecture", "nan-weights",
         "output-not-empty"],
)
def test_bad_input_is_refused_at_submit_and_nothing_is_written(
        stack: Stack, tmp_path: Path, mutate, error: type[Exception], needle: str) -> None:
    model = _copy_model(tmp_path)
    fields: dict = {"tmp": tmp_path}
    mutate(model, fields)
    request = make_request(tmp_path / "out", model=Path(fields.get("model_path", model)),
                           group_size=fields.get("group_size", 128))
    before = len(stack.client.jobs(limit=1000))
    with pytest.raises(error) as info:
        stack.client.submit(request)
    assert needle.lower() in str(info.value).lower()
    assert len(stack.client.jobs(limit=1000)) == before, "a refused job is not recorded"
    out = tmp_path / "out"
    assert not out.exists() or [p.name for p in out.iterdir()] == ["x"]
    assert not list(tmp_path.glob(".*partial*"))


def _poison(model: Path) -> None:
    tensors = load_file(model / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][3, 5] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def test_invalid_recipes_are_refused_before_anything_runs(stack: Stack, tmp_path: Path) -> None:
    """The server checks recipes itself: a bad regex (which the SDK's dataclasses cannot even hold) goes
    in by hand on the wire."""
    bad_regex = make_request(tmp_path / "o").to_proto()
    bad_regex.recipe.overrides.add(pattern="mlp(", skip=True)
    skip_all = make_request(tmp_path / "o", overrides=(ModuleOverride(pattern=".", skip=True),)).to_proto()
    bad_group = make_request(tmp_path / "o", overrides=(
        ModuleOverride(pattern="down_proj", scheme=QuantScheme(bits=4, group_size=100)),)).to_proto()
    for spec, reason in [(bad_regex, "not a valid regex"), (skip_all, "nothing to quantize"),
                         (bad_group, r"layers\.0\.mlp\.down_proj: group_size 100 does not divide")]:
        with pytest.raises(ConfigError, match=reason):
            stack.client.calls.submit(spec)
    assert not (tmp_path / "o").exists()


def test_parallel_calibration_takes_statistics_from_the_float_model(stack: Stack, tmp_path: Path) -> None:
    """Parallel mode's statistics are all the float model's: block 0's q/k/v see the embeddings either way,
    but its down_proj sees the float MLP (not the quantized gate/up of true-sequential), and later blocks
    the float outputs of earlier ones. It equals the in-process loop given the float model's statistics."""
    from bitsmith.formats.gptq import read
    from bitsmith.pipeline import quantize_in_process
    from bitsmith.rpc.convert import recipe_from_proto

    codes = {}
    for mode in ("sequential", "parallel"):
        request = make_request(tmp_path / mode, mode=mode)
        done = stack.client.submit(request).wait()
        codes[mode] = read(done.artifacts[0].path).quantized
    sequential, parallel = codes["sequential"], codes["parallel"]
    assert torch.equal(sequential["model.layers.0.self_attn.q_proj"].codes,
                       parallel["model.layers.0.self_attn.q_proj"].codes)
    for changed in ("model.layers.0.mlp.down_proj", "model.layers.3.mlp.down_proj"):
        assert not torch.equal(sequential[changed].codes, parallel[changed].codes)
    calibration = request.calibration
    assert calibration is not None
    local = quantize_in_process(DEMO_MODEL, calib_files=calibration.files, samples=calibration.samples,
                                seq_len=calibration.seq_len, recipe=recipe_from_proto(request.to_proto().recipe),
                                parallel=True)
    for name, weight in parallel.items():
        assert torch.equal(weight.codes, local.quantized[name].codes), name


def test_asymmetric_calibration_through_the_services_is_the_in_process_solve(stack: Stack, tmp_path: Path) -> None:
    """With asymmetric calibration the calibrator runs the float model's stream beside the quantized one and
    hands the solver cross statistics: the codes equal the in-process loop's, and differ from the plain
    sequential job's where the streams have parted (not at block 0's q/k/v, which see the embeddings on
    both streams)."""
    from dataclasses import replace

    from bitsmith.formats.gptq import read
    from bitsmith.pipeline import quantize_in_process
    from bitsmith.rpc.convert import recipe_from_proto

    codes = {}
    for asymmetric in (False, True):
        request = make_request(tmp_path / str(asymmetric))
        request = replace(request, recipe=replace(request.recipe, gptq=replace(
            request.recipe.gptq, asymmetric_calibration=asymmetric)))
        done = stack.client.submit(request).wait()
        codes[asymmetric] = read(done.artifacts[0].path).quantized
        errors = [b.output_error for b in done.diagnostics.blocks]  # against the float model's, when asymmetric
        assert len(errors) == 4 and all(0 < e < 1 for e in errors), errors
    plain, asymmetric = codes[False], codes[True]
    assert torch.equal(plain["model.layers.0.self_attn.q_proj"].codes,
                       asymmetric["model.layers.0.self_attn.q_proj"].codes)
    for changed in ("model.layers.0.mlp.down_proj", "model.layers.3.self_attn.q_proj"):
        assert not torch.equal(plain[changed].codes, asymmetric[changed].codes), changed
    calibration = request.calibration
    assert calibration is not None
    local = quantize_in_process(DEMO_MODEL, calib_files=calibration.files, samples=calibration.samples,
                                seq_len=calibration.seq_len, recipe=recipe_from_proto(request.to_proto().recipe))
    for name, weight in asymmetric.items():
        assert torch.equal(weight.codes, local.quantized[name].codes), name


def test_unknown_job_is_not_found(stack: Stack) -> None:
    with pytest.raises(BitsmithError, match="NOT_FOUND"):
        stack.client.job("nope")


def test_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(ServiceUnavailableError, match=r"127\.0\.0\.1:9"):
        Client("127.0.0.1:9")


def test_every_service_serves_health_and_reflection(stack: Stack) -> None:
    names = {
        Role.CALIBRATOR: "bitsmith.v1.CalibratorService", Role.SOLVER: "bitsmith.v1.SolverService",
        Role.PACKER: "bitsmith.v1.PackerService", Role.RUNTIME_CPU: "bitsmith.v1.RuntimeService",
        Role.RUNTIME_APPLE: "bitsmith.v1.RuntimeService", Role.RUNTIME_NVIDIA: "bitsmith.v1.RuntimeService",
    }
    targets = [(addr, names[role]) for role, addr in stack.addresses.by_role.items()]
    targets.append((stack.address, "bitsmith.v1.JobService"))
    for address, service in targets:
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            reply = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
            listed = {s.name for s in reply.list_services_response.service}
            assert service in listed and "grpc.health.v1.Health" in listed


def test_deadline_exceeded_is_reported_as_such(stack: Stack) -> None:
    from bitsmith.v1 import calibrator_pb2, calibrator_pb2_grpc

    with grpc.insecure_channel(stack.addresses[Role.CALIBRATOR]) as channel:
        stub = calibrator_pb2_grpc.CalibratorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Start(calibrator_pb2.StartRequest(job_id="deadline", model_path=str(DEMO_MODEL),
                                                   calibration=make_request(Path("/nonexistent")).to_proto().calibration),
                       timeout=0.001)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_packer_refuses_to_touch_anything_but_staging(stack: Stack, tmp_path: Path) -> None:
    from bitsmith.v1 import packer_pb2, packer_pb2_grpc

    victim = tmp_path / "precious"
    victim.mkdir()
    with grpc.insecure_channel(stack.addresses[Role.PACKER]) as channel, pytest.raises(grpc.RpcError) as info:
        packer_pb2_grpc.PackerServiceStub(channel).Discard(packer_pb2.DiscardRequest(staging_path=str(victim)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert victim.exists()


def test_one_job_writes_several_formats_from_one_solve(stack: Stack, tmp_path: Path) -> None:
    from bitsmith.formats import get_format

    out = tmp_path / "multi"
    request = make_request(out, method=Method.RTN, group_size=64, checkpoint_format="gptq_v2",
                           formats=("gptq", "onnx", "mlx"))
    done = stack.client.submit(request).wait()
    paths = {a.format: a.path for a in done.artifacts}
    assert paths == {Format.GPTQ: out / "gptq-gptq_v2", Format.ONNX: out / "onnx", Format.MLX: out / "mlx"}
    codes = {}
    for fmt, path in paths.items():
        verify_manifest(path)
        checkpoint = get_format(fmt).read(path)
        weights = checkpoint.quantized_weights() if fmt is Format.MLX else checkpoint.quantized
        codes[fmt] = weights["model.layers.2.mlp.down_proj"].codes
    assert all(c.equal(codes[Format.GPTQ]) for c in codes.values()), "every format carries the same codes"


def test_mixed_precision_recipe_reads_back_identically_from_gptq_and_compressed_tensors(
    stack: Stack, tmp_path: Path
) -> None:
    """Attention at 8 bits, MLP at 4, one linear kept in float: both formats carry it, with the same codes
    and zeros, and read back to the same weights up to the scale dtype each format stores (GPTQ: fp16, as
    the format requires; compressed-tensors: the model's bf16, as llm-compressor writes)."""
    from bitsmith.formats import get_format

    out = tmp_path / "mixed"
    overrides = (ModuleOverride(pattern=r"layers\.1\.mlp\.down_proj", skip=True),
                 ModuleOverride(pattern=r"self_attn\.", scheme=QuantScheme(bits=8, group_size=128)))
    request = make_request(out, overrides=overrides, checkpoint_format="gptq_v2",
                           formats=("gptq", "compressed-tensors"))
    done = stack.client.submit(request).wait()
    dense, quantized = {}, {}
    for artifact in done.artifacts:
        fmt = artifact.format
        verify_manifest(artifact.path)
        checkpoint = get_format(fmt).read(artifact.path)
        bits = {name: qw.scheme.bits for name, qw in checkpoint.quantized.items()}
        assert bits["model.layers.0.self_attn.k_proj"] == 8 and bits["model.layers.0.mlp.down_proj"] == 4
        assert "model.layers.1.mlp.down_proj" not in bits and len(bits) == 27
        dense[fmt], quantized[fmt] = checkpoint.dense_state_dict(), checkpoint.quantized
    for name, qw in quantized[Format.GPTQ].items():
        other = quantized[Format.COMPRESSED_TENSORS][name]
        assert qw.scheme == other.scheme and torch.equal(qw.codes, other.codes), name
        assert torch.equal(qw.zeros, other.zeros) and torch.equal(qw.g_idx.long(), other.g_idx.long()), name
        torch.testing.assert_close(qw.scales, other.scales, rtol=2**-8, atol=0)
    gptq, ct = dense[Format.GPTQ], dense[Format.COMPRESSED_TENSORS]
    assert gptq.keys() == ct.keys()
    for name in gptq:
        torch.testing.assert_close(gptq[name], ct[name], rtol=2**-8, atol=0, msg=name)


def test_gptq_and_two_gguf_mixes_share_one_calibration(stack: Stack, tmp_path: Path) -> None:
    """GPTQ beside gguf:Q4_K_M and gguf:Q8_0: one capture per input group serves all three solves, the
    GPTQ artifact is the one a GPTQ-only job writes, and each GGUF file carries its mix's tensor types."""
    import gguf
    from bitsmith.formats import get_format

    alone = make_request(tmp_path / "alone", checkpoint_format="gptq_v2")
    request = make_request(tmp_path / "mixed", checkpoint_format="gptq_v2",
                           formats=("gptq", "gguf:Q4_K_M", "gguf:Q8_0"))
    job = stack.client.submit(request)
    events = list(job.watch())
    done = job.wait()
    assert [e.phase for e in events].count("calibrate") == 4 * 4  # as many captures as GPTQ alone
    assert events[-1].step == events[-1].total_steps
    reference = stack.client.submit(alone).wait()

    paths = {(a.format, a.variant): a.path for a in done.artifacts}
    gptq_dir = paths[(Format.GPTQ, "gptq_v2")]
    ours = {f.path: f.sha256 for f in verify_manifest(gptq_dir).files if f.path.endswith(".safetensors")}
    theirs = {f.path: f.sha256 for f in verify_manifest(reference.artifacts[0].path).files
              if f.path.endswith(".safetensors")}
    assert ours == theirs, "extra targets never change what the primary target solves"

    source = load_file(str(DEMO_MODEL / "model.safetensors"))
    for variant, expected in (("Q4_K_M", {"blk.0.attn_q.weight": "Q4_K", "blk.2.attn_v.weight": "Q6_K",
                                          "blk.3.ffn_down.weight": "Q6_K", "blk.0.ffn_down.weight": "Q4_K",
                                          "token_embd.weight": "Q6_K", "blk.1.attn_norm.weight": "F32"}),
                              ("Q8_0", {"blk.0.attn_q.weight": "Q8_0", "blk.3.ffn_down.weight": "Q8_0"})):
        path = paths[(Format.GGUF, variant)]
        verify_manifest(path)
        (file,) = path.glob("*.gguf")
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(file).tensors}
        assert {name: types[name] for name in expected} == expected, variant
        dense = get_format(Format.GGUF).read(path).dense_state_dict()
        name = "model.layers.1.mlp.up_proj.weight"
        error = (dense[name] - source[name].float()).norm() / source[name].float().norm()
        assert 0 < error < (0.01 if variant == "Q8_0" else 0.1), (variant, float(error))


def test_a_bfloat16_calibrator_runs_the_job_to_the_float32_ones_quality(stack: Stack, tmp_path: Path) -> None:
    """A calibrator run with `--matmul-precision bfloat16` (block forwards in bfloat16, activations kept in
    bfloat16 in host memory) serves a sequential job with asymmetric calibration to the end, and its artifact
    scores within 1% of the float32 calibrator's perplexity on the same request."""
    from dataclasses import replace

    from bitsmith.devices import MatmulPrecision

    options = ServiceOptions(activations=Activations.HOST, matmul_precision=MatmulPrecision.BFLOAT16)
    stacks = running_stack(tmp_path / "bf16-stack", calibrator=options)
    bf16 = next(stacks)
    try:
        metrics = []
        for name, where in (("float32", stack), ("bfloat16", bf16)):
            request = make_request(tmp_path / name, evaluate=True)
            request = replace(request, recipe=replace(request.recipe, gptq=replace(
                request.recipe.gptq, asymmetric_calibration=True)))
            done = where.client.submit(request).wait()
            assert all(0 < b.output_error < 1 for b in done.diagnostics.blocks)
            (metric,) = done.metrics
            metrics.append(metric.ppl)
    finally:
        stacks.close()
    assert metrics[1] == pytest.approx(metrics[0], rel=1e-2)
    assert metrics[1] != metrics[0]  # the bfloat16 forwards did run
