"""A full disk under the packer: the job fails saying so (RESOURCE_EXHAUSTED from the packer, named in
the job's error), no artifact or staging directory is left, and the coordinator keeps serving."""

from __future__ import annotations

from pathlib import Path

import pytest
from bitsmith.demo import DEMO_MODEL
from bitsmith.rpc import Client, JobState, QuantizeRequest, Recipe
from bitsmith.schemes import Method
from bitsmith_services.coordinator.placement import StaticPlacement
from bitsmith_services.coordinator.server import create_server
from bitsmith_services.registry import Role

from tests.e2e.workers import Workers

pytestmark = pytest.mark.slow


def test_a_full_disk_fails_the_job_with_the_reason_and_leaves_nothing(tmp_path: Path) -> None:
    workers = Workers(tmp_path / "store", max_file_bytes={Role.PACKER: 1 << 20})  # the demo GPTQ file is ~4 MB
    server, port, coordinator = create_server("127.0.0.1:0", db_path=tmp_path / "jobs.sqlite",
                                              placement=StaticPlacement(workers.addresses()), http_port=None)
    try:
        with Client(f"127.0.0.1:{port}") as sdk:
            out = tmp_path / "outputs" / "gptq"
            job = sdk.submit(QuantizeRequest(model=DEMO_MODEL, out=out, recipe=Recipe(method=Method.RTN)))
            job.wait(timeout=600, check=False)
            assert job.state is JobState.FAILED
            assert job.error and "RESOURCE_EXHAUSTED" in job.error and "storage full" in job.error
            assert "file too large" in job.error and str(out.parent) in job.error
            assert not out.exists() and list((tmp_path / "outputs").iterdir()) == []  # no artifact, no staging
            assert [j.id for j in sdk.jobs()] == [job.id]  # still serving
    finally:
        server.stop(grace=1).wait()
        coordinator.shutdown()
        workers.stop()
