"""The SQLite job store: durable across reopen, idempotent on client_request_id, ordered events."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from bitsmith.errors import NotFoundError
from bitsmith.v1 import common_pb2, job_pb2
from bitsmith_services.coordinator.jobstore import JobStore


def _spec(request_id: str = "") -> job_pb2.QuantizeJob:
    return job_pb2.QuantizeJob(model_path="/m", client_request_id=request_id)


def test_jobs_and_events_survive_reopening(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    job, created = store.create(_spec())
    assert created and job.state == common_pb2.JOB_STATE_QUEUED
    store.transition(job.job_id, common_pb2.JOB_STATE_RUNNING)
    store.append_event(job.job_id, phase="solve", block=2, num_blocks=4, step=3, total_steps=9)
    store.close()

    reopened = JobStore(tmp_path / "jobs.sqlite")
    again = reopened.get(job.job_id)
    assert again.state == common_pb2.JOB_STATE_RUNNING and again.started_at.seconds > 0
    assert again.progress.phase == "solve" and again.progress.step == 3
    events = reopened.events_after(job.job_id, 0)
    assert [e.phase for e in events] == ["queued", "start", "solve"]
    assert [e.sequence for e in events] == [1, 2, 3]
    assert [e.phase for e in reopened.events_after(job.job_id, 2)] == ["solve"]


def test_client_request_id_returns_the_same_job(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    first, created = store.create(_spec("abc"))
    second, created_again = store.create(_spec("abc"))
    assert created and not created_again and second.job_id == first.job_id
    assert store.find_by_request_id("abc") == first.job_id and store.find_by_request_id("zzz") is None
    other, _ = store.create(_spec())
    assert other.job_id != first.job_id


def test_terminal_states_are_final_and_stamped(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.create(_spec())
    failed = store.transition(job.job_id, common_pb2.JOB_STATE_FAILED, error="boom")
    assert failed.error == "boom" and failed.finished_at.seconds > 0
    assert store.transition(job.job_id, common_pb2.JOB_STATE_SUCCEEDED).state == common_pb2.JOB_STATE_FAILED
    assert [j.job_id for j in store.list_jobs([common_pb2.JOB_STATE_FAILED])] == [job.job_id]
    assert store.list_jobs([common_pb2.JOB_STATE_RUNNING]) == []


def test_unknown_job_raises_not_found(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    with pytest.raises(NotFoundError, match="nope"):
        store.get("nope")
    with pytest.raises(NotFoundError):
        store.append_event("nope", phase="x")


def test_concurrent_event_appends_keep_sequences_unique(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.create(_spec())
    threads = [threading.Thread(target=lambda: [store.append_event(job.job_id, phase="p") for _ in range(25)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sequences = [e.sequence for e in store.events_after(job.job_id, 0)]
    assert sequences == list(range(1, 102))
