"""A real multi-node Ray cluster on one machine: a head and two worker raylets, each advertising its own
custom resource, and `bitsmith serve coordinator --ray-address ...` joining it with per-role resource
requirements (the operator's `BITSMITH_RAY_RESOURCES`). Each worker service must land on the node whose
resource it asked for, and a job must run through the services so placed.

Every Ray process (the nodes, the coordinator, the probe that reads the cluster's state) is a subprocess
given this cluster's auth token in its environment: Ray reads its auth mode once per process, at import,
so a driver inside the test process would depend on what ran there before. Each node is `ray start
--block` in a process of its own, in a temporary directory, stopped by pid at the end: `ray stop` would
stop every Ray on the machine, other people's included.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil
import pytest
from bitsmith.demo import CALIB_FILES, DEMO_MODEL
from bitsmith.manifest import verify_manifest
from bitsmith.recipes import Recipe
from bitsmith.rpc import Calibration, Client, QuantizeRequest, Resources
from bitsmith.schemes import Method
from bitsmith_services.coordinator.placement import RAY_RESOURCES_ENV, SOLVER_REPLICAS_ENV
from bitsmith_services.registry import Role

NODE_RESOURCES = {
    "head": {"bitsmith_head": 1},
    "gpu": {"bitsmith_gpu_node": 2},
    "cpu": {"bitsmith_cpu_node": 4},
}
"""Each node's custom resource; the head hosts no service."""
ROLE_NODES = {Role.CALIBRATOR: "gpu", Role.SOLVER: "gpu", Role.PACKER: "cpu", Role.RUNTIME_CPU: "cpu",
              Role.RUNTIME_APPLE: "cpu", Role.RUNTIME_NVIDIA: "cpu"}
"""Where each role must land: it asks for one unit of that node's resource."""
NODE_START_TIMEOUT_S = 90.0
CLUSTER_STATE = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print(json.dumps({"nodes": {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]},
                  "labels": {n["NodeID"]: n.get("Labels") or {} for n in ray.nodes() if n["Alive"]},
                  "free": ray.available_resources()}))
"""
"""Prints the cluster's live nodes (id -> resources, id -> labels) and its free resources, as a driver of its own."""


def ray_cli() -> str:
    """The `ray` command of this interpreter's environment (or of PATH); skips outside CI without one."""
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.exists() else shutil.which("ray")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("the ray CLI is missing; CI must run the multi-node test")
        pytest.skip("the ray CLI is not installed here: the multi-node Ray test needs `ray start`")
    return found


def free_ports(n: int) -> list[int]:
    """n ports free now (each node's Ray processes need their own: they share one host)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


class LocalRayCluster:
    """Ray nodes on this machine, each `ray start --block` in a process of its own."""

    def __init__(self, cli: str, temp_dir: Path, log_dir: Path) -> None:
        self._cli = cli
        self._temp_dir = temp_dir
        self._log_dir = log_dir
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.gcs_address = ""
        self.client_address = ""

    def _start(self, name: str, args: list[str], resources: dict[str, int]) -> None:
        """`ray start --block` for node `name`, offering `resources` (args may add `--labels k=v`)."""
        agent, agent_grpc, metrics, runtime_env, node_manager, object_manager = free_ports(6)
        with open(self._log_dir / f"{name}.log", "wb") as log:
            self._procs[name] = subprocess.Popen(
                [self._cli, "start", "--block", *args, "--num-cpus", "1",
                 "--resources", json.dumps(resources), "--object-store-memory", str(100 * 1024 * 1024),
                 "--temp-dir", str(self._temp_dir), "--disable-usage-stats",
                 "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
                 "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
                 "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
            )
        self._wait_until_started(name)

    def _wait_until_started(self, name: str) -> None:
        """Until node `name` runs: `ray start` says so once its raylet has registered with the head.

        One node at a time: a raylet gets 30 s to register, which two starting at once on a busy
        two-core machine can miss.
        """
        log, proc = self._log_dir / f"{name}.log", self._procs[name]
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"Ray node {name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)

    def start_head(self, resources: dict[str, int]) -> None:
        gcs, client = free_ports(2)
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.client_address = f"ray://127.0.0.1:{client}"
        self._start("head", ["--head", "--port", str(gcs), "--ray-client-server-port", str(client),
                             "--include-dashboard", "false"], resources)

    def add_node(self, name: str, resources: dict[str, int], labels: str = "") -> None:
        self._start(name, ["--address", self.gcs_address, *(["--labels", labels] if labels else [])], resources)

    def state(self) -> dict[str, Any]:
        """Live nodes and free resources, read by a driver process of its own."""
        probe = subprocess.run([sys.executable, "-c", CLUSTER_STATE, self.gcs_address], capture_output=True,
                               text=True, timeout=120, check=False)
        assert probe.returncode == 0, probe.stderr[-3000:]
        state: dict[str, Any] = json.loads(probe.stdout.strip().splitlines()[-1])
        return state

    def stop(self) -> None:
        """Stop every process these nodes started, found from their `ray start` processes' trees."""
        procs: list[psutil.Process] = []
        for p in self._procs.values():
            with suppress(psutil.NoSuchProcess):
                procs += [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        for proc in procs:
            with suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=15)
        for proc in alive:
            with suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def ray_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalRayCluster]:
    cli = ray_cli()
    # Ray authenticates every connection with a token (by default the user's ~/.ray/auth_token, which
    # other Rays of this user share): this cluster gets one of its own, which every process started
    # below reads from its environment.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    # Ray's socket paths live under its temp dir and must stay short: not under pytest's deep tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix="bsray-"))
    cluster = LocalRayCluster(cli, temp_dir, tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def started_services(log: Path) -> list[dict[str, Any]]:
    """The coordinator's "service started" log records (role, replica, address, node_id)."""
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [r for r in records if r.get("msg") == "service started"]


def service_nodes(log: Path) -> dict[Role, str]:
    """Role -> Ray node id, from the coordinator's "service started" log records."""
    return {Role(r["role"]): r["node_id"] for r in started_services(log)}


@contextmanager
def coordinator(ray_address: str, home: Path, log: Path) -> Iterator[str]:
    """`bitsmith serve coordinator --ray-address ...`; yields its gRPC address once its services run."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bitsmith_services.cli", "serve", "coordinator", "--ray-address", ray_address,
             "--home", str(home), "--port", "0"], stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()  # printed once every service has started
        assert address, f"the coordinator exited:\n{log.read_text()[-3000:]}"
        yield address
    finally:
        proc.terminate()  # it stops its service actors on the way out
        proc.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("join", ["gcs", "ray-client"])
def test_services_land_on_the_nodes_their_resources_name_and_run_a_job(
        join: str, ray_cluster: LocalRayCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`gcs`: the coordinator is a driver on a node of the cluster (`--ray-address auto` on the head, as
    infra/ray/cluster.yaml runs it); `ray-client`: it joins from outside through the head's client port
    (`ray://`, as the Kubernetes Deployment does)."""
    ray_cluster.start_head(NODE_RESOURCES["head"])
    for name in ("gpu", "cpu"):
        ray_cluster.add_node(name, NODE_RESOURCES[name])
    monkeypatch.setenv(RAY_RESOURCES_ENV, json.dumps(
        {role.value: {next(iter(NODE_RESOURCES[node])): 1} for role, node in ROLE_NODES.items()}))
    address = ray_cluster.gcs_address if join == "gcs" else ray_cluster.client_address

    with coordinator(address, tmp_path / "home", tmp_path / "coordinator.log") as server:
        state = ray_cluster.state()
        node_of = {name: next(node for node, offered in state["nodes"].items() if resource in offered)
                   for name, resources in NODE_RESOURCES.items() for resource in resources}
        assert len(set(node_of.values())) == 3, "each resource names a node of its own"
        placed = service_nodes(tmp_path / "coordinator.log")
        assert placed == {role: node_of[node] for role, node in ROLE_NODES.items()}
        free = state["free"]  # every unit asked for is held by the actor that asked for it
        assert free.get("bitsmith_gpu_node", 0) == 0 and free.get("bitsmith_cpu_node", 0) == 0
        assert free.get("bitsmith_head") == 1

        with Client(server) as client:
            job = client.submit(QuantizeRequest(model=DEMO_MODEL, out=tmp_path / "rtn",
                                                recipe=Recipe(method=Method.RTN))).wait(timeout=120)
        (artifact,) = job.artifacts
        assert artifact.sha256 == verify_manifest(tmp_path / "rtn").digest


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_solver_replicas_spread_over_nodes_and_jobs_run_where_their_label_says(
        ray_cluster: LocalRayCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two solver replicas, each asking for the one `bitsmith_solver` unit of a node of its own, labelled
    zone=a and zone=b: a job pinned to zone=b solves only on that node's replica, a job asking for two
    GPUs fans its parallel-mode solves out over both, and a job asking for a label no node has is refused
    before it is queued."""
    ray_cluster.start_head({"bitsmith_head": 1})
    ray_cluster.add_node("zone-a", {"bitsmith_solver": 1}, labels="zone=a")
    ray_cluster.add_node("zone-b", {"bitsmith_solver": 1}, labels="zone=b")
    monkeypatch.setenv(RAY_RESOURCES_ENV, json.dumps({"solver": {"bitsmith_solver": 1}}))
    monkeypatch.setenv(SOLVER_REPLICAS_ENV, "2")

    with coordinator(ray_cluster.gcs_address, tmp_path / "home", tmp_path / "coordinator.log") as server:
        state = ray_cluster.state()
        solver_nodes = {r["address"]: r["node_id"] for r in started_services(tmp_path / "coordinator.log")
                        if r["role"] == "solver"}
        assert len(solver_nodes) == 2 and len(set(solver_nodes.values())) == 2, solver_nodes
        assert set(solver_nodes.values()) == {node for node, offered in state["nodes"].items()
                                              if "bitsmith_solver" in offered}
        assert state["free"].get("bitsmith_solver", 0) == 0

        def request(out: str, resources: Resources) -> QuantizeRequest:
            return QuantizeRequest(model=DEMO_MODEL, out=tmp_path / out, recipe=Recipe(method=Method.GPTQ),
                                   calibration=Calibration(files=CALIB_FILES, samples=4, seq_len=64, mode="parallel"),
                                   resources=resources)

        with Client(server) as client:
            pinned = client.submit(request("pinned", Resources(node_label="zone=b"))).wait(timeout=300)
            both = client.submit(request("both", Resources(gpus=2))).wait(timeout=300)
            with pytest.raises(Exception, match="zone=c"):
                client.submit(request("nowhere", Resources(node_label="zone=c")))
        (address,) = pinned.solvers
        assert state["labels"][solver_nodes[address]].get("zone") == "b"
        assert {s.worker for s in pinned.diagnostics.timeline if s.phase == "solve"} == {address}
        assert set(both.solvers) == set(solver_nodes)
        assert {s.worker for s in both.diagnostics.timeline if s.phase == "solve"} == set(solver_nodes)
        assert not (tmp_path / "nowhere").exists()
        # The same solves, spread or not: the artifacts are bitwise equal.
        assert pinned.artifacts[0].sha256 == both.artifacts[0].sha256 == verify_manifest(tmp_path / "both").digest
