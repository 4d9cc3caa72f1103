"""Several solver replicas behind one coordinator (real gRPC services on loopback): a job's solves fan
out over the replicas it leases while calibration moves on, artifacts are bitwise those of one replica,
jobs run side by side on distinct replicas, wait in the queue for theirs, and demands the cluster can
never meet are refused at Submit."""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from bitsmith.errors import BitsmithError
from bitsmith.rpc import Client, JobState, Resources
from bitsmith.v1 import common_pb2
from bitsmith_services.coordinator.placement import ServiceAddresses, StaticPlacement, Worker
from bitsmith_services.coordinator.server import Coordinator, create_server
from bitsmith_services.registry import Role, start_service

from .conftest import make_request

GIB = 1 << 30


@dataclass
class Replicas:
    client: Client
    solvers: list[str]
    coordinator: Coordinator

    def metric(self, line: str) -> float:
        """The value of the exposition line that starts with `line` (a name and its labels)."""
        text = self.coordinator.metrics.exposition("")[0].decode()
        (value,) = [row.rpartition(" ")[2] for row in text.splitlines() if row.startswith(line + " ")]
        return float(value)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    home = tmp_path_factory.mktemp("replicas")
    store = home / "store"
    servers = {role: start_service(role, "127.0.0.1:0", store) for role in Role if role is not Role.SOLVER}
    solvers = [start_service(Role.SOLVER, "127.0.0.1:0", store) for _ in range(2)]
    by_role = {role: f"127.0.0.1:{port}" for role, (_, port) in servers.items()}
    workers = tuple(Worker(f"127.0.0.1:{port}", labels=frozenset({f"zone={zone}"}))
                    for (_, port), zone in zip(solvers, "ab", strict=True))
    addresses = ServiceAddresses({**by_role, Role.SOLVER: workers[0].address}, workers)
    server, port, coordinator = create_server("127.0.0.1:0", db_path=home / "jobs.sqlite",
                                              placement=StaticPlacement(addresses), max_concurrent_jobs=4,
                                              host_memory_bytes=GIB)
    client = Client(f"127.0.0.1:{port}")
    yield Replicas(client=client, solvers=[w.address for w in workers], coordinator=coordinator)
    client.close()
    server.stop(grace=1).wait()
    coordinator.shutdown()
    for s, _ in [*servers.values(), *solvers]:
        s.stop(grace=1).wait()


def _overlaps(a: common_pb2.TimelineSpan, b: common_pb2.TimelineSpan) -> bool:
    return a.start_s < b.start_s + b.duration_s and b.start_s < a.start_s + a.duration_s


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_solves_fan_out_and_the_artifact_is_bitwise_one_replicas(replicas: Replicas, tmp_path: Path,
                                                                 mode: str) -> None:
    base = make_request(tmp_path / "one", mode=mode, formats=("gptq", "gguf:Q4_K_M"))
    one = replicas.client.submit(base).wait(timeout=300)
    two = replicas.client.submit(dataclasses.replace(base, out=tmp_path / "two", resources=Resources(gpus=2))
                                 ).wait(timeout=300)

    assert len(one.solvers) == 1 and sorted(two.solvers) == sorted(replicas.solvers)
    assert [a.sha256 for a in two.artifacts] == [a.sha256 for a in one.artifacts]
    solves = [s for s in two.diagnostics.timeline if s.phase == "solve"]
    assert {s.worker for s in solves} == set(replicas.solvers)
    assert len(solves) == len([s for s in one.diagnostics.timeline if s.phase == "solve"])
    assert any(_overlaps(a, b) for a in solves for b in solves if a is not b)  # two replicas at once
    assert len(two.diagnostics.blocks) == 4  # every block's held-out error, measured once
    assert [b.output_error for b in two.diagnostics.blocks] == pytest.approx(
        [b.output_error for b in one.diagnostics.blocks], rel=1e-6)
    if mode == "parallel":
        # Calibration moved on: some block's calibrator call ran while an earlier block's solve did.
        calls = [s for s in two.diagnostics.timeline if s.service == "calibrator" and s.block >= 0]
        assert any(_overlaps(solve, call) and call.block > solve.block for solve in solves for call in calls)


def test_jobs_run_side_by_side_on_distinct_replicas(replicas: Replicas, tmp_path: Path) -> None:
    jobs = [replicas.client.submit(make_request(tmp_path / f"job{i}", samples=4)) for i in range(2)]
    done = [job.wait(timeout=300) for job in jobs]
    assert all(job.state is JobState.SUCCEEDED for job in done)
    assert sorted(s for job in done for s in job.solvers) == sorted(replicas.solvers)
    # One calibrator served both at once: neither saw the other's weights or hooks.
    assert done[0].artifacts[0].sha256 == done[1].artifacts[0].sha256


def test_a_pinned_job_runs_only_on_its_labels_replica(replicas: Replicas, tmp_path: Path) -> None:
    request = dataclasses.replace(make_request(tmp_path / "pinned", samples=4),
                                  resources=Resources(node_label="zone=b"))
    job = replicas.client.submit(request).wait(timeout=300)
    assert job.solvers == (replicas.solvers[1],)
    assert {s.worker for s in job.diagnostics.timeline if s.phase == "solve"} == {replicas.solvers[1]}


@pytest.mark.parametrize(("resources", "code", "words"), [
    (Resources(gpus=3), grpc.StatusCode.FAILED_PRECONDITION, "asks for 3 solver replicas; the cluster has 2"),
    (Resources(node_label="zone=c"), grpc.StatusCode.FAILED_PRECONDITION, "label 'zone=c'"),
    (Resources(gpus=2, node_label="zone=a"), grpc.StatusCode.FAILED_PRECONDITION, "the cluster has 1"),
    (Resources(host_memory_bytes=2 * GIB), grpc.StatusCode.RESOURCE_EXHAUSTED, "host memory"),
])
def test_demands_the_cluster_can_never_meet_are_refused_at_submit(
        replicas: Replicas, tmp_path: Path, resources: Resources, code: grpc.StatusCode, words: str) -> None:
    request = dataclasses.replace(make_request(tmp_path / "never"), resources=resources)
    with pytest.raises(BitsmithError, match=f"^{code.name}: .*{re.escape(words)}"):
        replicas.client.submit(request)
    assert not (tmp_path / "never").exists()


def test_a_job_waits_for_its_replicas_and_can_be_cancelled_while_it_waits(replicas: Replicas, tmp_path: Path) -> None:
    holder = replicas.client.submit(dataclasses.replace(make_request(tmp_path / "holder", samples=16, seq_len=256),
                                                        resources=Resources(gpus=2)))
    started = threading.Event()
    for event in holder.watch():
        if event.phase == "solve":
            started.set()
            break
    assert started.is_set()
    waiting = replicas.client.submit(dataclasses.replace(make_request(tmp_path / "waiting"),
                                                         resources=Resources(gpus=1)))
    queued = replicas.client.submit(dataclasses.replace(make_request(tmp_path / "queued"),
                                                        resources=Resources(gpus=1)))
    assert waiting.refresh().state is JobState.QUEUED and not waiting.solvers
    assert replicas.metric('bitsmith_solver_replicas{state="leased"}') == 2
    assert replicas.metric('bitsmith_solver_replicas{state="free"}') == 0
    assert replicas.metric('bitsmith_host_memory_bytes{state="leased"}') > 0
    assert queued.cancel().state is JobState.CANCELLED
    assert holder.wait(timeout=300).state is JobState.SUCCEEDED
    assert waiting.wait(timeout=300).state is JobState.SUCCEEDED and len(waiting.solvers) == 1
    assert queued.refresh().state is JobState.CANCELLED and not queued.solvers
    assert not (tmp_path / "queued").exists()
    deadline = time.monotonic() + 10  # a lease comes back just after its job's final state is stored
    while replicas.metric('bitsmith_solver_replicas{state="leased"}') and time.monotonic() < deadline:
        time.sleep(0.05)
    assert replicas.metric('bitsmith_solver_replicas{state="leased"}') == 0
    assert replicas.metric('bitsmith_host_memory_bytes{state="free"}') == GIB
