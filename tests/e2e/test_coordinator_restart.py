"""Kill -9 the coordinator in the middle of a job, start it again: the job is reported failed with the
reason (never stuck in running) and nothing complete-looking is left at the output path; the jobs that
were waiting in its queue are placed again and run, or fail with the reason when they no longer can."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from bitsmith.demo import DEMO_MODEL
from bitsmith.rpc import Client, JobState
from bitsmith.schemes import Method
from bitsmith_services.registry import Role

from ..integration.conftest import make_request


def _serve(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "bitsmith_services.cli", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    assert address, f"bitsmith serve {args} printed no address"
    return proc, address


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[str]:
    procs = []
    spec = []
    for role in (r.value for r in Role):
        proc, address = _serve(role, "--store", str(tmp_path / "store"))
        procs.append(proc)
        spec.append(f"{role}={address}")
    yield ",".join(spec)
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_killed_coordinator_fails_the_running_job_on_restart(tmp_path: Path, workers: str) -> None:
    home = tmp_path / "home"
    out = tmp_path / "out"
    coordinator, address = _serve("coordinator", "--home", str(home), "--services", workers)
    vanishing = tmp_path / "vanishing-model"
    shutil.copytree(DEMO_MODEL, vanishing)
    with Client(address) as client:
        job = client.submit(make_request(out, samples=64, seq_len=512))
        for event in job.watch():
            if event.phase == "solve" and event.block == 1:
                break
        # The one solver replica is leased to the running job: these two wait in the queue.
        waiting = client.submit(make_request(tmp_path / "waiting", method=Method.RTN, calibrate=False))
        orphan = client.submit(make_request(tmp_path / "orphan", samples=4, model=vanishing))
        assert client.job(waiting.id).state is client.job(orphan.id).state is JobState.QUEUED
    os.kill(coordinator.pid, signal.SIGKILL)
    coordinator.wait(timeout=30)
    shutil.rmtree(vanishing)  # gone while the coordinator was down: its queued job can no longer be placed

    restarted, address = _serve("coordinator", "--home", str(home), "--services", workers)
    try:
        with Client(address) as client:
            done = client.job(job.id).wait(check=False)
            assert done.state == JobState.FAILED
            assert "restarted while the job was running" in (done.error or "")
            assert not out.exists() and not list(tmp_path.glob(".*partial*"))
            assert client.job(waiting.id).wait(check=False).state is JobState.SUCCEEDED
            lost = client.job(orphan.id).wait(check=False)
            assert lost.state is JobState.FAILED and "cannot be placed after a restart" in (lost.error or "")
            assert "config.json" in (lost.error or "") and not (tmp_path / "orphan").exists()
            # The restarted coordinator still runs new jobs.
            again = client.submit(make_request(tmp_path / "again", method=Method.RTN)).wait(check=False)
            assert again.state == JobState.SUCCEEDED, again.error
    finally:
        restarted.terminate()
        restarted.wait(timeout=30)
