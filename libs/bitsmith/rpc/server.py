"""The one way bitsmith builds a gRPC server.

Every service gets the same things: a thread-pool server with bounded message sizes, the standard
health service (per service name) and server reflection, the error-mapping interceptor, and the
OpenTelemetry interceptor that continues the caller's trace. Under a `SecurityConfig` it also gets TLS
and the token check its callers call for: the JobService (`Callers.CLIENTS`) takes the clients' tokens
and the request size limit; a worker (`Callers.SERVICES`) takes only the coordinator, by its client
certificate (mTLS) and/or the service token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bitsmith.errors import ConfigError
from bitsmith.rpc.auth import AuthInterceptor
from bitsmith.rpc.security import SERVICE_CLIENT, Grant, SecurityConfig, TlsConfig, scoped, token_digest
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


class Callers(StrEnum):
    """Who a server answers: what decides its token check and whether it requires client certificates."""

    CLIENTS = "clients"
    """The JobService: users, by bearer token."""
    SERVICES = "services"
    """A worker service: the coordinator alone."""


def _auth(config: SecurityConfig, callers: Callers) -> AuthInterceptor | None:
    """The token check `callers` need under `config` (None: none; TLS alone decides, or nobody is checked)."""
    if callers is Callers.CLIENTS:
        return AuthInterceptor(config.tokens) if config.authenticates_clients else None
    token = config.service_token()
    if token is None:
        return None
    return AuthInterceptor({token_digest(token): Grant(client=SERVICE_CLIENT, project="", admin=True)})


def _credentials(tls: TlsConfig, callers: Callers) -> grpc.ServerCredentials:
    """The server's certificate; a worker under mTLS also demands the caller's, signed by `tls.client_ca`."""
    key, chain = tls.pem()
    mutual = callers is Callers.SERVICES and tls.client_ca is not None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=tls.client_ca_pem() if mutual else None,
                                       require_client_auth=mutual)


def create_server(
    address: str,
    bindings: Sequence[ServiceBinding],
    *,
    component: str,
    max_workers: int = 16,
    callers: Callers = Callers.SERVICES,
    security: SecurityConfig | None = None,
) -> tuple[grpc.Server, int]:
    """Build and start a server on `address` ("host:port"; port 0 picks a free one).

    `security` (default: the one `bitsmith.rpc.security.securing` put in force; none: plaintext and
    open) decides TLS and the token check for `callers`. Returns the started server and the bound port.
    """
    config = security if security is not None else scoped()
    interceptors: list[grpc.ServerInterceptor] = [*server_interceptors(f"bitsmith-{component}")]
    auth = _auth(config, callers) if config else None
    if auth is not None:
        interceptors.append(auth)
    interceptors.append(ErrorMappingInterceptor())
    max_request = MAX_MESSAGE_BYTES
    if config and callers is Callers.CLIENTS and config.limits.max_request_bytes:
        max_request = min(max_request, config.limits.max_request_bytes)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"bitsmith-{component}"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_request),
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
    if config and config.tls:
        port = server.add_secure_port(address, _credentials(config.tls, callers))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise ConfigError(f"cannot bind a gRPC server to {address!r}")
    server.start()
    return server, port
