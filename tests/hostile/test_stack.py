"""The hostile corpus against a real stack: every input gets its status code and a reason naming the problem
from the service that first sees it, nothing is written, and the stack serves a normal job afterwards.

Checkpoints and recipes go in as jobs (JobService Submit), GGUF files as an artifact to evaluate (the CPU
runtime), store keys as references a worker is handed (the solver), and an oversized message at the
coordinator's door.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from bitsmith.demo import DEMO_MODEL, EVAL_FILES
from bitsmith.errors import BitsmithError
from bitsmith.rpc import JobState
from bitsmith.rpc.server import MAX_MESSAGE_BYTES
from bitsmith.schemes import Method
from bitsmith.store import ArtifactStore, tensor_digest
from bitsmith.v1 import common_pb2, job_pb2, job_pb2_grpc, runtime_pb2, runtime_pb2_grpc, solver_pb2, solver_pb2_grpc
from bitsmith_services.registry import Role

from tests.integration.conftest import Stack, make_request
from tests.unit.gguf_files import write_artifact

from .corpus import CHECKPOINTS, GGUF_FILES, INVALID, RECIPES, STORE_KEYS, Hostile, copy_demo

WEIGHT = torch.ones(256, 256)
"""A weight the solver could solve (model.layers.0.mlp.up_proj's shape is [768, 256]; any [N, 256] will do)."""


def assert_status(case: Hostile[object], code: str, reason: str) -> None:
    assert code == case.code, reason
    assert re.search(case.reason, reason), reason


def assert_nothing_written(stack: Stack, out: Path, jobs_before: int) -> None:
    assert len(stack.client.jobs(limit=1000)) == jobs_before, "a refused job is not recorded"
    assert not out.exists() and not list(out.parent.glob(".*partial*"))


def refused_rpc(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.mark.parametrize("case", CHECKPOINTS, ids=lambda c: c.name)
def test_submit_refuses_hostile_checkpoints(stack: Stack, case: Hostile[Callable[[Path], Path]], tmp_path: Path
                                            ) -> None:
    model = case.build(copy_demo(tmp_path))
    out = tmp_path / "out"
    before = len(stack.client.jobs(limit=1000))
    with pytest.raises(BitsmithError) as info:
        stack.client.submit(make_request(out, model=model, method=Method.RTN, calibrate=False))
    code, _, reason = str(info.value).partition(": ")
    assert_status(case, code, reason)
    assert_nothing_written(stack, out, before)


@pytest.mark.parametrize("case", RECIPES, ids=lambda c: c.name)
def test_submit_refuses_hostile_recipes(stack: Stack, case: Hostile[Callable[..., None]], tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = make_request(out, method=Method.RTN, calibrate=False).to_proto()
    case.build(spec.recipe)
    before = len(stack.client.jobs(limit=1000))
    with pytest.raises(BitsmithError) as info:
        stack.client.calls.submit(spec)
    code, _, reason = str(info.value).partition(": ")
    assert_status(case, code, reason)
    assert_nothing_written(stack, out, before)


@pytest.fixture(scope="module")
def f16(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_artifact(tmp_path_factory.mktemp("gguf") / "f16", "F16").read_bytes()


@pytest.mark.parametrize("case", GGUF_FILES, ids=lambda c: c.name)
def test_runtime_refuses_hostile_gguf_files(stack: Stack, case: Hostile[Callable[[bytes], bytes]], f16: bytes,
                                            tmp_path: Path) -> None:
    path = tmp_path / "model-F16.gguf"
    path.write_bytes(case.build(f16))
    with grpc.insecure_channel(stack.addresses[Role.RUNTIME_CPU]) as channel:
        stub = runtime_pb2_grpc.RuntimeServiceStub(channel)
        error = refused_rpc(lambda: stub.Evaluate(runtime_pb2.EvaluateRequest(
            artifact_path=str(path), data_files=[str(EVAL_FILES[0])], seq_len=64), timeout=60))
    assert_status(case, error.code().name, error.details() or "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-F16.gguf"]


def _solve(stack: Stack, request: solver_pb2.SolveRequest) -> grpc.RpcError:
    with grpc.insecure_channel(stack.addresses[Role.SOLVER]) as channel:
        stub = solver_pb2_grpc.SolverServiceStub(channel)
        return refused_rpc(lambda: stub.Solve(request, timeout=60))


def _rtn_request(job_id: str, **fields: object) -> solver_pb2.SolveRequest:
    return solver_pb2.SolveRequest(job_id=job_id, block=0, prefix="model.layers.0", method=common_pb2.METHOD_RTN,
                                   scheme=common_pb2.QuantScheme(bits=4, group_size=128), **fields)


@pytest.mark.parametrize("case", STORE_KEYS, ids=lambda c: c.name)
def test_solver_refuses_references_that_leave_the_store(stack: Stack, case: Hostile[Callable[[Path, Path], str]],
                                                        tmp_path: Path) -> None:
    """A weight referenced by a key that leaves the store is not read, even where a valid file lies there."""
    root, outside = stack.home / "store", tmp_path / "outside"
    outside.mkdir()
    ArtifactStore(outside).put_tensors("w.safetensors", {"w": WEIGHT})
    key = case.build(root, outside)
    weight = common_pb2.TensorRef(key=key, name="w", dtype="float32", shape=list(WEIGHT.shape),
                                  sha256=tensor_digest(WEIGHT))
    stats = common_pb2.LinearStats(name="mlp.up_proj", weight=weight)
    error = _solve(stack, _rtn_request("hostile-read", stats=[stats]))
    assert_status(case, error.code().name, error.details() or "")
    assert sorted(p.name for p in outside.iterdir()) == ["w.safetensors"]


def test_solver_refuses_to_write_through_a_symlink_out_of_the_store(stack: Stack, tmp_path: Path) -> None:
    """A job's scratch directory planted as a link to elsewhere: the solve runs, its result is not written."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (stack.home / "store" / "jobs").mkdir(parents=True, exist_ok=True)
    os.symlink(outside, stack.home / "store" / "jobs" / "planted")
    request = _rtn_request("planted", stats=[common_pb2.LinearStats(name="mlp.up_proj")], model_path=str(DEMO_MODEL))
    error = _solve(stack, request)
    assert error.code().name == INVALID
    assert re.search(r"store key 'jobs/planted/block-0/mlp\.up_proj\.quantized\.safetensors' resolves to .*outside",
                     error.details() or ""), error.details()
    assert not any(outside.iterdir())


def test_a_job_id_that_leaves_the_scratch_is_refused(stack: Stack) -> None:
    request = _rtn_request("../escape", stats=[common_pb2.LinearStats(name="mlp.up_proj")], model_path=str(DEMO_MODEL))
    error = _solve(stack, request)
    assert error.code().name == INVALID and "invalid job id '../escape'" in (error.details() or "")


def test_an_oversized_message_is_refused_by_grpc_and_the_coordinator_serves_on(stack: Stack, tmp_path: Path) -> None:
    """The client side here has no send limit, so the bytes reach the server, which refuses them itself."""
    spec = make_request(tmp_path / "out", method=Method.RTN, calibrate=False).to_proto()
    spec.recipe.overrides.add(pattern="x" * (MAX_MESSAGE_BYTES + 1), skip=True)
    with grpc.insecure_channel(stack.address) as channel:
        stub = job_pb2_grpc.JobServiceStub(channel)
        error = refused_rpc(lambda: stub.Submit(job_pb2.SubmitRequest(job=spec), timeout=60))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert stub.List(job_pb2.ListJobsRequest(limit=1), timeout=10) is not None
    assert not (tmp_path / "out").exists()


def test_the_stack_serves_a_normal_job_after_the_corpus(stack: Stack, tmp_path: Path) -> None:
    """Last in the module: every refusal above left every service serving."""
    done = stack.client.submit(make_request(tmp_path / "rtn", method=Method.RTN, calibrate=False)).wait(check=False)
    assert done.state == JobState.SUCCEEDED, done.error
    assert (tmp_path / "rtn" / "config.json").is_file()
