"""The Python SDK's front door, and the client-side channel every bitsmith caller opens.

`Client(address).quantize(...)` submits a job described by typed dataclasses (`bitsmith.rpc.request`)
and returns a `Job` (`bitsmith.rpc.job`) to watch, wait on or cancel. With no address the client
connects to the stack `bitsmith up` left running (`bitsmith.rpc.discovery`). Channels are traced,
size-bounded and checked for reachability up front: an unreachable address fails fast with
`ServiceUnavailableError` naming it, instead of every later call hanging until its deadline. A stack
secured by a `SecurityConfig` (docs/security.md) takes `token=` (sent as a bearer token on every call)
and `tls=ClientTls(ca=...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc

from bitsmith.errors import (
    AlreadyExistsError,
    BitsmithError,
    ConfigError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ServiceUnavailableError,
    UnauthenticatedError,
    UnsupportedError,
)
from bitsmith.recipes import Recipe
from bitsmith.rpc.auth import BearerToken
from bitsmith.rpc.discovery import default_home, running_stack
from bitsmith.rpc.job import Job, JobState
from bitsmith.rpc.request import (
    Calibration,
    CheckpointFormat,
    Evaluation,
    OutputFormat,
    QuantizeRequest,
    StrPath,
)
from bitsmith.rpc.security import ClientTls, scoped
from bitsmith.rpc.server import MAX_MESSAGE_BYTES
from bitsmith.telemetry import traced_channel

if TYPE_CHECKING:
    from bitsmith.v1 import common_pb2, job_pb2

T = TypeVar("T")
CONNECT_TIMEOUT_S = 10.0


def plain_channel(address: str, tls: ClientTls | None = None,
                  options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A bare channel: TLS verified with `tls.ca` (system roots without), presenting `tls.cert`, expecting
    `tls.server_name` in the server's certificate when given; plaintext when `tls` is None."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    ca, key, cert = tls.pem()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    if tls.server_name:
        options = [*options, ("grpc.ssl_target_name_override", tls.server_name)]
    return grpc.secure_channel(address, credentials, options=list(options))


def open_channel(address: str, *, component: str = "client", connect_timeout: float = CONNECT_TIMEOUT_S,
                 tls: ClientTls | None = None, token: str | None = None) -> grpc.Channel:
    """A traced channel to `address`, after waiting up to `connect_timeout` for it to be ready.

    `tls` makes it a TLS channel (verifying the server with `tls.ca`, presenting `tls.cert` for mTLS);
    `token` goes with every call as `authorization: Bearer <token>`. Given neither, a channel opened
    inside `securing(config)` (the coordinator's to its workers) uses the config's client certificate
    and service token.
    """
    config = scoped()
    if tls is None and token is None and config is not None:
        tls = config.tls.client if config.tls else None
        token = config.service_token()
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    channel = plain_channel(address, tls, options)
    try:
        grpc.channel_ready_future(channel).result(timeout=connect_timeout)
    except grpc.FutureTimeoutError as exc:
        channel.close()
        hint = "" if tls is None else " (over TLS: does the server speak TLS, with a certificate the CA signed?)"
        raise ServiceUnavailableError(
            f"cannot reach a bitsmith service at {address} within {connect_timeout:.0f} s{hint}"
        ) from exc
    if token is not None:
        channel = grpc.intercept_channel(channel, BearerToken(token))
    return traced_channel(channel, f"bitsmith-{component}")


class JobServiceCalls:
    """The JobService's calls on wire messages, with failures mapped to bitsmith errors.

    What `Job` and `Client` are built on; use it directly only for what the typed API does not cover
    (a hand-made `QuantizeJob`, say, to see how the server treats it).
    """

    def __init__(self, channel: grpc.Channel, timeout: float) -> None:
        from bitsmith.v1 import job_pb2_grpc

        self._stub = job_pb2_grpc.JobServiceStub(channel)
        self._timeout = timeout

    def submit(self, spec: job_pb2.QuantizeJob) -> job_pb2.Job:
        from bitsmith.v1 import job_pb2

        return _call(self._stub.Submit, job_pb2.SubmitRequest(job=spec), self._timeout)

    def get(self, job_id: str) -> job_pb2.Job:
        from bitsmith.v1 import job_pb2

        return _call(self._stub.Get, job_pb2.GetJobRequest(job_id=job_id), self._timeout)

    def cancel(self, job_id: str) -> job_pb2.Job:
        from bitsmith.v1 import job_pb2

        return _call(self._stub.Cancel, job_pb2.CancelJobRequest(job_id=job_id), self._timeout)

    def list(self, states: Sequence[common_pb2.JobState] = (), limit: int = 100) -> list[job_pb2.Job]:
        from bitsmith.v1 import job_pb2

        reply = _call(self._stub.List, job_pb2.ListJobsRequest(states=states, limit=limit), self._timeout)
        return list(reply.jobs)

    def watch(self, job_id: str, *, after_sequence: int = 0, timeout: float | None = None
              ) -> Iterator[common_pb2.ProgressEvent]:
        """The job's progress events until it ends: no deadline unless `timeout` (jobs take as long as
        they take), past which `TimeoutError`."""
        from bitsmith.v1 import job_pb2

        stream = self._stub.Watch(job_pb2.WatchJobRequest(job_id=job_id, after_sequence=after_sequence),
                                  timeout=timeout)
        try:
            yield from stream
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
                raise TimeoutError(f"job {job_id} did not end within {timeout:g} s") from None
            raise error_from_rpc(exc) from exc
        finally:
            if isinstance(stream, grpc.Call):  # (a traced channel hands back a generator, closed with ours)
                stream.cancel()  # a caller that stops reading early ends the server's stream too


class Client:
    """A JobService client: quantize, follow, cancel and list jobs.

    `address` is HOST:PORT of a JobService; None connects to the stack `bitsmith up` left running in
    `$BITSMITH_HOME` (default ~/.bitsmith). Use it as a context manager to close the channel. A secured
    stack wants `token` (the bearer token its config lists the sha256 of) and, over TLS, `tls`.

    >>> with Client() as client:                                              # doctest: +SKIP
    ...     job = client.quantize("model/", out="out/q", calibration=Calibration(files=["calib.txt"]))
    ...     print(job.wait().artifacts)
    """

    def __init__(self, address: str | None = None, *, timeout: float = 60.0, token: str | None = None,
                 tls: ClientTls | None = None) -> None:
        if address is None:
            home = default_home()
            address = running_stack(home)
            if address is None:
                raise ServiceUnavailableError(
                    f"no bitsmith stack is running in {home}: start one with `bitsmith up` (BITSMITH_HOME picks "
                    "the home) or name a server's HOST:PORT"
                )
        self.address = address
        self._channel = open_channel(address, component="client", tls=tls, token=token)
        self.calls = JobServiceCalls(self._channel, timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def quantize(
        self,
        model: StrPath,
        *,
        out: StrPath,
        recipe: Recipe | StrPath | None = None,
        calibration: Calibration | None = None,
        formats: Iterable[OutputFormat | str] = ("gptq",),
        evaluation: Evaluation | None = None,
        request_id: str | None = None,
        checkpoint_format: CheckpointFormat | str = CheckpointFormat.AUTO,
    ) -> Job:
        """Submit a job quantizing the checkpoint directory `model` into `out`; returns at once.

        `recipe` is a `Recipe` or a YAML recipe file (default: GPTQ w4 g128 asymmetric); `formats` are
        `OutputFormat`s or their text ("gptq", "onnx", "gguf:Q4_K_M"). The request is checked before
        anything is sent (`ConfigError` naming the bad field); the server checks the rest (the model,
        the files, the output path) before it queues the job.
        """
        if recipe is None:
            recipe = Recipe()
        elif not isinstance(recipe, Recipe):
            recipe = Recipe.from_yaml(Path(recipe))
        if isinstance(formats, str):
            formats = [formats]
        request = QuantizeRequest(
            model=model, out=out, recipe=recipe, calibration=calibration,
            formats=tuple(OutputFormat.parse(f) if isinstance(f, str) else f for f in formats),
            evaluation=evaluation, request_id=request_id, checkpoint_format=checkpoint_format,
        )
        return self.submit(request)

    def submit(self, request: QuantizeRequest) -> Job:
        """Submit a job; resubmitting a `request_id` returns the job it first made."""
        return Job(self.calls, self.calls.submit(request.to_proto()))

    def job(self, job_id: str) -> Job:
        """The job `job_id` (`NotFoundError` if the server has none)."""
        return Job(self.calls, self.calls.get(job_id))

    def jobs(self, states: Iterable[JobState | str] = (), limit: int = 100) -> list[Job]:
        """The newest `limit` jobs, in any of `states` (default: all)."""
        try:
            wanted = [JobState(s).to_proto() for s in states]
        except ValueError as exc:
            raise ConfigError(f"{exc}; known states: {[s.value for s in JobState]}") from None
        return [Job(self.calls, j) for j in self.calls.list(wanted, limit)]


_CODE_TO_ERROR: dict[grpc.StatusCode, type[BitsmithError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: ConfigError,
    grpc.StatusCode.FAILED_PRECONDITION: UnsupportedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
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
