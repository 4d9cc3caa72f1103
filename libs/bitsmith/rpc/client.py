"""Client-side channels: traced, size-bounded, and checked for reachability up front.

An unreachable address fails fast with `ServiceUnavailableError` naming it, instead of every later
call hanging until its deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

import grpc

from bitsmith.errors import (
    AlreadyExistsError,
    BitsmithError,
    ConfigError,
    NotFoundError,
    ServiceUnavailableError,
    UnsupportedError,
)
from bitsmith.rpc.server import MAX_MESSAGE_BYTES
from bitsmith.telemetry import traced_channel

if TYPE_CHECKING:
    from bitsmith.v1 import common_pb2, job_pb2

T = TypeVar("T")
CONNECT_TIMEOUT_S = 10.0


def open_channel(address: str, *, component: str = "client", connect_timeout: float = CONNECT_TIMEOUT_S
                 ) -> grpc.Channel:
    """A traced channel to `address`, after waiting up to `connect_timeout` for it to be ready."""
    channel = grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    try:
        grpc.channel_ready_future(channel).result(timeout=connect_timeout)
    except grpc.FutureTimeoutError as exc:
        channel.close()
        raise ServiceUnavailableError(
            f"cannot reach a bitsmith service at {address} within {connect_timeout:.0f} s"
        ) from exc
    return traced_channel(channel, f"bitsmith-{component}")


class Client:
    """A JobService client: submit, follow, cancel and list jobs.

    >>> client = Client("localhost:50051")          # doctest: +SKIP
    >>> job = client.submit(spec)                     # doctest: +SKIP
    >>> for event in client.watch(job.job_id): ...    # doctest: +SKIP
    """

    def __init__(self, address: str, *, timeout: float = 60.0) -> None:
        from bitsmith.v1 import job_pb2_grpc

        self.address = address
        self._timeout = timeout
        self._channel = open_channel(address, component="client")
        self._stub = job_pb2_grpc.JobServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, spec: job_pb2.QuantizeJob) -> job_pb2.Job:
        from bitsmith.v1 import job_pb2

        return _call(self._stub.Submit, job_pb2.SubmitRequest(job=spec), self._timeout)

    def get(self, job_id: str) -> job_pb2.Job:
        from bitsmith.v1 import job_pb2

        return _call(self._stub.Get, job_pb2.GetJobRequest(job_id=job_id), self._timeout)

    def cancel(self, job_id: str) -> job_pb2.Job:
        from bitsmith.v1 import job_pb2

        return _call(self._stub.Cancel, job_pb2.CancelJobRequest(job_id=job_id), self._timeout)

    def list(self, limit: int = 100) -> list[job_pb2.Job]:
        from bitsmith.v1 import job_pb2

        return list(_call(self._stub.List, job_pb2.ListJobsRequest(limit=limit), self._timeout).jobs)

    def watch(self, job_id: str, after_sequence: int = 0) -> Iterator[common_pb2.ProgressEvent]:
        """Every progress event of the job until it ends (no deadline: jobs take as long as they take)."""
        from bitsmith.v1 import job_pb2

        try:
            yield from self._stub.Watch(job_pb2.WatchJobRequest(job_id=job_id, after_sequence=after_sequence))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc


_CODE_TO_ERROR: dict[grpc.StatusCode, type[BitsmithError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: ConfigError,
    grpc.StatusCode.FAILED_PRECONDITION: UnsupportedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailableError,
}


def error_from_rpc(exc: grpc.RpcError) -> BitsmithError:
    """The library error a failed call stands for, with the server's reason as its message."""
    code = exc.code()
    cls = _CODE_TO_ERROR.get(code, BitsmithError)
    return cls(f"{code.name}: {exc.details()}")


def _call(method: Callable[..., T], request: object, timeout: float) -> T:
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from exc
