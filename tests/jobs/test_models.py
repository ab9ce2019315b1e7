"""Constraints of jobs and attempts that the database enforces (a duplicate would be a bug)."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.models import F

from jobs.models import AttemptState, Job, JobAttempt
from tests.factories import JobAttemptFactory, JobFactory

pytestmark = pytest.mark.django_db


# --- one running attempt per job ---------------------------------------------------------------


def test_a_job_has_at_most_one_running_attempt():
    job = JobFactory(cur_retry=0)
    JobAttemptFactory(job=job, number=0, state=AttemptState.RUNNING)
    with pytest.raises(IntegrityError), transaction.atomic():
        JobAttemptFactory(job=job, number=1, state=AttemptState.RUNNING)
    assert JobAttempt.objects.filter(job=job).count() == 1


def test_a_second_attempt_may_run_once_the_first_ended():
    job = JobFactory()
    for number, state in enumerate(
        [AttemptState.FAILED, AttemptState.LOST, AttemptState.CANCELLED, AttemptState.RUNNING]
    ):
        JobAttemptFactory(job=job, number=number, state=state)
    assert JobAttempt.objects.filter(job=job, state=AttemptState.RUNNING).count() == 1


def test_marking_an_old_attempt_running_again_is_refused():
    job = JobFactory()
    old = JobAttemptFactory(job=job, number=0, state=AttemptState.FAILED)
    JobAttemptFactory(job=job, number=1, state=AttemptState.RUNNING)
    with pytest.raises(IntegrityError), transaction.atomic():
        JobAttempt.objects.filter(pk=old.pk).update(state=AttemptState.RUNNING)
    old.refresh_from_db()
    assert old.state == AttemptState.FAILED


def test_attempts_of_different_jobs_may_run_together():
    a, b = JobFactory(), JobFactory()
    JobAttemptFactory(job=a, number=0)
    JobAttemptFactory(job=b, number=0)
    assert JobAttempt.objects.filter(state=AttemptState.RUNNING).count() == 2


# --- attempt numbers ---------------------------------------------------------------------------


def test_attempt_numbers_are_unique_per_job():
    job = JobFactory()
    JobAttemptFactory(job=job, number=0, state=AttemptState.FAILED)
    with pytest.raises(IntegrityError), transaction.atomic():
        JobAttemptFactory(job=job, number=0, state=AttemptState.FAILED)
    assert JobAttempt.objects.filter(job=job).count() == 1


def test_the_same_attempt_number_in_another_job_is_fine():
    JobAttemptFactory(number=0, state=AttemptState.FAILED)
    JobAttemptFactory(number=0, state=AttemptState.FAILED)
    assert JobAttempt.objects.filter(number=0).count() == 2


# --- cur_retry <= retries ----------------------------------------------------------------------


def test_cur_retry_may_reach_retries():
    job = JobFactory(retries=2, cur_retry=2)
    job.refresh_from_db()
    assert job.cur_retry == job.retries == 2


def test_cur_retry_above_retries_is_refused_on_insert():
    with pytest.raises(IntegrityError), transaction.atomic():
        JobFactory(retries=2, cur_retry=3)
    assert not Job.objects.filter(cur_retry=3).exists()


def test_cur_retry_above_retries_is_refused_on_update():
    job = JobFactory(retries=1, cur_retry=1)
    with pytest.raises(IntegrityError), transaction.atomic():
        Job.objects.filter(pk=job.pk).update(cur_retry=F("cur_retry") + 1)
    with pytest.raises(IntegrityError), transaction.atomic():
        Job.objects.filter(pk=job.pk).update(retries=0)
    job.refresh_from_db()
    assert (job.cur_retry, job.retries) == (1, 1)


def test_job_uuid_is_unique():
    job = JobFactory()
    with pytest.raises(IntegrityError), transaction.atomic():
        JobFactory(uuid=job.uuid)


# --- the partial indexes of the polled states (DESIGN.md section 8) ----------------------------


@pytest.mark.skipif(connection.vendor != "postgresql", reason="pg_indexes")
@pytest.mark.parametrize(
    ("name", "columns", "where"),
    [
        ("job_defined_claim", "(device_type, rank DESC, id)", "'defined'"),
        ("job_queued_age", "(state_changed_at)", "'queued'"),
        ("job_running_pilot", "(pilot_id)", "'running'"),
    ],
)
def test_polled_states_have_partial_indexes(name, columns, where):
    with connection.cursor() as cur:
        cur.execute("SELECT tablename, indexdef FROM pg_indexes WHERE indexname = %s", [name])
        rows = cur.fetchall()
    assert len(rows) == 1, f"index {name} is missing"
    table, indexdef = rows[0]
    assert table == Job._meta.db_table
    assert columns in indexdef
    where_clause = indexdef.split(" WHERE ", 1)
    assert len(where_clause) == 2, indexdef
    assert "state" in where_clause[1] and where in where_clause[1]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="pg_indexes")
def test_one_running_attempt_is_a_partial_unique_index():
    with connection.cursor() as cur:
        cur.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'attempt_one_running_per_job'"
        )
        (indexdef,) = cur.fetchone()
    assert indexdef.startswith("CREATE UNIQUE INDEX")
    assert "(job_id)" in indexdef and "WHERE" in indexdef and "'running'" in indexdef
