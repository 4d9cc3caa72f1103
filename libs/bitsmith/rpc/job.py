"""A submitted job as Python sees it: typed state, progress events, artifacts and their metrics.

`Job` wraps the JobService's `Job` message and the calls that follow it (`refresh`, `watch`, `wait`,
`cancel`), so SDK users read dataclasses and enums instead of protobuf. The message itself stays
reachable as `Job.proto` for what has no typed view (the job report takes it whole).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from bitsmith.errors import BitsmithError
from bitsmith.rpc.convert import eval_result_from_proto
from bitsmith.runtimes import DatasetResult as EvalResult
from bitsmith.schemes import Format

if TYPE_CHECKING:
    from google.protobuf.timestamp_pb2 import Timestamp

    from bitsmith.rpc.client import JobServiceCalls
    from bitsmith.v1 import common_pb2, job_pb2


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Whether the job has ended (it never changes state again)."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    @classmethod
    def from_proto(cls, value: int) -> JobState:
        from bitsmith.v1 import common_pb2

        return cls(common_pb2.JobState.Name(value).removeprefix("JOB_STATE_").lower())

    def to_proto(self) -> common_pb2.JobState:
        from bitsmith.v1 import common_pb2

        return common_pb2.JobState.Value(f"JOB_STATE_{self.name}")


class JobFailedError(BitsmithError):
    """`Job.wait` found the job failed or cancelled; `job` is its final record, `str()` the server's reason."""

    grpc_code = "FAILED_PRECONDITION"

    def __init__(self, job: Job) -> None:
        reason = job.error or ("cancelled" if job.state is JobState.CANCELLED else "no reason given")
        super().__init__(f"job {job.id} {job.state.value}: {reason}")
        self.job = job


def _time(stamp: Timestamp) -> datetime | None:
    return stamp.ToDatetime(tzinfo=UTC) if stamp.seconds or stamp.nanos else None


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgressEvent:
    """One step of a job: its `phase` ("queued", "calibrate", "solve", "pack", "evaluate", "publish",
    "done"), the decoder `block` it concerns (None when not block-wise), and `step` of `total_steps`
    finished in the whole job (total 0 while unknown)."""

    sequence: int
    state: JobState
    phase: str
    block: int | None
    num_blocks: int
    step: int
    total_steps: int
    message: str
    time: datetime | None

    @classmethod
    def from_proto(cls, msg: common_pb2.ProgressEvent) -> ProgressEvent:
        return cls(sequence=msg.sequence, state=JobState.from_proto(msg.state), phase=msg.phase,
                   block=msg.block if msg.block >= 0 else None, num_blocks=msg.num_blocks,
                   step=msg.step, total_steps=msg.total_steps, message=msg.message, time=_time(msg.time))


@dataclass(frozen=True, slots=True, kw_only=True)
class Artifact:
    """One written artifact: where it is, what its manifest digests to, and how good it is."""

    format: Format
    variant: str | None
    path: Path
    bytes: int
    sha256: str
    bits_per_weight: float | None
    metrics: tuple[EvalResult, ...]

    @classmethod
    def from_proto(cls, msg: common_pb2.Artifact) -> Artifact:
        from bitsmith.rpc.convert import format_from_proto

        return cls(format=format_from_proto(msg.format), variant=msg.variant or None, path=Path(msg.path),
                   bytes=msg.bytes, sha256=msg.sha256, bits_per_weight=msg.bits_per_weight or None,
                   metrics=tuple(eval_result_from_proto(m) for m in msg.metrics))


class Job:
    """A job on a JobService, as of its last fetch (`refresh`, or the end of `watch` / `wait`).

    >>> job = client.quantize(model, out=out, calibration=calibration)   # doctest: +SKIP
    >>> for event in job.watch(): print(event.phase, event.step)           # doctest: +SKIP
    >>> job.wait().artifacts[0].path                                       # doctest: +SKIP
    """

    def __init__(self, calls: JobServiceCalls, proto: job_pb2.Job) -> None:
        self._calls = calls
        self._proto = proto

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, state={self.state.value!r})"

    @property
    def proto(self) -> job_pb2.Job:
        """The JobService's message as last fetched."""
        return self._proto

    @property
    def id(self) -> str:
        return self._proto.job_id

    @property
    def state(self) -> JobState:
        return JobState.from_proto(self._proto.state)

    @property
    def error(self) -> str | None:
        """Why the job failed, as the server says it (None unless it failed)."""
        return self._proto.error or None

    @property
    def trace_id(self) -> str:
        """The OpenTelemetry trace that follows the job across the services."""
        return self._proto.trace_id

    @property
    def model(self) -> Path:
        return Path(self._proto.spec.model_path)

    @property
    def progress(self) -> ProgressEvent | None:
        """The latest progress event (None before the first)."""
        return ProgressEvent.from_proto(self._proto.progress) if self._proto.HasField("progress") else None

    @property
    def created_at(self) -> datetime | None:
        return _time(self._proto.created_at)

    @property
    def finished_at(self) -> datetime | None:
        return _time(self._proto.finished_at)

    @property
    def artifacts(self) -> tuple[Artifact, ...]:
        return tuple(Artifact.from_proto(a) for a in self._proto.artifacts)

    @property
    def metrics(self) -> tuple[EvalResult, ...]:
        """The first artifact's metrics (every artifact carries its own in `artifacts`)."""
        return tuple(eval_result_from_proto(m) for m in self._proto.metrics)

    @property
    def solvers(self) -> tuple[str, ...]:
        """Addresses of the solver replicas the job's solves ran on (empty until it starts)."""
        return tuple(self._proto.solvers)

    @property
    def diagnostics(self) -> common_pb2.JobDiagnostics:
        """Per-layer errors, per-block held-out errors, phase times and resource use (complete once ended)."""
        return self._proto.diagnostics

    def refresh(self) -> Job:
        """Fetch the job's current record; returns itself."""
        self._proto = self._calls.get(self.id)
        return self

    def watch(self, after_sequence: int = 0) -> Iterator[ProgressEvent]:
        """Every progress event after `after_sequence` (0: from the start), as they happen, until the job
        ends; the job is refreshed once the stream does."""
        for event in self._calls.watch(self.id, after_sequence=after_sequence):
            yield ProgressEvent.from_proto(event)
        self.refresh()

    def wait(self, timeout: float | None = None, *, check: bool = True) -> Job:
        """Block until the job ends and return it, refreshed.

        With `check` (the default) a failed or cancelled job raises `JobFailedError` carrying the server's
        reason, so code that reads `artifacts` after `wait()` never reads an empty list by mistake;
        `check=False` returns the job whatever its end. `TimeoutError` if it has not ended in `timeout` s.
        """
        if not self.state.terminal:
            seen = self._proto.progress.sequence
            for _ in self._calls.watch(self.id, after_sequence=seen, timeout=timeout):
                pass
            self.refresh()
        if check and self.state is not JobState.SUCCEEDED:
            raise JobFailedError(self)
        return self

    def cancel(self) -> Job:
        """Ask the server to cancel the job (a no-op once it ended); returns itself, refreshed. A running
        job stops at its next step: `wait(check=False)` sees it cancelled."""
        self._proto = self._calls.cancel(self.id)
        return self
