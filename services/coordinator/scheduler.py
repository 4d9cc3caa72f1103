"""Which queued job runs next, and on what: the coordinator's share of the cluster, job by job.

Every worker service is shared by all jobs, but two things a job holds are scarce: solver replicas (a GPU
each on a GPU cluster; a job's solves fan out over the ones it leases) and the calibrator's host memory
(its activations, two calibration sets' worth per job). A job waits in the queue until what it asks for
is free, among the replicas its `node_label` allows, then holds it until it ends.

Fair sharing: waiting jobs are taken in order of how many solver replicas their party (project, else
submitter) holds right now, then of how long ago the party last started a job, then by arrival: parties
take turns, so a project with ten jobs queued does not starve one with a single job. A
job that does not fit lets smaller ones behind it start (backfill), but only `MAX_BYPASS` times: then
nothing behind it starts until it has, so a big job is never starved by a stream of small ones.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bitsmith.errors import ConfigError, ResourceExhaustedError, UnplaceableError
from bitsmith.settings import positive_int
from bitsmith.v1 import job_pb2
from bitsmith_services.coordinator.placement import Worker

MAX_BYPASS = 4
"""How many later jobs may start ahead of a waiting job that does not fit before it blocks them."""
HOST_MEMORY_ENV = "BITSMITH_HOST_MEMORY"
"""Calibrator host memory (bytes) jobs may hold at once; default: 3/4 of this host's memory."""
ACTIVATION_BYTES = 4
"""Bytes per activation value the calibrator holds (float32)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Demand:
    """What one job holds while it runs."""

    gpus: int = 1
    host_bytes: int = 0
    label: str = ""


@dataclass(frozen=True, slots=True)
class Lease:
    """What a started job holds: solver replicas (indices into the scheduler's) and host memory."""

    job_id: str
    party: str
    solvers: tuple[int, ...]
    host_bytes: int


@dataclass(frozen=True, slots=True)
class Usage:
    """What running jobs hold now, of what the scheduler places (for the coordinator's metrics)."""

    replicas: int
    leased_replicas: int
    host_bytes: int
    leased_host_bytes: int


@dataclass(slots=True)
class _Waiting:
    job_id: str
    party: str
    demand: Demand
    arrival: int
    bypassed: int = 0


@dataclass
class Scheduler:
    """The queue and the ledger of what running jobs hold (not thread-safe: the coordinator locks)."""

    solvers: Sequence[Worker]
    host_bytes: int
    max_running: int = 1_000_000
    _queue: list[_Waiting] = field(default_factory=list)
    _running: dict[str, Lease] = field(default_factory=dict)
    _arrivals: itertools.count[int] = field(default_factory=itertools.count)
    _starts: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _last_start: dict[str, int] = field(default_factory=dict)
    """The start number of each party's latest job (turns go to the party that waited longest)."""

    def check(self, demand: Demand) -> None:
        """Refuse, at Submit, a demand no amount of waiting can meet."""
        if demand.gpus < 1:
            raise ConfigError(f"a job needs at least one solver replica, asked for {demand.gpus}")
        matching = self.matching(demand.label)
        if len(matching) < demand.gpus:
            labels = sorted(set().union(*(w.labels for w in self.solvers)))
            where = f" with label {demand.label!r}" if demand.label else ""
            known = f" (labels of its solver nodes: {labels})" if demand.label else ""
            raise UnplaceableError(
                f"the job asks for {demand.gpus} solver replicas{where}; the cluster has {len(matching)}{known}")
        if demand.host_bytes > self.host_bytes:
            raise ResourceExhaustedError(
                f"the job needs {demand.host_bytes:,} bytes of calibrator host memory; the coordinator places "
                f"at most {self.host_bytes:,} (set {HOST_MEMORY_ENV}, or calibrate on fewer samples)")

    def matching(self, label: str) -> list[int]:
        """The solver replicas a job pinned to `label` may use (all of them for no label)."""
        return [i for i, worker in enumerate(self.solvers) if not label or label in worker.labels]

    def add(self, job_id: str, party: str, demand: Demand) -> None:
        self._queue.append(_Waiting(job_id, party, demand, next(self._arrivals)))

    def remove(self, job_id: str) -> bool:
        """Drop a waiting job (cancelled); False if it was not waiting."""
        before = len(self._queue)
        self._queue = [w for w in self._queue if w.job_id != job_id]
        return len(self._queue) < before

    @property
    def waiting(self) -> list[str]:
        """Waiting jobs in the order they would be considered now."""
        return [w.job_id for w in sorted(self._queue, key=self._rank)]

    def start_ready(self) -> list[Lease]:
        """Lease what is free to the jobs that fit, in fair order; the leases of the jobs to start now."""
        started: list[Lease] = []
        while len(self._running) < self.max_running:
            lease = self._next()
            if lease is None:
                break
            self._running[lease.job_id] = lease
            self._last_start[lease.party] = next(self._starts)
            started.append(lease)
        return started

    def release(self, job_id: str) -> None:
        """A job ended: what it held is free again."""
        self._running.pop(job_id, None)

    def usage(self) -> Usage:
        return Usage(replicas=len(self.solvers),
                     leased_replicas=sum(len(lease.solvers) for lease in self._running.values()),
                     host_bytes=self.host_bytes,
                     leased_host_bytes=sum(lease.host_bytes for lease in self._running.values()))

    def _next(self) -> Lease | None:
        skipped: list[_Waiting] = []
        for waiting in sorted(self._queue, key=self._rank):
            lease = self._fit(waiting)
            if lease is not None:
                self._queue.remove(waiting)
                for passed in skipped:
                    passed.bypassed += 1
                return lease
            skipped.append(waiting)
            if waiting.bypassed >= MAX_BYPASS:
                return None  # it has waited long enough: nothing behind it starts first
        return None

    def _rank(self, waiting: _Waiting) -> tuple[int, int, int]:
        held = sum(len(lease.solvers) for lease in self._running.values() if lease.party == waiting.party)
        return held, self._last_start.get(waiting.party, 0), waiting.arrival

    def _fit(self, waiting: _Waiting) -> Lease | None:
        busy = {i for lease in self._running.values() for i in lease.solvers}
        free = [i for i in self.matching(waiting.demand.label) if i not in busy]
        held = sum(lease.host_bytes for lease in self._running.values())
        if len(free) < waiting.demand.gpus or held + waiting.demand.host_bytes > self.host_bytes:
            return None
        return Lease(waiting.job_id, waiting.party, tuple(free[: waiting.demand.gpus]), waiting.demand.host_bytes)


def demand_of(spec: job_pb2.QuantizeJob, *, calibrated: bool) -> Demand:
    """What a job asks for: its `resources`, with host memory estimated when it gives none — the
    calibrator holds a block's inputs and outputs, (samples + held-out) x seq_len x hidden floats each."""
    from bitsmith.calib.data import default_holdout  # imports torch, which the coordinator only needs here

    resources = spec.resources
    host = resources.host_memory_bytes
    if not host and calibrated:
        cal = spec.calibration
        holdout = cal.holdout_samples if cal.HasField("holdout_samples") else default_holdout(cal.samples)
        host = 2 * (cal.samples + holdout) * cal.seq_len * _hidden_size(Path(spec.model_path)) * ACTIVATION_BYTES
    return Demand(gpus=resources.gpus or 1, host_bytes=host, label=resources.node_label)


def _hidden_size(model: Path) -> int:
    """The checkpoint's hidden size (the calibrator's Plan already read and checked its config)."""
    try:
        config = json.loads((model / "config.json").read_text())
        return int(config.get("hidden_size") or config["text_config"]["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{model}/config.json names no hidden_size: {exc}") from exc


def host_memory_from_env() -> int:
    """The host memory jobs may hold at once: $BITSMITH_HOST_MEMORY bytes, else 3/4 of this host's."""
    spec = os.environ.get(HOST_MEMORY_ENV, "").strip()
    if not spec:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 3 // 4
    return positive_int(spec, HOST_MEMORY_ENV, "byte count")
