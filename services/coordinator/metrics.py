"""The coordinator's Prometheus metrics: jobs by state, queue depth, phase and job durations, GPU-seconds.

Each coordinator keeps its metrics in its own `CollectorRegistry`, never the process-global one, so
several stacks in one process (tests, benchmarks) neither collide on registration nor see each
other's numbers. How many jobs are in each state is read from the job store at scrape time rather
than counted as jobs move, so the numbers are right from the first scrape after a restart.
Durations and GPU-seconds are observed once per finished job, from the diagnostics the runner stores
with it (`observe_job`); they count what this process saw finish, as Prometheus counters do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from bitsmith.v1 import common_pb2, job_pb2
from bitsmith_services.coordinator.jobstore import TERMINAL, JobStore
from bitsmith_services.coordinator.scheduler import Usage
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
"""Seconds: a demo job's phases take about a second, a 70B model's solve phase hours."""

STATES = {value: name.removeprefix("JOB_STATE_").lower()
          for name, value in common_pb2.JobState.items() if value != common_pb2.JOB_STATE_UNSPECIFIED}
"""Label of each job state, as the CLI shows it ("queued", "running", "succeeded", ...)."""

CUDA_PREFIX = "cuda"
"""A service whose reported device starts with this computed on a GPU (``cuda``, ``cuda:1``)."""

class JobStateCollector(Collector):
    """`bitsmith_jobs{state}` and `bitsmith_queue_depth`, counted in the job store at each scrape."""

    def __init__(self, jobs: JobStore) -> None:
        self._jobs = jobs

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = dict.fromkeys(STATES, 0) | self._jobs.count_by_state()
        by_state = GaugeMetricFamily("bitsmith_jobs", "Jobs in the job store, by state.", labels=["state"])
        for state, label in STATES.items():
            by_state.add_metric([label], counts[state])
        yield by_state
        yield GaugeMetricFamily("bitsmith_queue_depth", "Jobs accepted and waiting for a worker slot.",
                                value=counts[common_pb2.JOB_STATE_QUEUED])


class LeaseCollector(Collector):
    """`bitsmith_solver_replicas{state}` and `bitsmith_host_memory_bytes{state}`: what the scheduler places,
    leased to running jobs or free, read at each scrape."""

    def __init__(self, usage: Callable[[], Usage]) -> None:
        self._usage = usage

    def collect(self) -> Iterator[GaugeMetricFamily]:
        usage = self._usage()
        replicas = GaugeMetricFamily("bitsmith_solver_replicas", "Solver replicas, leased to running jobs or free.",
                                     labels=["state"])
        replicas.add_metric(["leased"], usage.leased_replicas)
        replicas.add_metric(["free"], usage.replicas - usage.leased_replicas)
        yield replicas
        memory = GaugeMetricFamily("bitsmith_host_memory_bytes",
                                   "Calibrator host memory the queue places, leased to running jobs or free.",
                                   labels=["state"])
        memory.add_metric(["leased"], usage.leased_host_bytes)
        memory.add_metric(["free"], usage.host_bytes - usage.leased_host_bytes)
        yield memory


class CoordinatorMetrics:
    """Every metric of one coordinator, in its own registry (`usage`: what its scheduler has leased)."""

    def __init__(self, jobs: JobStore, usage: Callable[[], Usage] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(JobStateCollector(jobs))
        if usage is not None:
            self.registry.register(LeaseCollector(usage))
        self._phase = Histogram(
            "bitsmith_phase_duration_seconds",
            "Seconds one finished job spent in calls of a phase (calibrate, solve, pack, evaluate, publish, ...).",
            ["phase"], buckets=DURATION_BUCKETS, registry=self.registry,
        )
        self._job = Histogram(
            "bitsmith_job_duration_seconds", "Wall seconds of finished jobs, by their final state.",
            ["state"], buckets=DURATION_BUCKETS, registry=self.registry,
        )
        self._finished = Counter("bitsmith_jobs_finished", "Jobs that reached a final state in this process.",
                                 ["state"], registry=self.registry)
        self._gpu = Counter("bitsmith_gpu_seconds", "Seconds of worker calls made on a CUDA device.",
                            registry=self.registry)

    def observe_job(self, job: job_pb2.Job) -> None:
        """Count a job that just reached its final state; call once per job.

        A job that never ran (cancelled while queued, or failed by a restart) has no diagnostics and
        adds only to `bitsmith_jobs_finished_total`.
        """
        if job.state not in TERMINAL:
            raise ValueError(f"job {job.job_id} is {STATES.get(job.state, job.state)}, not finished")
        state = STATES[job.state]
        self._finished.labels(state).inc()
        if not job.HasField("diagnostics"):
            return
        diagnostics = job.diagnostics
        self._job.labels(state).observe(diagnostics.wall_s)
        for phase in diagnostics.phases:
            self._phase.labels(phase.phase).observe(phase.seconds)
        self._gpu.inc(sum(max(s.busy_s, 0.0) for s in diagnostics.services
                          if s.usage.device.startswith(CUDA_PREFIX)))

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The registry in the format the scraper's Accept header asks for (Prometheus text or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
