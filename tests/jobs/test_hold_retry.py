"""Hold / release of jobs, retry of a task's failed jobs, and ``manage.py cancel``."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from files.models import Dataset, DatasetState
from jobs.control import job_hold, job_release, jobs_hold, jobs_release
from jobs.executor import dispatch
from jobs.models import FINAL_JOB_STATES, Job, JobAttempt, JobState
from tasks.finalizer import task_finalize
from tasks.lifecycle import task_retry_failed
from tasks.models import TaskState
from tests.factories import JobAttemptFactory, JobFactory, TaskFactory
from tests.tasks.test_finalize import _task
from wms.exceptions import InvalidTransition

pytestmark = pytest.mark.django_db


def test_failed_is_still_final():
    assert set(FINAL_JOB_STATES) == {"finished", "failed", "cancelled"}


def test_a_held_job_is_not_dispatched_and_released_it_is(bus_prefix, drain_queue):
    task = TaskFactory(state=TaskState.RUNNING)
    held, other = JobFactory(task=task), JobFactory(task=task)
    job_hold(job_id=held.pk, source="api", reason="check inputs")
    assert dispatch().total == 1
    assert [m["job_uuid"] for m, _ in drain_queue("cpu")] == [str(other.uuid)]
    held.refresh_from_db()
    assert held.state == JobState.HELD
    tr = held.transitions.get()
    assert (tr.from_state, tr.to_state, tr.source, tr.reason) == (
        "defined",
        "held",
        "api",
        "check inputs",
    )

    assert job_release(job_id=held.pk, source="api").won
    assert dispatch().total == 1
    assert [m["job_uuid"] for m, _ in drain_queue("cpu")] == [str(held.uuid)]


def test_a_held_queued_job_is_refused_at_start(make_pilot):
    job = JobFactory(state=JobState.QUEUED)
    job_hold(job_id=job.pk, source="admin")
    _pilot, client = make_pilot()
    resp = client.post(f"/api/v1/jobs/{job.uuid}/start/", {"attempt": 0})
    assert resp.status_code == 409 and resp.json()["error"] == "job_not_queued"
    job.refresh_from_db()
    assert job.state == JobState.HELD and not JobAttempt.objects.filter(job=job).exists()


def test_hold_and_release_refuse_other_states():
    running = JobFactory(state=JobState.RUNNING)
    with pytest.raises(InvalidTransition):
        job_hold(job_id=running.pk, source="api")
    queued = JobFactory(state=JobState.QUEUED)
    with pytest.raises(InvalidTransition):
        job_release(job_id=queued.pk, source="api")  # queued -> defined is not a release
    defined = JobFactory()
    assert not job_release(job_id=defined.pk, source="api").won  # no-op
    assert not defined.transitions.exists()


def test_bulk_hold_and_release_skip_what_does_not_fit():
    jobs = [JobFactory(), JobFactory(state=JobState.QUEUED), JobFactory(state=JobState.RUNNING)]
    ids = [j.pk for j in jobs]
    assert jobs_hold(job_ids=ids, source="admin") == 2
    assert jobs_hold(job_ids=ids, source="admin") == 0
    assert jobs_release(job_ids=ids, source="admin") == 2
    assert sorted(Job.objects.filter(pk__in=ids).values_list("state", flat=True)) == [
        "defined",
        "defined",
        "running",
    ]


def test_api_hold_release_and_ownership(api_client, user, other_user):
    job = JobFactory(task=TaskFactory(owner=user))
    resp = api_client.post(f"/api/v1/jobs/{job.pk}/hold/", {"reason": "wait"}, format="json")
    assert resp.status_code == 200 and resp.json()["state"] == "held"
    assert api_client.post(f"/api/v1/jobs/{job.pk}/hold/").status_code == 200  # no-op
    resp = api_client.post(f"/api/v1/jobs/{job.pk}/release/")
    assert resp.status_code == 200 and resp.json()["state"] == "defined"
    assert [t.source for t in job.transitions.all()] == ["api", "api"]
    finished = JobFactory(task=TaskFactory(owner=user), state=JobState.FINISHED)
    assert api_client.post(f"/api/v1/jobs/{finished.pk}/hold/").status_code == 409
    theirs = JobFactory(task=TaskFactory(owner=other_user))
    assert api_client.post(f"/api/v1/jobs/{theirs.pk}/hold/").status_code == 404


def test_retry_of_failed_jobs_reopens_a_failed_task(user):
    task = _task(user, 2)
    failed_job, ok = Job.objects.filter(task=task).order_by("id")
    Job.objects.filter(pk=failed_job.pk).update(state=JobState.FAILED, cur_retry=3, retries=3)
    JobAttemptFactory(job=failed_job, number=3, state="failed")
    Job.objects.filter(pk=ok.pk).update(state=JobState.FINISHED)
    assert task_finalize(task_id=task.pk).state == TaskState.FAILED
    task.refresh_from_db()
    old_out = task.data_out_uid
    assert Dataset.objects.get(uid=old_out).state == DatasetState.CLOSED

    assert task_retry_failed(task_id=task.pk, source="api", reason="fixed") == 1

    failed_job.refresh_from_db()
    assert failed_job.state == JobState.DEFINED
    assert (failed_job.cur_retry, failed_job.retries) == (4, 4)
    assert failed_job.attempts.count() == 1  # kept
    task.refresh_from_db()
    assert task.state == TaskState.RUNNING and task.output_closed_at is None
    # the closed output dataset takes no more files: the retried jobs write into a new one
    assert task.data_out_uid != old_out
    assert Dataset.objects.get(uid=task.data_out_uid).state == DatasetState.OPEN
    # nothing failed any more: a no-op
    assert task_retry_failed(task_id=task.pk, source="api") == 0


def test_retry_api_and_cancelled_task_409(api_client, user):
    task = TaskFactory(owner=user, state=TaskState.RUNNING)
    job = JobFactory(task=task, state=JobState.FAILED)
    resp = api_client.post(f"/api/v1/tasks/{task.pk}/retry/")
    assert resp.status_code == 200 and resp.json()["state"] == "running"
    job.refresh_from_db()
    assert job.state == JobState.DEFINED and job.transitions.get().source == "api"
    cancelled = TaskFactory(owner=user, state=TaskState.CANCELLED)
    JobFactory(task=cancelled, state=JobState.FAILED)
    resp = api_client.post(f"/api/v1/tasks/{cancelled.pk}/retry/")
    assert resp.status_code == 409 and resp.json()["error"] == "invalid_transition"


def test_cancel_command_task_and_jobs():
    task = TaskFactory(state=TaskState.RUNNING)
    JobFactory(task=task), JobFactory(task=task, state=JobState.HELD)
    out = StringIO()
    call_command("cancel", "--task", str(task.pk), "--reason", "bad config", stdout=out)
    assert f"task {task.pk}: running -> cancelled; 2 job(s) cancelled" in out.getvalue()
    assert set(Job.objects.filter(task=task).values_list("state", flat=True)) == {"cancelled"}
    assert task.transitions.get().source == "command"
    out = StringIO()
    call_command("cancel", "--task", str(task.pk), stdout=out)
    assert "already cancelled" in out.getvalue()

    a, b = JobFactory(), JobFactory(state=JobState.QUEUED)
    out = StringIO()
    call_command("cancel", "--job", str(a.pk), "--job", str(b.pk), stdout=out)
    assert f"job {a.pk}: defined -> cancelled" in out.getvalue()
    assert f"job {b.pk}: queued -> cancelled" in out.getvalue()

    done = JobFactory(state=JobState.FINISHED)
    with pytest.raises(CommandError):
        call_command("cancel", "--job", str(done.pk), stdout=StringIO(), stderr=StringIO())
    finished_task = TaskFactory(state=TaskState.FINISHED)
    with pytest.raises(CommandError, match="finished"):
        call_command("cancel", "--task", str(finished_task.pk), stdout=StringIO())
    with pytest.raises(CommandError):
        call_command("cancel", "--task", "987654", stdout=StringIO())
