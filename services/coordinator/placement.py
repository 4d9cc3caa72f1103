"""Where the worker services run: Ray actors (the default) or addresses the operator gives.

With Ray, each worker service is a gRPC server hosted inside a Ray actor, started with the resources
its role needs and restarted by Ray if it dies; the coordinator learns the actor's address and talks
gRPC to it like to any other server. Without Ray (a host where it is not installed, or a deployment
that places services itself), a static map of role -> address does the same job.
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
from bitsmith_services.registry import Role, start_service

log = logging.getLogger("bitsmith.coordinator")

RAY_RESOURCES_ENV = "BITSMITH_RAY_RESOURCES"
"""JSON role -> Ray resources each worker actor asks for, e.g. '{"solver": {"GPU": 1}}' (default: none)."""
ACTOR_START_TIMEOUT_S = 120.0
JOIN_ATTEMPTS = 4
"""Tries at joining a cluster: a head's Ray Client server starts a server per client, which fails now and
then on a loaded head ("Starting Ray client server failed") and succeeds on the next try."""


@dataclass(frozen=True, slots=True)
class ServiceAddresses:
    """host:port of every worker role."""

    by_role: Mapping[Role, str]

    def __post_init__(self) -> None:
        missing = [r.value for r in Role if r not in self.by_role]
        if missing:
            raise ConfigError(f"no address for services {missing}")

    def __getitem__(self, role: Role) -> str:
        return self.by_role[role]

    @classmethod
    def parse(cls, spec: str) -> ServiceAddresses:
        """From "calibrator=host:port,solver=host:port,packer=...,runtime_cpu=..."."""
        by_role: dict[Role, str] = {}
        for item in filter(None, (p.strip() for p in spec.split(","))):
            role, sep, address = item.partition("=")
            if not sep or not address:
                raise ConfigError(f"expected role=host:port in --services, got {item!r}")
            try:
                by_role[Role(role)] = address
            except ValueError as exc:
                raise ConfigError(f"unknown service role {role!r}; known: {[r.value for r in Role]}") from exc
        return cls(by_role)


class Placement(Protocol):
    def start(self) -> ServiceAddresses: ...
    def address(self, role: Role) -> str:
        """Where `role`'s service answers now (a restarted Ray actor listens on a new port)."""
        ...
    def stop(self) -> None: ...


@dataclass
class StaticPlacement:
    """Services someone else started; nothing to start or stop."""

    addresses: ServiceAddresses

    def start(self) -> ServiceAddresses:
        return self.addresses

    def address(self, role: Role) -> str:
        return self.addresses[role]

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


class ServiceHost:
    """Hosts one worker service's gRPC server inside a Ray actor (wrapped with ray.remote at the edge)."""

    def __init__(self, role: str, store_root: str, threads: int, security: SecurityConfig | None = None) -> None:
        import ray

        # Ray starts a zero-CPU actor with OMP_NUM_THREADS=1; the services compute in torch, which reads
        # it on first import (lazily, in the first request), so give them the threads they are meant to use.
        os.environ["OMP_NUM_THREADS"] = str(threads)
        host = ray.util.get_node_ip_address()
        self._server, port = start_service(role, f"{host}:0", Path(store_root), security=security)
        self._address = f"{host}:{port}"

    def address(self) -> str:
        return self._address

    def node_id(self) -> str:
        """The Ray node this actor runs on (where its resources were found)."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def stop(self) -> None:
        self._server.stop(grace=2).wait()


@dataclass
class RayPlacement:
    """Start the worker services as Ray actors: a local in-process Ray, or an existing cluster."""

    store_root: Path
    ray_address: str | None = None
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Compute threads of each service (torch's intra-op pool); a role that asks for CPUs computes on those."""
    resources: Mapping[Role, ActorResources] = field(default_factory=role_resources_from_env)
    """What each role's actor asks Ray for (default: $BITSMITH_RAY_RESOURCES, else nothing)."""
    nodes: dict[Role, str] = field(default_factory=dict)
    """The Ray node id each role's actor landed on, once started."""
    security: SecurityConfig | None = None
    """Secures every service it starts (its files must be readable where the actors run)."""
    _actors: dict[Role, Any] = field(default_factory=dict)
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
        host_cls: Any = ray.remote(ServiceHost)
        by_role: dict[Role, str] = {}
        for role in Role:
            options = self.resources.get(role, ActorResources()).ray_options()
            threads = int(options["num_cpus"]) or self.threads
            # Named for operators (`ray list actors`), unique per placement so stacks can share a cluster.
            actor = host_cls.options(**options, max_restarts=-1, max_task_retries=-1,
                                     name=f"bitsmith-{role.value}-{self._id}").remote(
                role.value, str(self.store_root), threads, self.security
            )
            self._actors[role] = actor
            try:
                by_role[role], self.nodes[role] = ray.get([actor.address.remote(), actor.node_id.remote()],
                                                          timeout=ACTOR_START_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError as exc:
                raise ServiceUnavailableError(
                    f"the {role.value} service did not start within {ACTOR_START_TIMEOUT_S:.0f} s; it asks Ray for "
                    f"{options}: does a node of the cluster have that free?") from exc
            log.info("service started",
                     extra={"role": role.value, "address": by_role[role], "node_id": self.nodes[role]})
        return ServiceAddresses(by_role)

    def address(self, role: Role) -> str:
        """The role's actor's address; while Ray restarts the actor this waits for the new one."""
        import ray

        return str(ray.get(self._actors[role].address.remote(), timeout=ACTOR_START_TIMEOUT_S))

    def stop(self) -> None:
        import ray

        for actor in self._actors.values():
            try:
                ray.get(actor.stop.remote(), timeout=10)
            except Exception:  # the actor may already be gone; kill it regardless
                log.warning("service actor did not stop cleanly", exc_info=True)
            ray.kill(actor)
        self._actors.clear()
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
