"""JobService: accepts jobs, runs them on the worker services, and answers for them.

Submit validates what it can before anything is queued (the checkpoint and the scheme through the
calibrator's Plan, the data files and the output path here, and that the cluster can ever give the job
what it asks: solver replicas of its node label, host memory), so bad input is refused at the door with
a clear status and nothing is written. Jobs then wait in the `Scheduler`'s fair queue until their share
of the cluster is free and run on a thread each, their solves on the solver replicas they lease; their
state lives in the SQLite job store, so a restarted coordinator knows every job: queued ones run again,
and ones caught running are failed with the reason and their staged output removed — never left "running".

Under a `SecurityConfig` with tokens every call has a caller (`bitsmith.rpc.auth.caller()`): a job
records its submitter and project, only that project (or an admin) may get, watch or cancel it, and
Submit takes only paths under the project's roots, symlinks resolved. The config's limits (jobs per
client, model size) are checked here too, before anything is queued.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from bitsmith.errors import (
    AlreadyExistsError,
    BitsmithError,
    ConfigError,
    PermissionDeniedError,
    ResourceExhaustedError,
)
from bitsmith.rpc.auth import caller
from bitsmith.rpc.convert import recipe_from_proto
from bitsmith.rpc.security import Grant, Limits, SecurityConfig, securing
from bitsmith.rpc.server import Callers, ServiceBinding
from bitsmith.rpc.server import create_server as _create_server
from bitsmith.v1 import calibrator_pb2, common_pb2, job_pb2, job_pb2_grpc
from bitsmith_services.coordinator.http import CoordinatorHttp, local_target
from bitsmith_services.coordinator.jobstore import TERMINAL, JobStore
from bitsmith_services.coordinator.metrics import CoordinatorMetrics
from bitsmith_services.coordinator.placement import Placement
from bitsmith_services.coordinator.runner import JobRunner, Stubs, discard_outputs
from bitsmith_services.coordinator.scheduler import (
    Demand,
    Lease,
    Scheduler,
    Usage,
    demand_of,
    host_memory_from_env,
)

log = logging.getLogger("bitsmith.coordinator")

WATCH_POLL_S = 0.5
MAX_CALIB_SAMPLES = 100_000
MAX_SEQ_LEN = 1 << 17
PLAN_TIMEOUT_S = 600.0
COORDINATOR_THREADS = 256
"""gRPC worker threads of the JobService: every Watch stream holds one until its job ends, so the pool
must outnumber the streams clients keep open, or Submit and Get queue behind them."""


def validate_spec(spec: job_pb2.QuantizeJob) -> None:
    """Checks that need no model: numbers in range, files present, the output path free."""
    if not spec.model_path:
        raise ConfigError("the job names no model_path")
    if not spec.output.path:
        raise ConfigError("the job names no output path")
    if not spec.output.formats:
        raise ConfigError("the job asks for no output format")
    recipe = recipe_from_proto(spec.recipe)
    out = Path(spec.output.path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AlreadyExistsError(f"output path {out} exists and is not an empty directory")
    calibrated = recipe.calibration_needs
    needs_data = bool(calibrated)
    cal = spec.calibration
    if needs_data:
        if not cal.files:
            raise ConfigError(f"the recipe's {', '.join(calibrated)} needs calibration files")
        if not 0 < cal.samples <= MAX_CALIB_SAMPLES:
            raise ConfigError(f"calibration samples must be in 1..{MAX_CALIB_SAMPLES}, got {cal.samples}")
        if not 0 < cal.seq_len <= MAX_SEQ_LEN:
            raise ConfigError(f"calibration seq_len must be in 1..{MAX_SEQ_LEN}, got {cal.seq_len}")
        if cal.HasField("holdout_samples") and not 0 <= cal.holdout_samples <= MAX_CALIB_SAMPLES:
            raise ConfigError(
                f"calibration holdout_samples must be in 0..{MAX_CALIB_SAMPLES}, got {cal.holdout_samples}")
    if spec.eval.seq_len < 0 or spec.eval.seq_len > MAX_SEQ_LEN:
        raise ConfigError(f"eval seq_len must be in 1..{MAX_SEQ_LEN}, got {spec.eval.seq_len}")
    for f in [*(cal.files if needs_data else []), *spec.eval.files]:
        if not Path(f).is_file():
            raise ConfigError(f"data file {f} does not exist or is not a file")


def confine_to_roots(spec: job_pb2.QuantizeJob, grant: Grant) -> None:
    """Refuse a job that would read or write outside its caller's project roots.

    Checked before anything about the paths is (existence included), so a caller learns nothing about
    files it may not read. Every entry of the model directory is checked as well: a file symlinked out
    of a root is read by the workers like any other.
    """
    paths = [("model_path", spec.model_path), ("output path", spec.output.path),
             *(("calibration file", f) for f in spec.calibration.files), *(("eval file", f) for f in spec.eval.files)]
    for what, path in paths:
        if path and not grant.confines(path):
            raise PermissionDeniedError(f"{what} {path} is outside the roots of project {grant.project}")
    model = Path(spec.model_path)
    if spec.model_path and model.is_dir():
        for entry in model.iterdir():
            if not grant.confines(entry):
                raise PermissionDeniedError(
                    f"{entry} in model_path leads outside the roots of project {grant.project}")


def check_model_size(model_path: str, limit: int) -> None:
    """Refuse a checkpoint whose *.safetensors files weigh more than `limit` bytes."""
    model = Path(model_path)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors")) if model.is_dir() else 0
    if size > limit:
        raise ResourceExhaustedError(f"model {model_path} holds {size:,} bytes of safetensors; the limit is {limit:,}")


def party_of(job: job_pb2.Job) -> str:
    """Whom fair sharing counts a job against: its project, else its submitter."""
    return job.project or job.owner


def check_access(job: job_pb2.Job) -> None:
    """Refuse the caller a job of another project (admins and unauthenticated servers see every job)."""
    grant = caller()
    if grant is not None and not grant.admin and job.project != grant.project:
        raise PermissionDeniedError(f"job {job.job_id} belongs to another project than {grant.project}")


class Coordinator(job_pb2_grpc.JobServiceServicer):
    def __init__(self, jobs: JobStore, stubs: Stubs, *, max_concurrent_jobs: int | None = None,
                 limits: Limits | None = None, host_memory_bytes: int | None = None) -> None:
        self._jobs = jobs
        self._stubs = stubs
        self._limits = limits or Limits()
        if max_concurrent_jobs is not None and max_concurrent_jobs < 1:
            raise ConfigError(f"jobs running at once must be at least 1, got {max_concurrent_jobs}")
        running = max_concurrent_jobs or len(stubs.solvers)  # each running job leases a replica at least
        self._scheduler = Scheduler([s.worker for s in stubs.solvers],
                                    host_memory_bytes or host_memory_from_env(), max_running=running)
        self._pool = ThreadPoolExecutor(max_workers=running, thread_name_prefix="bitsmith-job")
        self._cancel: dict[str, threading.Event] = {}
        self._observed: set[str] = set()
        self._lock = threading.Lock()
        self.metrics = CoordinatorMetrics(jobs, usage=self._usage)
        self._http: CoordinatorHttp | None = None

    @property
    def http_address(self) -> str | None:
        """Where the HTTP port (health, metrics, reports) listens; None if it was not opened."""
        return self._http.address if self._http else None

    def serve_http(self, host: str, port: int, *, grpc_target: str, security: SecurityConfig | None = None) -> str:
        """Open the HTTP port on `host`:`port` (0: a free one); `shutdown()` closes it. Returns its address.

        `grpc_target` is where this coordinator's JobService answers, for /healthz to ask (over TLS when
        `security` has it); `security`'s tokens guard the reports as they guard the JobService.
        """
        http = CoordinatorHttp(host, port, jobs=self._jobs, metrics=self.metrics, grpc_target=grpc_target,
                               tls=security.tls.client if security and security.tls else None,
                               grants=security.tokens if security else None)
        http.start()
        self._http = http
        return http.address

    def recover(self) -> None:
        """After a restart: fail jobs caught running (removing their staged output), requeue queued ones."""
        for job in self._jobs.list_jobs([common_pb2.JOB_STATE_RUNNING], limit=1_000_000):
            discard_outputs(self._stubs, job.spec)
            self.metrics.observe_job(self._jobs.transition(
                job.job_id, common_pb2.JOB_STATE_FAILED,
                error="the coordinator restarted while the job was running; its partial output was removed",
            ))
        for job in reversed(self._jobs.list_jobs([common_pb2.JOB_STATE_QUEUED], limit=1_000_000)):
            try:
                demand = self._demand(job.spec)
            except BitsmithError as exc:  # the cluster or the checkpoint changed while it was down
                self.metrics.observe_job(self._jobs.transition(
                    job.job_id, common_pb2.JOB_STATE_FAILED, error=f"cannot be placed after a restart: {exc}"))
                continue
            self._enqueue(job, demand)

    def _usage(self) -> Usage:
        with self._lock:
            return self._scheduler.usage()

    def _demand(self, spec: job_pb2.QuantizeJob) -> Demand:
        """What the job asks of the cluster, refused unless the cluster can ever give it."""
        demand = demand_of(spec, calibrated=bool(recipe_from_proto(spec.recipe).calibration_needs))
        limit = self._limits.max_gpus_per_job
        if limit is not None and demand.gpus > limit:
            raise ResourceExhaustedError(
                f"the job asks for {demand.gpus} solver replicas; the limit per job is {limit}")
        self._scheduler.check(demand)
        return demand

    def _enqueue(self, job: job_pb2.Job, demand: Demand) -> None:
        with self._lock:
            self._cancel.setdefault(job.job_id, threading.Event())
            self._scheduler.add(job.job_id, party_of(job), demand)
        self._dispatch()

    def _dispatch(self) -> None:
        """Start every queued job whose share of the cluster is free now."""
        with self._lock:
            for lease in self._scheduler.start_ready():
                self._pool.submit(self._run, lease, self._cancel[lease.job_id])

    def _run(self, lease: Lease, cancelled: threading.Event) -> None:
        """Run one job on what it leased, then feed its metrics (unless Cancel did, for a job cancelled in
        the queue), give its lease back and start what now fits."""
        job_id = lease.job_id
        try:
            if not cancelled.is_set() and self._jobs.get(job_id).state not in TERMINAL:
                JobRunner(self._jobs, self._stubs, job_id, cancelled,
                          [self._stubs.solvers[i] for i in lease.solvers]).run()
            job = self._jobs.get(job_id)
            if job.state in TERMINAL:
                self._observe_once(job)
        finally:
            with self._lock:
                self._scheduler.release(job_id)
                self._cancel.pop(job_id, None)
                self._observed.discard(job_id)
            self._dispatch()

    def _observe_once(self, job: job_pb2.Job) -> None:
        """Feed a final job to the metrics, once, while its `_run` is pending or running.

        A job cancelled in the queue is counted by Cancel at once (not when its turn in the pool comes,
        maybe hours later), and its `_run` must not count it again; nor may a Cancel that raced with a
        `_run` already over. So: only jobs with a pending `_run` (in `_cancel`) and each of them once.
        """
        with self._lock:
            if job.job_id not in self._cancel or job.job_id in self._observed:
                return
            self._observed.add(job.job_id)
        self.metrics.observe_job(job)

    def shutdown(self) -> None:
        with self._lock:
            for event in self._cancel.values():
                event.set()
        if self._http:
            self._http.stop()
        self._pool.shutdown(wait=True, cancel_futures=False)

    def Submit(self, request: job_pb2.SubmitRequest, context: grpc.ServicerContext) -> job_pb2.Job:
        spec = request.job
        grant = caller()
        known = self._jobs.find_by_request_id(spec.client_request_id) if spec.client_request_id else None
        if known is not None:
            job = self._jobs.get(known)
            check_access(job)
            return job
        if grant is not None:
            confine_to_roots(spec, grant)
        validate_spec(spec)
        if self._limits.max_model_bytes is not None:
            check_model_size(spec.model_path, self._limits.max_model_bytes)
        self._stubs.calibrator.Plan(
            calibrator_pb2.PlanRequest(model_path=spec.model_path, recipe=spec.recipe, formats=spec.output.formats),
            timeout=min(context.time_remaining() or PLAN_TIMEOUT_S, PLAN_TIMEOUT_S),  # no deadline: a huge one
        )
        demand = self._demand(spec)
        job, created = self._jobs.create(spec, owner=grant.client if grant else "",
                                         project=grant.project if grant else "",
                                         max_active=self._limits.max_jobs_per_client)
        if created:
            self._enqueue(job, demand)
        return job

    def _job(self, job_id: str) -> job_pb2.Job:
        """The job `job_id`, if the caller may see it."""
        job = self._jobs.get(job_id)
        check_access(job)
        return job

    def Get(self, request: job_pb2.GetJobRequest, context: grpc.ServicerContext) -> job_pb2.Job:
        return self._job(request.job_id)

    def List(self, request: job_pb2.ListJobsRequest, context: grpc.ServicerContext) -> job_pb2.ListJobsResponse:
        grant = caller()
        project = None if grant is None or grant.admin else grant.project
        return job_pb2.ListJobsResponse(
            jobs=self._jobs.list_jobs(list(request.states), request.limit or 100, project=project))

    def Cancel(self, request: job_pb2.CancelJobRequest, context: grpc.ServicerContext) -> job_pb2.Job:
        job = self._job(request.job_id)
        if job.state in TERMINAL:
            return job
        with self._lock:
            event = self._cancel.get(job.job_id)
            waiting = self._scheduler.remove(job.job_id)
        if event is not None:
            event.set()
        if job.state == common_pb2.JOB_STATE_QUEUED:
            job = self._jobs.transition(job.job_id, common_pb2.JOB_STATE_CANCELLED, message="cancelled while queued")
            self._observe_once(job)
            if waiting:  # no `_run` will come for it
                with self._lock:
                    self._cancel.pop(job.job_id, None)
                    self._observed.discard(job.job_id)
            return job
        return self._jobs.get(job.job_id)

    def Watch(self, request: job_pb2.WatchJobRequest, context: grpc.ServicerContext
              ) -> Iterator[common_pb2.ProgressEvent]:
        self._job(request.job_id)  # NOT_FOUND or PERMISSION_DENIED before streaming anything
        last = request.after_sequence
        while context.is_active():
            for event in self._jobs.events_after(request.job_id, last):
                last = event.sequence
                yield event
            if self._jobs.get(request.job_id).state in TERMINAL and not self._jobs.events_after(request.job_id, last):
                return
            self._jobs.wait_for_change(WATCH_POLL_S)


def create_server(address: str, *, db_path: Path, placement: Placement, max_concurrent_jobs: int | None = None,
                  http_port: int | None = 0, security: SecurityConfig | None = None,
                  host_memory_bytes: int | None = None) -> tuple[grpc.Server, int, Coordinator]:
    """Start the worker services (through `placement`), then the JobService on `address` ("host:port").

    The coordinator's HTTP port opens on the same host at `http_port` (0: a free one; None: no HTTP
    port); `coordinator.http_address` says where, and `coordinator.shutdown()` closes it. `security`
    (None: plaintext, open) secures the JobService and the channels to the workers, which must be
    secured by the same config (`placement` starts them so; static ones are started with it).
    `max_concurrent_jobs` caps the jobs running at once (None: as many as there are solver replicas, each
    holding one at least), `host_memory_bytes` (None: $BITSMITH_HOST_MEMORY,
    else 3/4 of this host's) the calibrator host memory they hold (see `scheduler`).
    """
    with securing(security):
        addresses = placement.start()
        stubs = Stubs.connect(addresses, locate=placement.address)
    coordinator = Coordinator(JobStore(db_path), stubs, max_concurrent_jobs=max_concurrent_jobs,
                              limits=security.limits if security else None, host_memory_bytes=host_memory_bytes)
    coordinator.recover()
    binding = ServiceBinding.of(coordinator, job_pb2, job_pb2_grpc, "JobService")
    server, port = _create_server(address, [binding], component="coordinator", callers=Callers.CLIENTS,
                                  security=security, max_workers=COORDINATOR_THREADS)
    if http_port is not None:
        host = address.rpartition(":")[0]
        try:
            coordinator.serve_http(host, http_port, grpc_target=local_target(host, port), security=security)
        except BaseException:
            server.stop(grace=None)
            coordinator.shutdown()
            raise
    return server, port, coordinator

