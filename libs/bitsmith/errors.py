"""The one error hierarchy of bitsmith.

Every error names the gRPC status code it maps to (as a string, so this module imports no grpc);
`bitsmith.rpc.status` turns them into statuses on the wire, and the CLI prints their message. Callers
can tell bad input (`ConfigError`, `FormatError`) from an unsupported request (`UnsupportedError`)
from a numerical failure (`CalibrationError`, `SolverError`) without parsing messages.
"""

from __future__ import annotations


class BitsmithError(Exception):
    """Base of every error bitsmith raises on purpose."""

    grpc_code: str = "INTERNAL"


class ConfigError(BitsmithError):
    """A request, recipe, scheme or path is invalid as given."""

    grpc_code = "INVALID_ARGUMENT"


class FormatError(BitsmithError):
    """A file (checkpoint, artifact, data) is malformed, truncated or inconsistent."""

    grpc_code = "INVALID_ARGUMENT"


class UnsupportedError(BitsmithError):
    """Valid input that bitsmith does not handle (an unknown architecture, an unsupported grid)."""

    grpc_code = "FAILED_PRECONDITION"


class NotFoundError(BitsmithError):
    """A job, artifact, tensor or file that does not exist."""

    grpc_code = "NOT_FOUND"


class AlreadyExistsError(BitsmithError):
    """A destination that must be new (or empty) already holds something."""

    grpc_code = "ALREADY_EXISTS"


class CalibrationError(BitsmithError):
    """Calibration could not produce usable statistics (no tokens, NaN activations)."""

    grpc_code = "FAILED_PRECONDITION"


class SolverError(BitsmithError):
    """A solve failed numerically (a Hessian that no damping makes positive definite)."""

    grpc_code = "FAILED_PRECONDITION"


class GateFailedError(BitsmithError):
    """The quantized model missed a quality gate of the job; the message carries the numbers."""

    grpc_code = "FAILED_PRECONDITION"


class CancelledError(BitsmithError):
    """The job was cancelled while this work ran."""

    grpc_code = "CANCELLED"


class ServiceUnavailableError(BitsmithError):
    """A service bitsmith needs could not be reached."""

    grpc_code = "UNAVAILABLE"


class UnauthenticatedError(BitsmithError):
    """A call that carries no credentials, or ones the server does not know."""

    grpc_code = "UNAUTHENTICATED"


class PermissionDeniedError(BitsmithError):
    """A known caller asking for what its project may not touch (another project's job, a path outside its roots)."""

    grpc_code = "PERMISSION_DENIED"


class ResourceExhaustedError(BitsmithError):
    """A request over one of the server's limits (jobs per client, model size, request size)."""

    grpc_code = "RESOURCE_EXHAUSTED"


class UnplaceableError(BitsmithError):
    """A job the cluster can never run as asked (more solver replicas than it has, a node label none has)."""

    grpc_code = "FAILED_PRECONDITION"
