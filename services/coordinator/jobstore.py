"""The job store: SQLite, so every job and its progress outlive a coordinator restart.

Rows hold the job's spec and results as serialized protobuf (the wire contract is the schema), plus
the columns queries need. Every progress event is appended with a per-job sequence number, so
`Watch` can replay a job's history and then follow it, and a client that reconnects resumes where it
left off. All writes go through one lock and short transactions; readers use their own connection.
Each job names the client that submitted it and that client's project (columns too, so a project's
jobs and a client's active ones are one indexed query).
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from bitsmith.errors import ConfigError, NotFoundError, ResourceExhaustedError
from bitsmith.v1 import common_pb2, job_pb2
from google.protobuf.timestamp_pb2 import Timestamp

TERMINAL = frozenset({
    common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED,
})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    client_request_id TEXT UNIQUE,
    state INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    job BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL REFERENCES jobs(job_id),
    sequence INTEGER NOT NULL,
    event BLOB NOT NULL,
    PRIMARY KEY (job_id, sequence)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, created_ns);
"""

_OWNERSHIP = {"owner": "TEXT NOT NULL DEFAULT ''", "project": "TEXT NOT NULL DEFAULT ''"}
"""Columns added after the first schema: a store written before them gains them (empty: nobody's) on open."""
_OWNERSHIP_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_by_project ON jobs(project, created_ns);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs(owner, state);
"""
ACTIVE = (common_pb2.JOB_STATE_QUEUED, common_pb2.JOB_STATE_RUNNING)


JOB_ID = re.compile(r"[0-9a-f]{16}")
"""What a job id looks like: 16 lowercase hex digits (`new_job_id`); anything else names no job."""


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


class JobStore:
    """Durable job records. Thread-safe; one instance per coordinator process."""

    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the job store at {path}: {exc}") from exc
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, decl in _OWNERSHIP.items():
            if name not in columns:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
        self._db.executescript(_OWNERSHIP_INDEXES)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self._changed.notify_all()

    def create(self, spec: job_pb2.QuantizeJob, *, owner: str = "", project: str = "",
               max_active: int | None = None) -> tuple[job_pb2.Job, bool]:
        """Insert a queued job of `owner` in `project`; returns (job, created). A known client_request_id
        returns its job. With `max_active`, an owner with that many queued or running jobs gets
        `ResourceExhaustedError` (counted in the insert's transaction, so racing submits cannot both pass).
        """
        with self._tx() as db:
            if spec.client_request_id:
                row = db.execute(
                    "SELECT job FROM jobs WHERE client_request_id = ?", (spec.client_request_id,)
                ).fetchone()
                if row:
                    return job_pb2.Job.FromString(row[0]), False
            if max_active is not None:
                (active,) = db.execute(
                    f"SELECT COUNT(*) FROM jobs WHERE owner = ? AND state IN ({','.join('?' * len(ACTIVE))})",
                    (owner, *ACTIVE),
                ).fetchone()
                if active >= max_active:
                    raise ResourceExhaustedError(
                        f"client {owner or '(anonymous)'} has {active} queued or running jobs; the limit is "
                        f"{max_active}: wait for one to end or cancel one")
            job = job_pb2.Job(
                job_id=new_job_id(), spec=spec, state=common_pb2.JOB_STATE_QUEUED,
                created_at=_now(), owner=owner, project=project,
            )
            db.execute(
                "INSERT INTO jobs (job_id, client_request_id, state, created_ns, job, owner, project)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job.job_id, spec.client_request_id or None, job.state, time.time_ns(),
                 job.SerializeToString(), owner, project),
            )
        self.append_event(job.job_id, phase="queued", message="job accepted")
        return self.get(job.job_id), True

    def find_by_request_id(self, client_request_id: str) -> str | None:
        """The id of the job submitted with `client_request_id`, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT job_id FROM jobs WHERE client_request_id = ?", (client_request_id,)
            ).fetchone()
        return str(row[0]) if row else None

    def get(self, job_id: str) -> job_pb2.Job:
        with self._lock:
            row = self._db.execute("SELECT job FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no job {job_id!r}")
        return job_pb2.Job.FromString(row[0])

    def list_jobs(self, states: Sequence[int] = (), limit: int = 100, *, project: str | None = None
                  ) -> list[job_pb2.Job]:
        """The newest `limit` jobs in any of `states` (all if empty), of `project` only unless it is None."""
        query = "SELECT job FROM jobs"
        where: list[str] = []
        args: list[object] = []
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(states)
        if project is not None:
            where.append("project = ?")
            args.append(project)
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY created_ns DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [job_pb2.Job.FromString(r[0]) for r in rows]

    def count_by_state(self) -> dict[int, int]:
        """How many jobs are in each state (states without jobs absent): one query, what metrics ask at
        every scrape, however many finished jobs the store keeps."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {int(state): int(count) for state, count in rows}

    def update(self, job: job_pb2.Job) -> None:
        """Persist the whole job record (state, progress, results)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = ?, job = ? WHERE job_id = ?",
                (job.state, job.SerializeToString(), job.job_id),
            )
            if cur.rowcount != 1:
                raise NotFoundError(f"no job {job.job_id!r}")

    def transition(self, job_id: str, state: int, *, error: str = "", message: str = "") -> job_pb2.Job:
        """Move a job to `state` (stamping start/finish times) and record the change as an event."""
        with self._lock:
            job = self.get(job_id)
            if job.state in TERMINAL:
                return job
            job.state = state  # type: ignore[assignment]
            if state == common_pb2.JOB_STATE_RUNNING:
                job.started_at.CopyFrom(_now())
            if state in TERMINAL:
                job.finished_at.CopyFrom(_now())
            if error:
                job.error = error
            # The state and its event under one hold of the (re-entrant) lock: a watcher woken by the
            # new state must also find its event, or it ends the stream without the final "done".
            self.update(job)
            phase = "start" if state == common_pb2.JOB_STATE_RUNNING else "done" if state in TERMINAL else "queued"
            self.append_event(job_id, phase=phase, message=message or error)
            return self.get(job_id)

    def append_event(self, job_id: str, *, phase: str, message: str = "", block: int = -1,
                     num_blocks: int = 0, step: int = 0, total_steps: int = 0) -> common_pb2.ProgressEvent:
        with self._tx() as db:
            row = db.execute("SELECT job FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no job {job_id!r}")
            job = job_pb2.Job.FromString(row[0])
            (last,) = db.execute(
                "SELECT COALESCE(MAX(sequence), 0) FROM events WHERE job_id = ?", (job_id,)
            ).fetchone()
            if step == 0 and job.HasField("progress"):
                step, total_steps = job.progress.step, job.progress.total_steps
            event = common_pb2.ProgressEvent(
                job_id=job_id, state=job.state, phase=phase, block=block, num_blocks=num_blocks,
                step=step, total_steps=total_steps, message=message, time=_now(), sequence=last + 1,
            )
            db.execute("INSERT INTO events (job_id, sequence, event) VALUES (?, ?, ?)",
                       (job_id, event.sequence, event.SerializeToString()))
            job.progress.CopyFrom(event)
            db.execute("UPDATE jobs SET job = ? WHERE job_id = ?", (job.SerializeToString(), job_id))
        return event

    def events_after(self, job_id: str, sequence: int) -> list[common_pb2.ProgressEvent]:
        with self._lock:
            rows = self._db.execute(
                "SELECT event FROM events WHERE job_id = ? AND sequence > ? ORDER BY sequence",
                (job_id, sequence),
            ).fetchall()
        return [common_pb2.ProgressEvent.FromString(r[0]) for r in rows]

    def wait_for_change(self, timeout: float) -> None:
        """Block until some job changes (or `timeout` passes): how Watch follows a job cheaply."""
        with self._changed:
            self._changed.wait(timeout)
