"""Server interceptor: BitsmithError -> gRPC status with a readable reason.

Every service installs it, so a servicer method simply raises `ConfigError("...")` and the caller
sees `INVALID_ARGUMENT: ...`; a failed call to another service passes on that service's status.
A disk that is full or will not be written (the store, an output directory) is not a bug but the
machine's state: `RESOURCE_EXHAUSTED` or `FAILED_PRECONDITION` naming the path. Anything else that is
not a BitsmithError is a bug: it is logged with its traceback and reported as INTERNAL with the
exception's type and message, never swallowed.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from bitsmith.errors import BitsmithError

log = logging.getLogger("bitsmith.rpc")


STORAGE_FULL = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large"}
STORAGE_REFUSED = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                   errno.EPERM: "operation not permitted"}


def status_code(error: BitsmithError) -> grpc.StatusCode:
    """The gRPC status code an error names."""
    return getattr(grpc.StatusCode, error.grpc_code, grpc.StatusCode.INTERNAL)


def storage_status(exc: OSError) -> tuple[grpc.StatusCode, str] | None:
    """The status of a write the disk refused (full, or not writable), None for any other OSError."""
    where = f" writing {exc.filename}" if exc.filename else ""
    if exc.errno in STORAGE_FULL:
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"storage full{where}: {STORAGE_FULL[exc.errno]}"
    if exc.errno in STORAGE_REFUSED:
        return grpc.StatusCode.FAILED_PRECONDITION, f"storage not writable{where}: {STORAGE_REFUSED[exc.errno]}"
    return None


def _abort(context: grpc.ServicerContext, exc: Exception, method: str) -> None:
    if context.code() is not None:
        raise exc  # the servicer aborted with its own status already
    if isinstance(exc, BitsmithError):
        context.abort(status_code(exc), str(exc))
    if isinstance(exc, grpc.Call):
        # A call this servicer made to another service failed: pass its status and reason on.
        context.abort(exc.code(), exc.details() or "")
    if isinstance(exc, OSError) and (storage := storage_status(exc)) is not None:
        log.warning("storage refused a write in %s: %s", method, storage[1])
        context.abort(*storage)
    log.exception("unexpected error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def _wrap_unary(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except Exception as exc:
            _abort(context, exc, method)
            raise  # unreachable: abort raises

    return wrapper


def _wrap_stream(behavior: Callable[..., Iterator[Any]], method: str) -> Callable[..., Iterator[Any]]:
    def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behavior(request, context)
        except Exception as exc:
            _abort(context, exc, method)

    return wrapper


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Maps exceptions raised by unary-unary and unary-stream handlers to statuses."""

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
