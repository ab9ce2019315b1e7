"""jobs.control on the real database: moving and cancelling jobs (building them:
test_build.py)."""

from __future__ import annotations

import pytest
from django.utils import timezone

from jobs.control import job_cancel, job_transition, jobs_cancel
from jobs.models import AttemptState, JobState, JobTransition
from tests.factories import JobAttemptFactory, JobFactory, TaskFactory
from wms.exceptions import InvalidTransition, NotFound

pytestmark = pytest.mark.django_db


# --- job_transition ----------------------------------------------------------------------------


def test_job_transition_logs_source_and_reason():
    job = JobFactory(state=JobState.DEFINED)
    assert job_transition(job_id=job.pk, target=JobState.QUEUED, source="executor", reason="b1").won
    job.refresh_from_db()
    assert job.state == JobState.QUEUED
    row = job.transitions.get()
    assert (row.from_state, row.to_state, row.source, row.reason) == (
        "defined",
        "queued",
        "executor",
        "b1",
    )


def test_job_transition_refuses_a_forbidden_state():
    job = JobFactory(state=JobState.DEFINED)
    with pytest.raises(InvalidTransition):
        job_transition(job_id=job.pk, target=JobState.FINISHED, source="pilot:1")
    job.refresh_from_db()
    assert job.state == JobState.DEFINED and not job.transitions.exists()


# --- job_cancel --------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [JobState.DEFINED, JobState.QUEUED])
def test_job_cancel_before_it_runs(state):
    job = JobFactory(state=state)
    before = timezone.now()

    result = job_cancel(job_id=job.pk, source="api", reason="not needed")

    assert result.won and result.from_state == state
    job.refresh_from_db()
    assert job.state == JobState.CANCELLED
    assert job.time_end is not None and job.time_end >= before
    row = job.transitions.get()
    assert (row.from_state, row.to_state, row.source, row.reason) == (
        state,
        "cancelled",
        "api",
        "not needed",
    )


def test_job_cancel_of_a_running_job_marks_the_running_attempt():
    job = JobFactory(state=JobState.RUNNING, cur_retry=1)
    earlier = JobAttemptFactory(job=job, number=0, state=AttemptState.FAILED)
    attempt = JobAttemptFactory(job=job, number=1)
    other = JobAttemptFactory(job=JobFactory(state=JobState.RUNNING))
    before = timezone.now()

    assert job_cancel(job_id=job.pk, source="api").won

    job.refresh_from_db()
    attempt.refresh_from_db()
    earlier.refresh_from_db()
    other.refresh_from_db()
    assert job.state == JobState.CANCELLED
    assert attempt.state == AttemptState.CANCELLED
    assert attempt.kill_requested_at is not None and attempt.kill_requested_at >= before
    assert attempt.ended_at == attempt.kill_requested_at == job.time_end
    assert attempt.kill_acked_at is None  # the pilot has not confirmed the kill yet
    assert earlier.state == AttemptState.FAILED and earlier.kill_requested_at is None
    assert other.state == AttemptState.RUNNING and other.kill_requested_at is None


def test_job_cancel_is_idempotent():
    job = JobFactory(state=JobState.RUNNING)
    attempt = JobAttemptFactory(job=job)
    first = job_cancel(job_id=job.pk, source="api")
    attempt.refresh_from_db()
    kill_time = attempt.kill_requested_at
    job.refresh_from_db()
    end = job.time_end

    second = job_cancel(job_id=job.pk, source="api")

    assert first.won is True and second.won is False
    assert second.from_state == JobState.CANCELLED
    job.refresh_from_db()
    attempt.refresh_from_db()
    assert job.time_end == end  # not rewritten by the repeat
    assert attempt.kill_requested_at == kill_time
    assert JobTransition.objects.filter(subject=job).count() == 1


@pytest.mark.parametrize("state", [JobState.FINISHED, JobState.FAILED])
def test_job_cancel_of_a_final_job_is_refused(state):
    job = JobFactory(state=state)
    with pytest.raises(InvalidTransition) as info:
        job_cancel(job_id=job.pk, source="api")
    assert info.value.status == 409
    job.refresh_from_db()
    assert job.state == state and job.time_end is None
    assert not job.transitions.exists()


def test_job_cancel_missing_job():
    with pytest.raises(NotFound):
        job_cancel(job_id=987654, source="api")


# --- jobs_cancel -------------------------------------------------------------------------------


def test_jobs_cancel_skips_final_and_missing_jobs():
    task = TaskFactory()
    jobs = {state: JobFactory(task=task, state=state) for state in JobState.values}

    n = jobs_cancel(job_ids=[j.pk for j in jobs.values()] + [987654], source="reaper")

    assert n == 4
    for was, job in jobs.items():
        job.refresh_from_db()
        if was in (JobState.DEFINED, JobState.QUEUED, JobState.HELD, JobState.RUNNING):
            assert job.state == JobState.CANCELLED
            assert job.transitions.get().source == "reaper"
        else:
            assert job.state == was
            assert not job.transitions.exists()
    # twice: nothing left to cancel
    assert jobs_cancel(job_ids=[j.pk for j in jobs.values()], source="reaper") == 0


def test_jobs_cancel_of_nothing():
    assert jobs_cancel(job_ids=[], source="api") == 0
