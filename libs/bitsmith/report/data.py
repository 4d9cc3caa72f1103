"""What a job report shows, gathered from a finished job or from an artifact directory.

A job knows every artifact it wrote and their quality; an artifact directory knows itself, and its
manifest carries the job's diagnostics (every layer, the timeline), so a report can be made long
after the job store that ran it is gone. Both end up as one `ReportData`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict, ParseDict, ParseError

from bitsmith.errors import FormatError
from bitsmith.manifest import read_manifest
from bitsmith.rpc.convert import artifact_name
from bitsmith.v1 import common_pb2, job_pb2


@dataclass(frozen=True, slots=True, kw_only=True)
class ArtifactSummary:
    """One artifact: its size and what it costs in quality."""

    name: str
    path: str
    bytes: int
    bits_per_weight: float
    metrics: tuple[common_pb2.EvalResult, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportData:
    """Everything the page shows; `recipe` is the recipe message in protobuf's JSON mapping."""

    title: str
    state: str
    model: str
    created_at: str
    finished_at: str
    error: str
    recipe: dict[str, Any]
    artifacts: tuple[ArtifactSummary, ...]
    diagnostics: common_pb2.JobDiagnostics

    @classmethod
    def from_job(cls, job: job_pb2.Job) -> ReportData:
        return cls(
            title=f"job {job.job_id}",
            state=common_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower(),
            model=job.spec.model_path,
            created_at=_timestamp(job, "created_at"),
            finished_at=_timestamp(job, "finished_at"),
            error=job.error,
            recipe=MessageToDict(job.spec.recipe, preserving_proto_field_name=True),
            artifacts=tuple(
                ArtifactSummary(name=artifact_name(a), path=a.path, bytes=a.bytes,
                                bits_per_weight=a.bits_per_weight, metrics=tuple(a.metrics))
                for a in job.artifacts
            ),
            diagnostics=job.diagnostics,
        )

    @classmethod
    def from_artifact_dir(cls, path: Path) -> ReportData:
        """From `manifest.json` (`FormatError` when the directory holds no readable manifest)."""
        manifest = read_manifest(path)
        where = f"{path}/manifest.json"
        diagnostics = _parse(manifest.diagnostics, common_pb2.JobDiagnostics(), f"{where}: diagnostics")
        metrics = tuple(_parse(value, common_pb2.EvalResult(), f"{where}: metrics of {name}")
                        for name, value in manifest.metrics.items())
        return cls(
            title=f"artifact {Path(path).resolve().name}",
            state="published",
            model="",
            created_at=manifest.created_at,
            finished_at="",
            error="",
            recipe=dict(manifest.recipe),
            artifacts=(ArtifactSummary(name=str(manifest.format), path=str(path),
                                       bytes=sum(f.bytes for f in manifest.files),
                                       bits_per_weight=manifest.bits_per_weight, metrics=metrics),),
            diagnostics=diagnostics,
        )


def _timestamp(job: job_pb2.Job, field: str) -> str:
    return getattr(job, field).ToJsonString() if job.HasField(field) else ""


def _parse(value: Any, message: Any, where: str) -> Any:
    try:
        return ParseDict(value, message, ignore_unknown_fields=True)
    except ParseError as exc:
        raise FormatError(f"{where} is malformed: {exc}") from exc
