"""The coordinator under load: many clients submitting and watching at once, on loopback.

Starts a real stack — every worker service as its own `bitsmith serve <role>` process and one coordinator
process over them (placed statically, as a deployment without Ray would) — then, at the same moment:
  - 50 Submit calls, each from its own client: small RTN jobs on the demo model into distinct output
    directories, ten of them repeating an earlier call's request id (those must return that job);
  - 200 Watch streams, four per submission, each opened as soon as its submission has a job id;
  - Get calls on the known jobs from a few pollers until every stream has ended.
Then it checks that no job was lost or made twice (List holds each job once, exactly the ones Submit
returned, each repeated request id maps to its first job), that every job succeeded, and that every
stream ended with its job's final "done" event, its sequence numbers increasing; and it prints the
p50/p95/p99 latency of Submit and Get and the wall time, with the hardware.

    python bench/load.py [--submits 50] [--repeats 10] [--watchers-per-job 4] [--max-concurrent-jobs 1]
                         [--warm-up] [--json PATH]

Exits 1 when a check fails. docs/benchmarks.md ("Coordinator under load") has a run's numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

from machine import hardware

T = TypeVar("T")
GET_POLLERS = 8
GET_INTERVAL_S = 0.05
"""Each poller's pause between Gets: load like many dashboards refreshing, not a spin that starves the jobs."""
START_TIMEOUT_S = 180.0


@dataclass
class Latencies:
    """Seconds each call took, by call name; appended to from many threads (list.append is atomic)."""

    by_call: dict[str, list[float]] = field(default_factory=lambda: {"Submit": [], "Get": []})

    def timed(self, call: str, fn: Callable[[], T]) -> T:
        t0 = time.perf_counter()
        result = fn()
        self.by_call[call].append(time.perf_counter() - t0)
        return result

    def summary(self) -> dict[str, dict[str, float]]:
        return {call: percentiles(seconds) for call, seconds in self.by_call.items()}


def percentiles(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max in milliseconds (nearest rank: a latency some call really had), and the call count."""
    ranked = sorted(seconds) or [math.nan]
    return {"calls": len(seconds), **{f"p{q}_ms": ranked[max(math.ceil(q / 100 * len(ranked)) - 1, 0)] * 1e3
                                      for q in (50, 95, 99)}, "max_ms": ranked[-1] * 1e3}


@contextmanager
def worker_services(store: Path) -> Iterator[str]:
    """Every worker role as its own `bitsmith serve` process; yields their --services spec."""
    from bitsmith_services.registry import Role

    with ExitStack() as stack:
        addresses = {}
        for role in Role:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bitsmith_services.cli", "serve", role.value, "--port", "0",
                 "--store", str(store)], stdout=subprocess.PIPE, text=True)
            stack.callback(proc.wait, timeout=30)
            stack.callback(proc.terminate)
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if not line:
                raise RuntimeError(f"the {role.value} service exited before printing its address")
            addresses[role.value] = line
        yield ",".join(f"{role}={address}" for role, address in addresses.items())


def serve_coordinator(home: str, services: str, max_concurrent_jobs: int, conn: Connection) -> None:
    """The coordinator process: a LocalStack over the given services, until the parent says stop."""
    from bitsmith_services.stack import LocalStack, parse_services

    with LocalStack(home=Path(home), services=parse_services(services), max_concurrent_jobs=max_concurrent_jobs,
                    http_port=None) as local:
        conn.send(local.address)
        conn.recv()


@contextmanager
def coordinator(home: Path, services: str, max_concurrent_jobs: int) -> Iterator[str]:
    """A coordinator in a process of its own (the clients' threads must not share its interpreter lock)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve_coordinator, args=(str(home), services, max_concurrent_jobs, child))
    proc.start()
    try:
        if not parent.poll(START_TIMEOUT_S):
            raise RuntimeError(f"the coordinator did not start within {START_TIMEOUT_S:.0f} s")
        yield str(parent.recv())
    finally:
        parent.send("stop")
        proc.join(timeout=60)
        if proc.is_alive():
            proc.terminate()


@dataclass
class Stream:
    """What one Watch stream saw."""

    job_id: str = ""
    phases: list[str] = field(default_factory=list)
    sequences: list[int] = field(default_factory=list)
    error: str = ""


def run_load(address: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from bitsmith.demo import DEMO_MODEL
    from bitsmith.recipes import Recipe
    from bitsmith.rpc import Client, QuantizeRequest
    from bitsmith.schemes import Method

    warm_up = []
    if args.warm_up:
        with Client(address, timeout=args.call_timeout) as client:
            warm_up.append(client.submit(QuantizeRequest(model=DEMO_MODEL, out=work / "out-warm-up",
                                                         recipe=Recipe(method=Method.RTN))).wait().proto)
    unique = args.submits - args.repeats
    requests = [QuantizeRequest(model=DEMO_MODEL, out=work / f"out-{i}", recipe=Recipe(method=Method.RTN),
                                request_id=f"load-{i}") for i in range(unique)]
    requests += requests[: args.repeats]  # the same call again, racing the first: it must return the same job
    latencies = Latencies()
    job_ids: list[Future[str]] = [Future() for _ in requests]
    streams = [Stream() for _ in range(len(requests) * args.watchers_per_job)]
    start = threading.Barrier(len(requests) + len(streams))

    def submit(i: int) -> None:
        with Client(address, timeout=args.call_timeout) as client:
            start.wait()
            try:
                job_ids[i].set_result(latencies.timed("Submit", lambda: client.submit(requests[i])).id)
            except Exception as exc:
                job_ids[i].set_exception(exc)

    def watch(s: int) -> None:
        stream = streams[s]
        with Client(address, timeout=args.call_timeout) as client:
            start.wait()
            try:
                stream.job_id = job_ids[s // args.watchers_per_job].result()
                for event in client.calls.watch(stream.job_id):
                    stream.phases.append(event.phase)
                    stream.sequences.append(event.sequence)
            except Exception as exc:
                stream.error = f"{type(exc).__name__}: {exc}"

    watching = threading.Event()

    def poll_gets() -> None:
        with Client(address, timeout=args.call_timeout) as client:
            while not watching.is_set():
                known = [f.result() for f in job_ids if f.done() and not f.exception()]
                if known:
                    latencies.timed("Get", partial(client.calls.get, random.choice(known)))
                time.sleep(GET_INTERVAL_S)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(requests) + len(streams) + GET_POLLERS) as pool:
        pollers = [pool.submit(poll_gets) for _ in range(GET_POLLERS)]
        calls = [pool.submit(submit, i) for i in range(len(requests))]
        calls += [pool.submit(watch, s) for s in range(len(streams))]
        for call in calls[: len(requests)]:
            call.result()
        submitted_s = time.perf_counter() - t0
        for call in calls:
            call.result()
        watching.set()
        for poller in pollers:
            poller.result()
    wall_s = time.perf_counter() - t0

    with Client(address, timeout=args.call_timeout) as client:
        listed = client.calls.list(limit=10 * len(requests))
    listed = [j for j in listed if j.job_id not in {w.job_id for w in warm_up}]
    return {"checks": check(requests, job_ids, streams, listed), "submitted_s": submitted_s, "wall_s": wall_s,
            "latency": latencies.summary(), "jobs": len({j.job_id for j in listed})}


def check(requests: Sequence[Any], job_ids: Sequence[Future[str]], streams: Sequence[Stream],
          listed: Sequence[Any]) -> list[str]:
    """Every way the run went wrong (empty when it did not)."""
    from bitsmith.v1 import common_pb2

    problems = [f"submission {i} failed: {f.exception()}" for i, f in enumerate(job_ids) if f.exception()]
    answered = [(request, f.result()) for request, f in zip(requests, job_ids, strict=True) if not f.exception()]
    ids = [job_id for _, job_id in answered]
    by_request: dict[str, set[str]] = {}
    for request, job_id in answered:
        by_request.setdefault(request.request_id, set()).add(job_id)
    problems += [f"request id {r} made jobs {sorted(j)}" for r, j in by_request.items() if len(j) > 1]
    listed_ids = [j.job_id for j in listed]
    if len(listed_ids) != len(set(listed_ids)):
        problems.append(f"List repeats jobs: {len(listed_ids)} rows, {len(set(listed_ids))} jobs")
    if set(listed_ids) != set(ids):
        problems.append(f"List holds {len(set(listed_ids))} jobs, Submit returned {len(set(ids))}: "
                        f"lost {sorted(set(ids) - set(listed_ids))}, unknown {sorted(set(listed_ids) - set(ids))}")
    problems += [f"job {j.job_id} ended {common_pb2.JobState.Name(j.state)}: {j.error}" for j in listed
                 if j.state != common_pb2.JOB_STATE_SUCCEEDED]
    for s in streams:
        if s.error:
            problems.append(f"a stream of job {s.job_id} failed: {s.error}")
        elif not s.phases or s.phases[-1] != "done":
            problems.append(f"a stream of job {s.job_id} did not end with the job's final 'done': {s.phases[-3:]}")
        elif any(b <= a for a, b in zip(s.sequences, s.sequences[1:], strict=False)):
            problems.append(f"a stream of job {s.job_id} saw sequences out of order: {s.sequences}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submits", type=int, default=50, help="concurrent Submit calls")
    parser.add_argument("--repeats", type=int, default=10, help="of which repeat an earlier call's request id")
    parser.add_argument("--watchers-per-job", type=int, default=4, help="Watch streams per submission")
    parser.add_argument("--max-concurrent-jobs", type=int, default=1,
                        help="jobs the coordinator runs at once (1: what `bitsmith serve coordinator` runs)")
    parser.add_argument("--warm-up", action="store_true",
                        help="run one job to its end before the load (the services' first model load then "
                             "happens outside it)")
    parser.add_argument("--call-timeout", type=float, default=600.0, help="deadline of each unary call (s)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    if not 0 <= args.repeats < args.submits:
        parser.error("--repeats must be in 0..submits-1")

    with tempfile.TemporaryDirectory(prefix="bitsmith-load-") as tmp:
        work = Path(tmp)
        with worker_services(work / "store") as services, \
                coordinator(work / "home", services, args.max_concurrent_jobs) as address:
            result = run_load(address, work, args)
    result.update(date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), hardware=hardware(),
                  submits=args.submits, repeats=args.repeats, warm_up=args.warm_up,
                  watch_streams=args.submits * args.watchers_per_job, max_concurrent_jobs=args.max_concurrent_jobs)
    print(f"{result['hardware']}; {result['date']}")
    print(f"{args.submits} Submit calls ({args.repeats} repeating a request id) -> {result['jobs']} jobs; "
          f"{result['watch_streams']} Watch streams; {args.max_concurrent_jobs} job(s) at a time")
    print(f"all submissions answered after {result['submitted_s']:.1f} s; every job done and every stream "
          f"ended after {result['wall_s']:.1f} s")
    print(f"{'call':<8}{'calls':>7}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for call, p in result["latency"].items():
        print(f"{call:<8}{p['calls']:>7}{p['p50_ms']:>10.1f}{p['p95_ms']:>10.1f}{p['p99_ms']:>10.1f}"
              f"{p['max_ms']:>10.1f}")
    for problem in result["checks"]:
        print(f"FAILED: {problem}")
    print("checks: " + ("every job accounted for once, succeeded, and seen to its end by every stream"
                        if not result["checks"] else f"{len(result['checks'])} problems"))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 1 if result["checks"] else 0


if __name__ == "__main__":
    sys.exit(main())
