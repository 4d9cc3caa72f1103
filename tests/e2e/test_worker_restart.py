"""Faults, with real process kills: a solver and a calibrator killed (-9) in the middle of a job and
restarted at their address. The job waits for them and goes on from the step that failed, and its
artifact is bitwise the one an undisturbed run of the same job writes."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bitsmith.demo import CALIB_FILES, DEMO_MODEL
from bitsmith.manifest import verify_manifest
from bitsmith.rpc import Calibration, Client, JobState, QuantizeRequest, Recipe
from bitsmith.schemes import Method, QuantScheme
from bitsmith_services.coordinator.placement import StaticPlacement
from bitsmith_services.coordinator.server import create_server
from bitsmith_services.registry import Role

from tests.e2e.workers import Workers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, Workers]]:
    home = tmp_path_factory.mktemp("faults")
    workers = Workers(home / "store")
    server, port, coordinator = create_server("127.0.0.1:0", db_path=home / "jobs.sqlite",
                                              placement=StaticPlacement(workers.addresses()), http_port=None)
    with Client(f"127.0.0.1:{port}") as connected:
        yield connected, workers
    server.stop(grace=1).wait()
    coordinator.shutdown()
    workers.stop()


def _request(out: Path) -> QuantizeRequest:
    return QuantizeRequest(model=DEMO_MODEL, out=out, recipe=Recipe(method=Method.GPTQ, scheme=QuantScheme(bits=4)),
                           calibration=Calibration(files=CALIB_FILES, samples=32, seq_len=256))


def test_killed_workers_are_waited_for_and_the_artifact_is_bitwise_the_same(
        client: tuple[Client, Workers], tmp_path: Path) -> None:
    sdk, workers = client
    undisturbed = sdk.submit(_request(tmp_path / "undisturbed")).wait(timeout=900)

    job = sdk.submit(_request(tmp_path / "disturbed"))
    killed: list[tuple[Role, int]] = []
    for event in job.watch():
        # The solver dies while block 1 is being solved, the calibrator while block 2 calibrates.
        for role, block, phase in ((Role.SOLVER, 1, "solve"), (Role.CALIBRATOR, 2, "calibrate")):
            if event.phase == phase and event.block == block and (role, block) not in killed:
                workers.kill(role)
                killed.append((role, block))
                time.sleep(1.0)  # the job's next call finds nobody there
                workers.start(role)
    job.wait(timeout=900)
    assert killed == [(Role.SOLVER, 1), (Role.CALIBRATOR, 2)]
    assert job.state is JobState.SUCCEEDED, job.error

    (expected,), (got,) = undisturbed.artifacts, job.artifacts
    assert got.sha256 == expected.sha256, "the artifact differs from the undisturbed run's"
    assert verify_manifest(got.path).digest == expected.sha256
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["disturbed", "undisturbed"], f"staging left behind: {left}"


def test_a_killed_ray_actor_is_restarted_found_at_its_new_address_and_the_job_goes_on(tmp_path: Path) -> None:
    import ray
    from bitsmith_services.stack import LocalStack

    with LocalStack(home=tmp_path / "home") as stack, Client(stack.address) as sdk:
        undisturbed = sdk.submit(_request(tmp_path / "undisturbed")).wait(timeout=900)
        (name,) = [n for n in ray.util.list_named_actors() if n.startswith("bitsmith-solver-")]
        handle = ray.get_actor(name)
        before = ray.get(handle.address.remote())
        pid = ray.get(handle.__ray_call__.remote(lambda _: os.getpid()))
        job = sdk.submit(_request(tmp_path / "disturbed"))
        killed = False
        for event in job.watch():
            if event.phase == "solve" and event.block == 1 and not killed:
                os.kill(pid, signal.SIGKILL)  # Ray restarts the actor, which binds a new port
                killed = True
        job.wait(timeout=900)
        assert killed and job.state is JobState.SUCCEEDED, job.error
        assert ray.get(handle.address.remote()) != before, "the restarted solver answers at a new address"
    (expected,), (got,) = undisturbed.artifacts, job.artifacts
    assert got.sha256 == expected.sha256, "the artifact differs from the undisturbed run's"
