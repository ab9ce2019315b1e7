"""Pause means no new starts (issue 13, item 5): a paused task's queued jobs go back to wait, and
a start whose message was already on the broker is refused (``task_paused``); resume lets the
jobs run again."""

from __future__ import annotations

import uuid

import pytest

from jobs.executor import dispatch
from jobs.models import Job, JobAttempt, JobState, JobTransition
from pilots.models import Pilot, PilotState
from pilots.protocol import pilot_job_start
from tasks.lifecycle import task_pause, task_resume
from tasks.models import Task, TaskState
from tests.factories import JobFactory, TaskFactory
from tests.wms.test_idempotency import start_url
from wms.exceptions import TaskPaused

pytestmark = pytest.mark.django_db


def _paused_task_with_a_queued_job():
    """The race the pause cannot see: the executor's claim commits after the pause, so a job
    of a paused task is ``queued`` and its message is on the broker."""
    task = TaskFactory(state=TaskState.RUNNING)
    job = JobFactory(task=task, state=JobState.QUEUED)
    Task.objects.filter(pk=task.pk).update(state=TaskState.PAUSED)
    return task, job


def test_a_start_of_a_paused_tasks_job_is_refused_and_the_job_goes_back_to_wait(make_pilot):
    pilot, _client = make_pilot()
    _task, job = _paused_task_with_a_queued_job()

    with pytest.raises(TaskPaused):
        pilot_job_start(pilot=pilot, job_uuid=job.uuid, attempt=0)

    job.refresh_from_db()
    assert (job.state, job.pilot_id, job.cur_retry) == (JobState.DEFINED, None, 0)
    assert not JobAttempt.objects.filter(job=job).exists()
    (transition,) = JobTransition.objects.filter(subject=job)
    assert (transition.from_state, transition.to_state) == ("queued", "defined")
    assert transition.source == f"pilot:{pilot.pk}" and "paused" in transition.reason
    assert Pilot.objects.get(pk=pilot.pk).state != PilotState.BUSY


@pytest.mark.parametrize("keyed", [False, True])
def test_the_api_answers_409_task_paused_and_keeps_the_job_waiting(make_pilot, keyed):
    """With an idempotency key too: the refusal's change (queued → defined) is committed with
    its stored answer, and the same call sent again gets the same 409 and changes nothing."""
    _pilot, client = make_pilot()
    _task, job = _paused_task_with_a_queued_job()
    headers = {"HTTP_IDEMPOTENCY_KEY": str(uuid.uuid4())} if keyed else {}

    response = client.post(start_url(job), {"attempt": 0}, format="json", **headers)

    assert response.status_code == 409, response.json()
    assert response.json()["error"] == "task_paused"
    job.refresh_from_db()
    assert job.state == JobState.DEFINED
    assert JobTransition.objects.filter(subject=job).count() == 1

    again = client.post(start_url(job), {"attempt": 0}, format="json", **headers)
    assert again.status_code == 409
    # a replay (keyed) or a fresh refusal: the job is no longer queued
    assert again.json()["error"] == ("task_paused" if keyed else "job_not_queued")
    assert ("Idempotent-Replayed" in again.headers) is keyed
    job.refresh_from_db()
    assert job.state == JobState.DEFINED
    assert JobTransition.objects.filter(subject=job).count() == 1
    assert not JobAttempt.objects.filter(job=job).exists()


def test_pause_puts_the_queued_jobs_back_and_leaves_the_running_ones(make_pilot):
    pilot, _client = make_pilot()
    task = TaskFactory(state=TaskState.RUNNING)
    queued = JobFactory.create_batch(3, task=task, state=JobState.QUEUED)
    running = JobFactory(task=task, state=JobState.QUEUED)
    pilot_job_start(pilot=pilot, job_uuid=running.uuid, attempt=0)
    other = JobFactory(state=JobState.QUEUED)  # another task's job is not touched

    result = task_pause(task_id=task.pk, source="user:1", reason="look at the outputs")

    assert result.won
    states = dict(Job.objects.filter(task=task).values_list("pk", "state"))
    assert {states[j.pk] for j in queued} == {JobState.DEFINED}
    assert states[running.pk] == JobState.RUNNING
    assert Job.objects.get(pk=other.pk).state == JobState.QUEUED
    reasons = set(
        JobTransition.objects.filter(subject__in=queued).values_list("source", "reason", "to_state")
    )
    assert reasons == {("user:1", "task paused: look at the outputs", "defined")}
    # a message of a put-back job, consumed now, starts nothing
    with pytest.raises(Exception) as refused:
        pilot_job_start(pilot=pilot, job_uuid=queued[0].uuid, attempt=0)
    assert getattr(refused.value, "code", None) == "job_not_queued"


def test_a_paused_task_dispatches_nothing_and_its_resume_lets_the_jobs_run(make_pilot, bus_prefix):
    pilot, _client = make_pilot()
    task = TaskFactory(state=TaskState.RUNNING, executor_enabled=True)
    jobs = JobFactory.create_batch(2, task=task, state=JobState.QUEUED)
    task_pause(task_id=task.pk, source="user:1")
    assert dispatch().total == 0
    assert set(Job.objects.filter(task=task).values_list("state", flat=True)) == {"defined"}

    task_resume(task_id=task.pk, source="user:1")
    assert dispatch().total == 2
    for job in jobs:  # the same attempt, dispatched again, starts
        message = pilot_job_start(pilot=pilot, job_uuid=job.uuid, attempt=0)
        assert message.job_uuid == str(job.uuid) and message.attempt == 0
    assert set(Job.objects.filter(task=task).values_list("state", flat=True)) == {"running"}
