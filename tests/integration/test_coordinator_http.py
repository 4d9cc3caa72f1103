"""The coordinator's HTTP port on a real stack: health, Prometheus metrics as jobs run, job reports."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest
from bitsmith import __version__
from bitsmith.errors import ConfigError
from bitsmith.rpc import Client, JobState
from bitsmith.rpc.discovery import running_stack, running_stack_http, write_stack_file
from bitsmith.schemes import Method
from bitsmith_services.coordinator.placement import ServiceAddresses, StaticPlacement
from bitsmith_services.coordinator.server import create_server
from bitsmith_services.registry import Role, start_service
from bitsmith_services.stack import LocalStack
from prometheus_client.parser import text_string_to_metric_families

from .conftest import make_request

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes


def fetch(address: str, path: str, method: str = "GET") -> Reply:
    request = urllib.request.Request(f"http://{address}{path}", method=method)
    try:
        with _OPENER.open(request, timeout=30) as reply:
            return Reply(reply.status, reply.headers, reply.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, error.headers, error.read())


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(address: str) -> Samples:
    reply = fetch(address, "/metrics")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(reply.body.decode()) for s in family.samples}


def scrape_until(address: str, done: Callable[[Samples], bool], timeout: float = 30.0) -> Samples:
    """Scrape until `done` holds: a job's metrics are fed just after its clients see it end."""
    deadline = time.monotonic() + timeout
    while not done(samples := scrape(address)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a labelled series not yet observed (as Prometheus reads an absent one)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceAddresses, Path]]:
    store = tmp_path_factory.mktemp("workers") / "store"
    servers = {role: start_service(role, "127.0.0.1:0", store) for role in Role}
    yield ServiceAddresses({role: f"127.0.0.1:{port}" for role, (_, port) in servers.items()}), store
    for server, _ in servers.values():
        server.stop(grace=1).wait()


@pytest.fixture(scope="module")
def stack(workers: tuple[ServiceAddresses, Path], tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[LocalStack]:
    with LocalStack(home=tmp_path_factory.mktemp("home"), services=workers[0]) as local:
        yield local


@pytest.fixture
def http(stack: LocalStack) -> str:
    assert stack.http_address
    return stack.http_address


def test_healthz_answers_ok_with_the_version(http: str) -> None:
    reply = fetch(http, "/healthz")
    assert reply.status == 200 and reply.headers["Content-Type"] == "application/json"
    body = json.loads(reply.body)
    assert body["status"] == "ok" and body["version"] == __version__
    head = fetch(http, "/healthz", method="HEAD")
    assert head.status == 200 and head.body == b"" and int(head.headers["Content-Length"]) == len(reply.body)


def test_metrics_follow_jobs_from_queue_to_finish(stack: LocalStack, http: str, tmp_path: Path) -> None:
    before = scrape(http)
    assert {name for name, _ in before} >= {"bitsmith_jobs", "bitsmith_queue_depth", "bitsmith_gpu_seconds_total"}

    with Client(stack.address) as client:
        first = client.submit(make_request(tmp_path / "first", samples=32, seq_len=256))
        next(e for e in first.watch() if e.state is JobState.RUNNING)
        # One job at a time: while the first runs, the next two wait in the queue. The one cancelled there
        # comes first, so its turn in the pool (which must not count it again) is over when the second ends.
        dropped = client.submit(make_request(tmp_path / "dropped", method=Method.RTN, calibrate=False)).cancel()
        second = client.submit(make_request(tmp_path / "second", method=Method.RTN, calibrate=False))
        during = scrape(http)
        jobs = [first.wait(), second.wait(), dropped.wait(check=False)]

    def grew(name: str, samples: Samples | None = None, **labels: str) -> float:
        return value(after if samples is None else samples, name, **labels) - value(before, name, **labels)

    after = scrape_until(http, lambda s: grew("bitsmith_jobs_finished_total", s, state="succeeded") >= 2)

    assert dropped.state is JobState.CANCELLED
    assert value(during, "bitsmith_jobs", state="running") == value(before, "bitsmith_jobs", state="running") + 1
    assert value(during, "bitsmith_queue_depth") == value(during, "bitsmith_jobs", state="queued") == 1
    # Cancelled in the queue: counted as it is cancelled, not when its turn in the pool comes.
    assert grew("bitsmith_jobs", during, state="cancelled") == 1
    assert grew("bitsmith_jobs_finished_total", during, state="cancelled") == 1

    assert value(after, "bitsmith_queue_depth") == 0 and value(after, "bitsmith_jobs", state="running") == 0
    assert grew("bitsmith_jobs", state="succeeded") == grew("bitsmith_jobs_finished_total", state="succeeded") == 2
    assert grew("bitsmith_jobs_finished_total", state="cancelled") == 1, "counted once"
    # Durations come from the jobs that ran; the one cancelled in the queue never ran.
    assert grew("bitsmith_job_duration_seconds_count", state="succeeded") == 2
    assert grew("bitsmith_job_duration_seconds_count", state="cancelled") == 0
    walls = sum(j.diagnostics.wall_s for j in jobs[:2])
    assert walls > 0 and grew("bitsmith_job_duration_seconds_sum", state="succeeded") == pytest.approx(walls)
    for phase in ("calibrate", "solve", "pack", "publish"):
        ran = sum(any(p.phase == phase for p in j.diagnostics.phases) for j in jobs)
        seconds = sum(p.seconds for j in jobs for p in j.diagnostics.phases if p.phase == phase)
        assert grew("bitsmith_phase_duration_seconds_count", phase=phase) == ran > 0, phase
        assert grew("bitsmith_phase_duration_seconds_sum", phase=phase) == pytest.approx(seconds), phase
    on_gpu = sum(s.busy_s for j in jobs for s in j.diagnostics.services if s.usage.device.startswith("cuda"))
    assert grew("bitsmith_gpu_seconds_total") == pytest.approx(on_gpu)


def test_report_route(stack: LocalStack, http: str, tmp_path: Path) -> None:
    with Client(stack.address) as client:
        job = client.submit(make_request(tmp_path / "out", method=Method.RTN, calibrate=False)).wait()
    reply = fetch(http, f"/jobs/{job.id}/report")
    assert reply.status == 200 and reply.headers["Content-Type"] == "text/html; charset=utf-8"
    assert reply.body.lstrip().lower().startswith(b"<!doctype html") and job.id.encode() in reply.body

    unknown = fetch(http, "/jobs/0123456789abcdef/report")
    assert unknown.status == 404 and b"no job 0123456789abcdef" in unknown.body
    bad = fetch(http, "/jobs/..%2Fjobs.sqlite/report")
    assert bad.status == 400 and b"not a job id" in bad.body
    assert fetch(http, "/jobs/ABCDEF0123456789/report").status == 400
    assert fetch(http, "/nothing/here").status == 404
    posted = fetch(http, f"/jobs/{job.id}/report", method="POST")
    assert posted.status == 405 and posted.headers["Allow"] == "GET, HEAD"
    assert fetch(http, "/metrics", method="DELETE").status == 405
    for failed in (unknown, bad, posted):
        assert failed.headers["Content-Type"] == "text/plain; charset=utf-8" and b"Traceback" not in failed.body


def test_job_counts_survive_a_restart_and_the_port_closes_with_the_stack(
        workers: tuple[ServiceAddresses, Path], tmp_path: Path) -> None:
    home = tmp_path / "home"
    with LocalStack(home=home, services=workers[0]) as first, Client(first.address) as client:
        client.submit(make_request(tmp_path / "out", method=Method.RTN, calibrate=False)).wait()
        finished = scrape_until(first.http_address or "",
                                lambda s: value(s, "bitsmith_jobs_finished_total", state="succeeded") >= 1)
        assert value(finished, "bitsmith_jobs_finished_total", state="succeeded") == 1
        closed = first.http_address or ""
    with pytest.raises(urllib.error.URLError):
        fetch(closed, "/healthz")

    with LocalStack(home=home, services=workers[0]) as again:
        samples = scrape(again.http_address or "")
        # The store still holds the job; this process has finished none.
        assert value(samples, "bitsmith_jobs", state="succeeded") == 1
        assert value(samples, "bitsmith_jobs_finished_total", state="succeeded") == 0


def test_healthz_is_503_once_the_grpc_server_stops(workers: tuple[ServiceAddresses, Path], tmp_path: Path) -> None:
    server, _, coordinator = create_server("127.0.0.1:0", db_path=tmp_path / "jobs.sqlite",
                                           placement=StaticPlacement(workers[0]))
    try:
        http = coordinator.http_address or ""
        assert fetch(http, "/healthz").status == 200
        server.stop(grace=None).wait()
        reply = fetch(http, "/healthz")
        assert reply.status == 503 and json.loads(reply.body)["status"] == "unavailable"
    finally:
        server.stop(grace=None)
        coordinator.shutdown()


def test_no_http_port_when_disabled(workers: tuple[ServiceAddresses, Path], tmp_path: Path) -> None:
    with LocalStack(home=tmp_path, services=workers[0], http_port=None) as local:
        assert local.http_address is None


def test_a_taken_http_port_is_a_clear_error(workers: tuple[ServiceAddresses, Path], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot bind the coordinator's HTTP port to 127.0.0.1:{port}"):
            LocalStack(home=tmp_path, services=workers[0], http_port=port).start()


def test_the_stack_file_records_the_http_address(stack: LocalStack, tmp_path: Path) -> None:
    write_stack_file(tmp_path, stack.address, stack.http_address)
    assert running_stack(tmp_path) == stack.address
    assert running_stack_http(tmp_path) == stack.http_address
    write_stack_file(tmp_path, stack.address)
    assert running_stack(tmp_path) == stack.address and running_stack_http(tmp_path) is None
