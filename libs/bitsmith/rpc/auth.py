"""Bearer tokens on gRPC calls: the server's check (who is calling) and the client's attachment.

A caller sends `authorization: Bearer <token>` metadata; `AuthInterceptor` looks up the token's sha256
among the configured grants and runs the call with the grant as `caller()`, so a servicer asks who
calls without parsing metadata. A call without a known token ends with UNAUTHENTICATED and the reason
before any servicer code runs. Health checks stay open: load balancers and `bitsmith up` probe them
without credentials, and they reveal nothing but "serving".
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import grpc

from bitsmith.rpc.security import Grant, token_digest

AUTHORIZATION = "authorization"
OPEN_METHODS = ("/grpc.health.v1.Health/",)
"""Method prefixes every caller may call."""

_HANDLER_KINDS: dict[str, Callable[..., grpc.RpcMethodHandler]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}

_caller: contextvars.ContextVar[Grant | None] = contextvars.ContextVar("bitsmith_caller", default=None)


def caller() -> Grant | None:
    """The grant of the authenticated caller of the current call; None when the server authenticates nobody."""
    return _caller.get()


def bearer_token(metadata: Any) -> tuple[str | None, str]:
    """The token of `metadata`'s authorization entry, or None and why there is none."""
    values = [value for key, value in metadata or () if key == AUTHORIZATION]
    if not values:
        return None, "no credentials: send `authorization: Bearer <token>` metadata"
    scheme, _, token = str(values[0]).partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None, "the authorization metadata is not `Bearer <token>`"
    return token.strip(), ""


def _rebuild(handler: grpc.RpcMethodHandler, wrap: Callable[[Callable[..., Any], bool], Callable[..., Any]]
             ) -> grpc.RpcMethodHandler:
    """`handler` with its behavior wrapped (`wrap(behavior, streams_responses)`), of the same kind."""
    for kind, factory in _HANDLER_KINDS.items():
        behavior = getattr(handler, kind)
        if behavior is not None:
            return factory(wrap(behavior, kind.endswith("_stream")),
                           request_deserializer=handler.request_deserializer,
                           response_serializer=handler.response_serializer)
    return handler


def _refusing(reason: str) -> Callable[[Callable[..., Any], bool], Callable[..., Any]]:
    def wrap(behavior: Callable[..., Any], streams: bool) -> Callable[..., Any]:
        def refuse(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        return refuse

    return wrap


def _as(grant: Grant) -> Callable[[Callable[..., Any], bool], Callable[..., Any]]:
    """Run a behavior (and, for a stream, every step of its iterator) in a context where `caller()` is `grant`.

    A copied context rather than set/reset on the thread's own: the pool's threads serve other callers
    next, and a stream's steps must all see the grant however grpc schedules them.
    """
    def wrap(behavior: Callable[..., Any], streams: bool) -> Callable[..., Any]:
        def context_of_call() -> contextvars.Context:
            ctx = contextvars.copy_context()
            ctx.run(_caller.set, grant)
            return ctx

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            return context_of_call().run(behavior, request, context)

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            ctx = context_of_call()
            responses = ctx.run(behavior, request, context)
            while True:
                try:
                    yield ctx.run(next, responses)
                except StopIteration:
                    return

        return stream if streams else unary

    return wrap


class AuthInterceptor(grpc.ServerInterceptor):
    """Admits calls bearing a token whose sha256 is one of `grants` (health checks: everyone)."""

    def __init__(self, grants: Mapping[str, Grant]) -> None:
        self._grants = dict(grants)

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHODS):
            return handler
        token, reason = bearer_token(handler_call_details.invocation_metadata)
        # A dict lookup of the digest, not of the token: timing tells an attacker about the digest of
        # their guess at most, which brings them no closer to a listed token.
        grant = self._grants.get(token_digest(token)) if token is not None else None
        if grant is None:
            return _rebuild(handler, _refusing(reason or "unknown token"))
        return _rebuild(handler, _as(grant))


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a channel.

    An interceptor rather than `grpc.metadata_call_credentials`: call credentials need a TLS channel,
    and a stack without certificates still authenticates its callers (over a network its operator trusts).
    """

    def __init__(self, token: str) -> None:
        self._entry = (AUTHORIZATION, f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._entry]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)
