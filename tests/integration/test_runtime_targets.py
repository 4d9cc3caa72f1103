"""The runtime targets over real gRPC: runtime_cpu runs ONNX through ONNX Runtime, runtime_apple runs
MLX through mlx; each refuses the other's format with FAILED_PRECONDITION."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from bitsmith.demo import CALIB_FILES, DEMO_MODEL, EVAL_FILES
from bitsmith.formats import get_format
from bitsmith.manifest import build_artifact
from bitsmith.pipeline import quantize_in_process
from bitsmith.recipes import Recipe
from bitsmith.runtimes import evaluate_path
from bitsmith.schemes import Format, GPTQOptions, Method, QuantScheme
from bitsmith.v1 import runtime_pb2, runtime_pb2_grpc
from bitsmith_services.registry import Role, start_service

pytest.importorskip("onnxruntime")
pytest.importorskip("mlx_lm")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[Format, Path]:
    root = tmp_path_factory.mktemp("targets")
    quantized = quantize_in_process(DEMO_MODEL, calib_files=CALIB_FILES, samples=1, seq_len=16,
                                    recipe=Recipe(scheme=QuantScheme(bits=4, group_size=64), method=Method.RTN),
                                    ).quantized
    out = {}
    for fmt in (Format.ONNX, Format.MLX):
        writer = get_format(fmt).write
        build_artifact(root / fmt.value, lambda d, w=writer: w(d, source_model_dir=DEMO_MODEL, quantized=quantized,
                                                               options=GPTQOptions()), format=fmt, recipe={})
        out[fmt] = root / fmt.value
    return out


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first ~800 tokens of the held-out prose: mlx's Linux CPU backend runs at ~1 GFLOP/s."""
    path = tmp_path_factory.mktemp("data") / "eval-sample.txt"
    path.write_text(EVAL_FILES[0].read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[Role, runtime_pb2_grpc.RuntimeServiceStub]]:
    store = tmp_path_factory.mktemp("store")
    servers = {role: start_service(role, "127.0.0.1:0", store) for role in (Role.RUNTIME_CPU, Role.RUNTIME_APPLE)}
    channels = {role: grpc.insecure_channel(f"127.0.0.1:{port}") for role, (_, port) in servers.items()}
    yield {role: runtime_pb2_grpc.RuntimeServiceStub(channel) for role, channel in channels.items()}
    for channel in channels.values():
        channel.close()
    for server, _ in servers.values():
        server.stop(grace=1).wait()


@pytest.mark.parametrize(("role", "fmt"), [(Role.RUNTIME_CPU, Format.ONNX), (Role.RUNTIME_APPLE, Format.MLX)])
def test_evaluate_and_generate_over_grpc(stubs: dict[Role, runtime_pb2_grpc.RuntimeServiceStub],
                                         artifacts: dict[Format, Path], sample: Path, role: Role, fmt: Format
                                         ) -> None:
    path = artifacts[fmt]
    reply = stubs[role].Evaluate(runtime_pb2.EvaluateRequest(
        artifact_path=str(path), data_files=[str(sample)], seq_len=256,
        reference_model_path=str(DEMO_MODEL)), timeout=120)
    (result,) = reply.results
    local = evaluate_path(path, [sample], seq_len=256)[0]  # the same engine, in this process
    assert result.ppl == pytest.approx(local.ppl, rel=1e-6)
    assert result.reference_ppl < result.ppl < 1.2 * result.reference_ppl
    assert 0.8 < result.top1 <= 1.0
    chunks = list(stubs[role].Generate(runtime_pb2.GenerateRequest(
        artifact_path=str(path), prompt="And God said", max_new_tokens=8), timeout=60))
    assert 1 <= len(chunks) <= 8 and "".join(c.text for c in chunks).strip()


def test_each_target_refuses_the_other_format(stubs: dict[Role, runtime_pb2_grpc.RuntimeServiceStub],
                                              artifacts: dict[Format, Path], sample: Path) -> None:
    for role, fmt, target in ((Role.RUNTIME_CPU, Format.MLX, "cpu"), (Role.RUNTIME_APPLE, Format.ONNX, "apple")):
        with pytest.raises(grpc.RpcError) as info:
            stubs[role].Evaluate(runtime_pb2.EvaluateRequest(artifact_path=str(artifacts[fmt]),
                                                             data_files=[str(sample)]), timeout=60)
        assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert f"is {fmt.value}; the {target} runtime runs" in (info.value.details() or "")
