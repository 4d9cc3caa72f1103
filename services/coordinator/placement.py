"""Where the worker services run: Ray actors (the default) or addresses the operator gives.

With Ray, each worker service is a gRPC server hosted inside a Ray actor, started with the resources
its role needs and restarted by Ray if it dies; the coordinator learns the actor's address and talks
gRPC to it like to any other server. Without Ray (a host where it is not installed, or a deployment
that places services itself), a static map of role -> address does the same job.

The solver runs as several replicas (`BITSMITH_SOLVER_REPLICAS`, or `solver=` given more than once):
one per GPU of a cluster ("auto"), each asking Ray for what the solver role asks (`{"GPU": 1}`), so Ray
spreads them over the nodes that have it. Each replica is known with its node's labels (Ray's node labels as
"key=value", the node's resource names such as "accelerator_type:H100", "node:<ip>"), which is what a
job's `node_label` is matched against.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bitsmith.errors import ConfigError, ServiceUnavailableError
from bitsmith.rpc.security import SecurityConfig
from bitsmith.settings import positive_int
from bitsmith_services.registry import Role, ServiceOptions, start_service

log = logging.getLogger("bitsmith.coordinator")

RAY_RESOURCES_ENV = "BITSMITH_RAY_RESOURCES"
"""JSON role -> Ray resources each worker actor asks for, e.g. '{"solver": {"GPU": 1}}' (default: none)."""
SOLVER_REPLICAS_ENV = "BITSMITH_SOLVER_REPLICAS"
"""How many solver replicas a Ray placement starts: a count, or "auto" (as many as the cluster has free of
what one asks: one per GPU for a solver that asks for {"GPU": 1}); default 1."""
ACTOR_START_TIMEOUT_S = 120.0
JOIN_ATTEMPTS = 4
"""Tries at joining a cluster: a head's Ray Client server starts a server per client, which fails now and
then on a loaded head ("Starting Ray client server failed") and succeeds on the next try."""


@dataclass(frozen=True, slots=True)
class Worker:
    """One solver replica: where it answers, the node it runs on and that node's labels."""

    address: str
    node: str = ""
    labels: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ServiceAddresses:
    """host:port of every worker role, and every solver replica (the first is `by_role[SOLVER]`)."""

    by_role: Mapping[Role, str]
    solvers: tuple[Worker, ...] = ()
    """Empty: the one solver at `by_role[SOLVER]`."""

    def __post_init__(self) -> None:
        missing = [r.value for r in Role if r not in self.by_role]
        if missing:
            raise ConfigError(f"no address for services {missing}")
        if not self.solvers:
            object.__setattr__(self, "solvers", (Worker(self.by_role[Role.SOLVER]),))

    def __getitem__(self, role: Role) -> str:
        return self.by_role[role]

    @classmethod
    def parse(cls, spec: str) -> ServiceAddresses:
        """From "calibrator=host:port,solver=host:port,packer=...,runtime_cpu=..."; `solver=` may repeat
        (one entry per replica), no other role may."""
        by_role: dict[Role, str] = {}
        solvers: list[Worker] = []
        for item in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, address = item.partition("=")
            if not sep or not address:
                raise ConfigError(f"expected role=host:port in --services, got {item!r}")
            try:
                role = Role(name)
            except ValueError as exc:
                raise ConfigError(f"unknown service role {name!r}; known: {[r.value for r in Role]}") from exc
            if role is Role.SOLVER:
                solvers.append(Worker(address))
            elif role in by_role:
                raise ConfigError(f"--services names {name} twice; only solver may have several replicas")
            by_role.setdefault(role, address)
        return cls(by_role, tuple(solvers))


class Placement(Protocol):
    def start(self) -> ServiceAddresses: ...
    def address(self, role: Role, replica: int = 0) -> str:
        """Where `role`'s service (its `replica`-th one: solvers have several) answers now (a restarted
        Ray actor listens on a new port)."""
        ...
    def stop(self) -> None: ...


@dataclass
class StaticPlacement:
    """Services someone else started; nothing to start or stop."""

    addresses: ServiceAddresses

    def start(self) -> ServiceAddresses:
        return self.addresses

    def address(self, role: Role, replica: int = 0) -> str:
        return self.addresses.solvers[replica].address if role is Role.SOLVER else self.addresses[role]

    def stop(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class ActorResources:
    """What one role's actor asks Ray for, in Ray's resource names ("CPU", "GPU" and custom ones).

    Ray places an actor only on a node that has what it asks for, so this is how an operator pins the
    solver and calibrator to GPU nodes (`{"GPU": 1}`, or a custom resource those nodes advertise). The
    default asks for nothing: every role fits anywhere, as on a laptop's local Ray.
    """

    amounts: Mapping[str, float] = field(default_factory=dict)

    def ray_options(self) -> dict[str, Any]:
        """`.options(...)` of the actor: Ray takes CPU and GPU as arguments of their own."""
        custom = {name: n for name, n in self.amounts.items() if name not in ("CPU", "GPU")}
        return {"num_cpus": self.amounts.get("CPU", 0), "num_gpus": self.amounts.get("GPU", 0),
                "resources": custom}


def parse_role_resources(spec: str) -> dict[Role, ActorResources]:
    """From JSON such as '{"solver": {"GPU": 1, "bitsmith_gpu_node": 1}, "packer": {"CPU": 1}}'."""
    if not spec.strip():
        return {}
    try:
        by_role = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{RAY_RESOURCES_ENV} is not JSON: {exc}") from exc
    if not isinstance(by_role, dict):
        raise ConfigError(f"{RAY_RESOURCES_ENV} must map roles to resources, got {spec!r}")
    parsed: dict[Role, ActorResources] = {}
    for name, amounts in by_role.items():
        try:
            role = Role(name)
        except ValueError as exc:
            raise ConfigError(f"{RAY_RESOURCES_ENV} names unknown role {name!r}; known: {[r.value for r in Role]}"
                              ) from exc
        if not isinstance(amounts, dict) or not all(
                isinstance(n, int | float) and not isinstance(n, bool) and n >= 0 for n in amounts.values()):
            raise ConfigError(f"{RAY_RESOURCES_ENV}: {name} needs {{resource: amount >= 0, ...}}, got {amounts!r}")
        parsed[role] = ActorResources({str(r): float(n) for r, n in amounts.items()})
    return parsed


def role_resources_from_env() -> dict[Role, ActorResources]:
    """The operator's per-role requirements, from the environment so every entry point (`bitsmith up`,
    `bitsmith serve coordinator`, a container's ConfigMap) takes them without a flag of its own."""
    return parse_role_resources(os.environ.get(RAY_RESOURCES_ENV, ""))


def _join(ray: Any, kwargs: dict[str, Any], address: str | None) -> None:
    """`ray.init`, tried again (after 2, 4, 8 s) while the cluster refuses the connection."""
    for attempt in range(1, JOIN_ATTEMPTS + 1):
        try:
            ray.init(**kwargs)
            return
        except ConnectionError as exc:
            if attempt == JOIN_ATTEMPTS:
                raise ServiceUnavailableError(
                    f"cannot join the Ray cluster at {address} ({attempt} tries): {exc}") from exc
            log.warning("joining the Ray cluster failed; trying again",
                        extra={"address": address, "attempt": attempt, "reason": str(exc)[:300]})
            ray.shutdown()
            time.sleep(2 ** attempt)


def _counts_free(spec: str) -> bool:
    """Whether a solver replica `spec` is "auto" (any case or spacing): a count of the cluster's free resources."""
    return spec.strip().lower() == "auto"


def solver_replicas(spec: str, resources: ActorResources, free: Mapping[str, float]) -> int:
    """How many solver replicas to start: `spec` is a count, or "auto": as many as the cluster's `free`
    resources hold of what one replica asks (`{"GPU": 1}`: one per free GPU), at least one. A solver that
    asks for nothing gets one replica: nothing tells how many it should have."""
    if _counts_free(spec):
        asked = {name: amount for name, amount in resources.amounts.items() if amount > 0}
        return max(1, min(int(free.get(name, 0) // amount) for name, amount in asked.items())) if asked else 1
    return positive_int(spec, SOLVER_REPLICAS_ENV, "count (or 'auto')")


def _node_labels(nodes: list[dict[str, Any]]) -> dict[str, frozenset[str]]:
    """Each live node's labels, by node id: its Ray labels as "key=value" and its resources' names
    (custom ones, "accelerator_type:<GPU>", "node:<ip>"), which jobs name to pin their solves."""
    generic = {"CPU", "GPU", "memory", "object_store_memory"}
    return {str(n["NodeID"]): frozenset({f"{k}={v}" for k, v in (n.get("Labels") or {}).items()}
                                        | {r for r in n.get("Resources", {}) if r not in generic})
            for n in nodes if n.get("Alive")}


class ServiceHost:
    """Hosts one worker service's gRPC server inside a Ray actor (wrapped with ray.remote at the edge)."""

    def __init__(self, role: str, store_root: str, threads: int, security: SecurityConfig | None = None,
                 options: ServiceOptions | None = None) -> None:
        import ray

        # Ray starts a zero-CPU actor with OMP_NUM_THREADS=1; the services compute in torch, which reads
        # it on first import (lazily, in the first request), so give them the threads they are meant to use.
        os.environ["OMP_NUM_THREADS"] = str(threads)
        host = ray.util.get_node_ip_address()
        self._server, port = start_service(role, f"{host}:0", Path(store_root), options=options, security=security)
        self._address = f"{host}:{port}"

    def address(self) -> str:
        return self._address

    def node_id(self) -> str:
        """The Ray node this actor runs on (where its resources were found)."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def stop(self) -> None:
        self._server.stop(grace=2).wait()


def _suffix(role: Role, replica: int) -> str:
    """How a replica's actor and messages tell it apart: solvers are numbered, the other roles have one."""
    return f"-{replica}" if role is Role.SOLVER else ""


@dataclass
class RayPlacement:
    """Start the worker services as Ray actors: a local in-process Ray, or an existing cluster."""

    store_root: Path
    ray_address: str | None = None
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Compute threads of each service (torch's intra-op pool); a role that asks for CPUs computes on those."""
    resources: Mapping[Role, ActorResources] = field(default_factory=role_resources_from_env)
    """What each role's actor asks Ray for (default: $BITSMITH_RAY_RESOURCES, else nothing)."""
    security: SecurityConfig | None = None
    """Secures every service it starts (its files must be readable where the actors run)."""
    options: ServiceOptions = field(default_factory=ServiceOptions)
    """How the services it starts compute (device, the calibrator's activations and matmul precision)."""
    solver_replicas: str = field(default_factory=lambda: os.environ.get(SOLVER_REPLICAS_ENV, "1"))
    """Solver replicas to start: a count or "auto" (see `solver_replicas`); default $BITSMITH_SOLVER_REPLICAS,
    else 1."""
    _actors: dict[Role, list[Any]] = field(default_factory=dict)
    _started_ray: bool = False
    _id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def start(self) -> ServiceAddresses:
        try:
            import ray
        except ImportError as exc:
            raise ConfigError(
                "Ray is not installed here: start the services with `bitsmith serve <service>` and pass "
                "their addresses with --services"
            ) from exc
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
            if self.ray_address:
                kwargs["address"] = self.ray_address
            else:
                kwargs.update(include_dashboard=False, _node_ip_address="127.0.0.1",
                              num_cpus=os.cpu_count() or 1)
            _join(ray, kwargs, self.ray_address)
            self._started_ray = True
        labels = _node_labels(ray.nodes())
        host: Any = ray.remote(ServiceHost)
        # Each actor imports torch and its service's code as it starts (seconds each), so actors start
        # together and are waited for together; only "auto" replicas wait for the other roles' actors, to
        # count what is left beside them.
        others: list[tuple[Role, int]] = [(role, 0) for role in Role if role is not Role.SOLVER]
        if _counts_free(self.solver_replicas):
            started = self._start_actors(ray, host, others)
            started |= self._start_actors(ray, host, self._solvers(ray))
        else:
            started = self._start_actors(ray, host, others + self._solvers(ray))
        solvers = {key: value for key, value in started.items() if key[0] is Role.SOLVER}
        by_role: dict[Role, str] = {role: address for (role, _), (address, _) in started.items()
                                    if role is not Role.SOLVER}
        by_role[Role.SOLVER] = solvers[Role.SOLVER, 0][0]
        return ServiceAddresses(by_role, tuple(Worker(address, node, labels.get(node, frozenset()))
                                               for address, node in solvers.values()))

    def _solvers(self, ray: Any) -> list[tuple[Role, int]]:
        """The solver replicas to start, as (role, replica) keys."""
        count = solver_replicas(self.solver_replicas, self.resources.get(Role.SOLVER, ActorResources()),
                                ray.available_resources())
        return [(Role.SOLVER, replica) for replica in range(count)]

    def _start_actors(self, ray: Any, host: Any, replicas: list[tuple[Role, int]]
                      ) -> dict[tuple[Role, int], tuple[str, str]]:
        """Start an actor of each (role, replica) from `host` (`ServiceHost` as a Ray actor class), all at
        once; each one's address and the node it landed on, once every one of them serves."""
        pending = {}
        for role, replica in replicas:
            options = self.resources.get(role, ActorResources()).ray_options()
            threads = int(options["num_cpus"]) or self.threads
            # Named for operators (`ray list actors`), unique per placement so stacks can share a cluster.
            actor = host.options(**options, max_restarts=-1, max_task_retries=-1,
                                 name=f"bitsmith-{role.value}{_suffix(role, replica)}-{self._id}").remote(
                role.value, str(self.store_root), threads, self.security, self.options.for_role(role)
            )
            self._actors.setdefault(role, []).append(actor)
            pending[role, replica] = (options, [actor.address.remote(), actor.node_id.remote()])
        deadline = time.monotonic() + ACTOR_START_TIMEOUT_S
        started = {}
        for (role, replica), (options, refs) in pending.items():
            try:
                address, node = ray.get(refs, timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError as exc:
                raise ServiceUnavailableError(
                    f"the {role.value} service{_suffix(role, replica)} did not start within "
                    f"{ACTOR_START_TIMEOUT_S:.0f} s; it asks Ray for {options}: does a node of the cluster have "
                    "that free?") from exc
            log.info("service started", extra={"role": role.value, "replica": replica, "address": address,
                                               "node_id": node})
            started[role, replica] = (str(address), str(node))
        return started

    def address(self, role: Role, replica: int = 0) -> str:
        """The actor's address; while Ray restarts the actor this waits for the new one."""
        import ray

        return str(ray.get(self._actors[role][replica].address.remote(), timeout=ACTOR_START_TIMEOUT_S))

    def stop(self) -> None:
        import ray

        for actor in (a for actors in self._actors.values() for a in actors):
            try:
                ray.get(actor.stop.remote(), timeout=10)
            except Exception:  # the actor may already be gone; kill it regardless
                log.warning("service actor did not stop cleanly", exc_info=True)
            ray.kill(actor)
        self._actors.clear()
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
