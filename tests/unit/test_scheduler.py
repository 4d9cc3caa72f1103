"""The coordinator's job queue: fair turns between parties, leases of solver replicas and host memory,
node labels, backfill bounded so a big job is never starved, and demands no cluster can meet refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bitsmith.demo import DEMO_MODEL
from bitsmith.errors import ConfigError, ResourceExhaustedError, UnplaceableError
from bitsmith.v1 import common_pb2, job_pb2
from bitsmith_services.coordinator.placement import ActorResources, ServiceAddresses, Worker, solver_replicas
from bitsmith_services.coordinator.scheduler import (
    MAX_BYPASS,
    Demand,
    Scheduler,
    demand_of,
)
from bitsmith_services.registry import Role

GIB = 1 << 30


def workers(*labels: str) -> list[Worker]:
    return [Worker(f"10.0.0.{i}:1", f"node{i}", frozenset(label.split("+")) if label else frozenset())
            for i, label in enumerate(labels)]


def started(scheduler: Scheduler) -> list[str]:
    return [lease.job_id for lease in scheduler.start_ready()]


def test_parties_take_turns_on_one_replica() -> None:
    scheduler = Scheduler(workers(""), host_bytes=GIB)
    for job in ("a1", "a2", "a3"):
        scheduler.add(job, "team-a", Demand())
    scheduler.add("b1", "team-b", Demand())
    assert started(scheduler) == ["a1"]
    assert started(scheduler) == []  # the one replica is held
    scheduler.release("a1")
    assert started(scheduler) == ["b1"]  # team-b has not had a turn; a2 came first but waits
    scheduler.release("b1")
    assert started(scheduler) == ["a2"]
    scheduler.release("a2")
    assert started(scheduler) == ["a3"]


def test_the_party_holding_less_goes_first() -> None:
    scheduler = Scheduler(workers("", "", ""), host_bytes=GIB)
    scheduler.add("a1", "a", Demand())
    scheduler.add("a2", "a", Demand())
    scheduler.add("b1", "b", Demand())
    scheduler.add("a3", "a", Demand())
    assert started(scheduler) == ["a1", "b1", "a2"]
    assert scheduler.waiting == ["a3"]


def test_a_lease_is_distinct_replicas_and_they_come_back() -> None:
    scheduler = Scheduler(workers("", "", ""), host_bytes=GIB)
    scheduler.add("two", "p", Demand(gpus=2))
    scheduler.add("one", "q", Demand(gpus=1))
    scheduler.add("late", "r", Demand(gpus=1))
    leases = scheduler.start_ready()
    assert [(lease.job_id, lease.solvers) for lease in leases] == [("two", (0, 1)), ("one", (2,))]
    scheduler.release("two")
    (late,) = scheduler.start_ready()
    assert late.solvers == (0,)


def test_node_label_pins_a_job_to_matching_replicas() -> None:
    scheduler = Scheduler(workers("zone=a", "zone=b+accelerator_type:H100", "zone=b"), host_bytes=GIB)
    scheduler.add("h100", "p", Demand(label="accelerator_type:H100"))
    scheduler.add("h100-again", "p", Demand(label="accelerator_type:H100"))
    scheduler.add("b-pair", "q", Demand(gpus=2, label="zone=b"))
    scheduler.add("anywhere", "r", Demand())
    leases = {lease.job_id: lease.solvers for lease in scheduler.start_ready()}
    assert leases == {"h100": (1,), "anywhere": (0,)}  # b-pair needs replica 1 too; h100-again waits for it
    scheduler.release("h100")
    leases = {lease.job_id: lease.solvers for lease in scheduler.start_ready()}
    assert leases == {"b-pair": (1, 2)}  # q has not had a turn yet; p has
    scheduler.release("b-pair")
    assert started(scheduler) == ["h100-again"]


def test_host_memory_is_leased_too() -> None:
    scheduler = Scheduler(workers("", ""), host_bytes=10 * GIB)
    scheduler.add("big", "p", Demand(host_bytes=6 * GIB))
    scheduler.add("bigger", "q", Demand(host_bytes=6 * GIB))
    assert started(scheduler) == ["big"]  # a replica is free, the memory is not
    scheduler.release("big")
    assert started(scheduler) == ["bigger"]


def test_backfill_stops_after_max_bypass_so_a_big_job_starts() -> None:
    scheduler = Scheduler(workers("", ""), host_bytes=GIB)
    scheduler.add("small-0", "p", Demand())
    assert started(scheduler) == ["small-0"]
    scheduler.add("big", "q", Demand(gpus=2))
    passed = 0
    for i in range(1, MAX_BYPASS + 3):
        scheduler.add(f"small-{i}", "p", Demand())
        now = started(scheduler)
        if now:
            assert now == [f"small-{i}"]  # backfilled into the free replica
            passed += 1
            scheduler.release(f"small-{i}")
    assert passed == MAX_BYPASS  # then nothing behind the big job starts first
    scheduler.release("small-0")
    assert started(scheduler) == ["big"]


def test_max_running_caps_started_jobs() -> None:
    scheduler = Scheduler(workers("", "", ""), host_bytes=GIB, max_running=2)
    for job in "xyz":
        scheduler.add(job, job, Demand())
    assert started(scheduler) == ["x", "y"]
    scheduler.release("y")
    assert started(scheduler) == ["z"]


def test_a_cancelled_waiting_job_is_removed() -> None:
    scheduler = Scheduler(workers(""), host_bytes=GIB)
    scheduler.add("run", "p", Demand())
    scheduler.add("gone", "p", Demand())
    assert started(scheduler) == ["run"]
    assert scheduler.remove("gone") and not scheduler.remove("gone") and not scheduler.remove("run")
    scheduler.release("run")
    assert started(scheduler) == []


@pytest.mark.parametrize(("demand", "error", "words"), [
    (Demand(gpus=3), UnplaceableError, "asks for 3 solver replicas; the cluster has 2"),
    (Demand(label="zone=c"), UnplaceableError, "with label 'zone=c'; the cluster has 0"),
    (Demand(gpus=2, label="zone=a"), UnplaceableError, "the cluster has 1"),
    (Demand(host_bytes=2 * GIB), ResourceExhaustedError, "places at most"),
    (Demand(gpus=0), ConfigError, "at least one"),
])
def test_demands_no_waiting_can_meet_are_refused(demand: Demand, error: type[Exception], words: str) -> None:
    scheduler = Scheduler(workers("zone=a", "zone=b"), host_bytes=GIB)
    with pytest.raises(error, match=words):
        scheduler.check(demand)
    scheduler.check(Demand(gpus=2))  # what it does have is fine


def _spec(**resources: object) -> job_pb2.QuantizeJob:
    return job_pb2.QuantizeJob(model_path=str(DEMO_MODEL),
                               calibration=common_pb2.CalibrationSpec(samples=32, seq_len=128),
                               resources=job_pb2.JobResources(**resources))  # type: ignore[arg-type]


def test_demand_estimates_the_calibrators_activations() -> None:
    hidden = json.loads((Path(DEMO_MODEL) / "config.json").read_text())["hidden_size"]
    demand = demand_of(_spec(), calibrated=True)
    assert demand == Demand(gpus=1, host_bytes=2 * (32 + 2) * 128 * hidden * 4, label="")  # 2 held-out samples
    assert demand_of(_spec(), calibrated=False).host_bytes == 0  # RTN holds no activations
    given = demand_of(_spec(gpus=2, host_memory_bytes=12345, node_label="zone=a"), calibrated=True)
    assert given == Demand(gpus=2, host_bytes=12345, label="zone=a")


def test_demand_of_a_checkpoint_without_hidden_size_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    spec = _spec()
    spec.model_path = str(tmp_path)
    with pytest.raises(ConfigError, match="hidden_size"):
        demand_of(spec, calibrated=True)


def test_solver_replicas_count_or_as_many_as_fit() -> None:
    gpu = ActorResources({"GPU": 1})
    assert solver_replicas("3", gpu, {"GPU": 8}) == 3
    assert solver_replicas("auto", gpu, {"GPU": 8}) == 8
    assert solver_replicas("auto", ActorResources({"GPU": 2}), {"GPU": 8}) == 4
    assert solver_replicas("auto", ActorResources({"GPU": 0.5, "CPU": 4}), {"GPU": 3.5, "CPU": 16}) == 4
    assert solver_replicas("auto", ActorResources({"GPU": 1, "CPU": 0}), {"GPU": 2}) == 2  # CPU 0: not asked
    assert solver_replicas("auto", ActorResources(), {"GPU": 8}) == 1  # a solver that asks for nothing
    assert solver_replicas("auto", gpu, {}) == 1
    for bad in ("0", "-1", "many"):
        with pytest.raises(ConfigError, match="BITSMITH_SOLVER_REPLICAS"):
            solver_replicas(bad, gpu, {})


def test_services_take_several_solver_replicas_and_nothing_else_twice() -> None:
    addresses = ServiceAddresses.parse("calibrator=a:1,solver=b:1,solver=b:2,packer=c:1,runtime_cpu=d:1,"
                                       "runtime_apple=e:1,runtime_nvidia=f:1")
    assert [w.address for w in addresses.solvers] == ["b:1", "b:2"] and addresses[Role.SOLVER] == "b:1"
    single = ServiceAddresses({role: f"{role.value}:1" for role in Role})
    assert single.solvers == (Worker("solver:1"),)
    with pytest.raises(ConfigError, match="calibrator twice"):
        ServiceAddresses.parse("calibrator=a:1,calibrator=a:2,solver=b:1,packer=c:1,runtime_cpu=d:1,"
                               "runtime_apple=e:1,runtime_nvidia=f:1")


def test_host_memory_comes_from_the_environment_or_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    from bitsmith_services.coordinator.scheduler import HOST_MEMORY_ENV, host_memory_from_env

    monkeypatch.delenv(HOST_MEMORY_ENV, raising=False)
    assert host_memory_from_env() > GIB // 4  # 3/4 of this machine's memory
    monkeypatch.setenv(HOST_MEMORY_ENV, "123456789")
    assert host_memory_from_env() == 123456789
    for bad in ("lots", "0", "-5", "1.5e9"):
        monkeypatch.setenv(HOST_MEMORY_ENV, bad)
        with pytest.raises(ConfigError, match="BITSMITH_HOST_MEMORY must be a byte count >= 1"):
            host_memory_from_env()
