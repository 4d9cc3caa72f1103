"""What a job report shows, gathered from a job or from an artifact's manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bitsmith.v1 import job_pb2


@dataclass(frozen=True, slots=True)
class ReportData:
    job: job_pb2.Job

    @classmethod
    def from_job(cls, job: job_pb2.Job) -> ReportData:
        return cls(job=job)

    @classmethod
    def from_artifact_dir(cls, path: Path) -> ReportData:
        raise NotImplementedError(path)
