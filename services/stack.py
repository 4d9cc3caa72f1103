"""A whole bitsmith stack in one process: the coordinator's JobService plus its worker services.

This is what `bitsmith quantize` starts when no --server is given (and stops afterwards), what
`bitsmith up` keeps running, and what `bitsmith serve coordinator` is. Workers run as Ray actors
by default (a local Ray, or `ray_address` to join a cluster), or at the addresses given. Beside its
gRPC address the coordinator opens an HTTP port (`http_address`): health, Prometheus metrics, job reports.
A `SecurityConfig` secures the coordinator and the workers it starts alike.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from bitsmith.errors import ConfigError, ServiceUnavailableError
from bitsmith.rpc.discovery import STACK_FILE
from bitsmith.rpc.security import ClientTls, SecurityConfig
from bitsmith_services.coordinator.placement import Placement, RayPlacement, ServiceAddresses, StaticPlacement
from bitsmith_services.registry import ServiceOptions


@dataclass
class LocalStack:
    home: Path
    host: str = "127.0.0.1"
    port: int = 0
    ray_address: str | None = None
    services: ServiceAddresses | None = None
    max_concurrent_jobs: int | None = None
    """Jobs running at once at most (None: one per solver replica; the queue places them by resources)."""
    http_port: int | None = 0
    """The coordinator's HTTP port (health, metrics, job reports) on `host`: 0 picks a free one, None opens none."""
    security: SecurityConfig | None = None
    """TLS, tokens and limits of the coordinator and the workers it starts (None: plaintext, open)."""
    options: ServiceOptions = field(default_factory=ServiceOptions)
    """How the workers it starts compute; workers at `services` run as they were started."""
    address: str = ""
    http_address: str | None = None
    _parts: list[Any] = field(default_factory=list)

    def start(self) -> str:
        from bitsmith_services.coordinator.server import create_server

        if self.services and self.options != ServiceOptions():
            raise ConfigError("workers at given addresses compute as they were started: pass --device, "
                              "--activations and --matmul-precision to their `bitsmith serve`, not the coordinator's")
        self.home.mkdir(parents=True, exist_ok=True)
        placement: Placement = (
            StaticPlacement(self.services) if self.services
            else RayPlacement(store_root=self.home / "store", ray_address=self.ray_address, security=self.security,
                              options=self.options)
        )
        try:
            server, port, coordinator = create_server(
                f"{self.host}:{self.port}", db_path=self.home / "jobs.sqlite", placement=placement,
                max_concurrent_jobs=self.max_concurrent_jobs, http_port=self.http_port, security=self.security,
            )
        except BaseException:
            placement.stop()
            raise
        self._parts = [server, coordinator, placement]
        self.address = f"{self.host}:{port}"
        self.http_address = coordinator.http_address
        return self.address

    def stop(self) -> None:
        if not self._parts:
            return
        server, coordinator, placement = self._parts
        server.stop(grace=5).wait()
        coordinator.shutdown()
        placement.stop()
        self._parts = []

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_stack(home: Path, timeout: float = 60.0) -> bool:
    """Stop the stack `bitsmith up` started; False if none was running."""
    path = home / STACK_FILE
    try:
        pid = int(json.loads(path.read_text())["pid"])
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError, KeyError):
        path.unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            path.unlink(missing_ok=True)
            return True
        time.sleep(0.2)
    raise ServiceUnavailableError(f"the bitsmith stack (pid {pid}) did not stop within {timeout:.0f} s")


def wait_until_serving(address: str, timeout: float, tls: ClientTls | None = None) -> None:
    """Block until the server at `address` answers its health check (over TLS, verified as `tls` says)."""
    from bitsmith.rpc.client import plain_channel
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    while True:
        try:
            with plain_channel(address, tls) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise ServiceUnavailableError(f"no bitsmith server answered at {address} within {timeout:.0f} s")
        time.sleep(0.3)


def parse_services(spec: str | None) -> ServiceAddresses | None:
    if not spec:
        return None
    if not spec.strip():
        raise ConfigError("--services is empty")
    return ServiceAddresses.parse(spec)
