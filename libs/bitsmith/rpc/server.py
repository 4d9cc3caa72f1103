"""The one way bitsmith builds a gRPC server.

Every service gets the same things: a thread-pool server with bounded message sizes, the standard
health service (per service name) and server reflection, the error-mapping interceptor, and the
OpenTelemetry interceptor that continues the caller's trace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bitsmith.errors import ConfigError
from bitsmith.rpc.status import ErrorMappingInterceptor
from bitsmith.telemetry import server_interceptors

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Messages carry references, never tensors, so anything near this size is a misuse or an attack."""


@dataclass(frozen=True, slots=True)
class ServiceBinding:
    """A servicer, the function that adds it to a server, and its full proto service name."""

    servicer: object
    add_to_server: Callable[[Any, grpc.Server], None]
    service_name: str

    @classmethod
    def of(cls, servicer: object, pb2: Any, pb2_grpc: Any, service: str) -> ServiceBinding:
        """The binding of `servicer` for proto service `service`, found in its generated modules."""
        return cls(servicer, getattr(pb2_grpc, f"add_{service}Servicer_to_server"),
                   pb2.DESCRIPTOR.services_by_name[service].full_name)


def create_server(
    address: str,
    bindings: Sequence[ServiceBinding],
    *,
    component: str,
    max_workers: int = 16,
) -> tuple[grpc.Server, int]:
    """Build and start a server on `address` ("host:port"; port 0 picks a free one).

    Returns the started server and the bound port.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"bitsmith-{component}"),
        interceptors=[*server_interceptors(f"bitsmith-{component}"), ErrorMappingInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for binding in bindings:
        binding.add_to_server(binding.servicer, server)
        health_servicer.set(binding.service_name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    names = [b.service_name for b in bindings] + [health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise ConfigError(f"cannot bind a gRPC server to {address!r}")
    server.start()
    return server, port
