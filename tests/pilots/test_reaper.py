"""The end of pilots: the reaper of silent pilots, and a pilot's own terminate."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from jobs.models import AttemptState, Job, JobAttempt, JobState
from pilots.models import Pilot, PilotState
from pilots.services import pilot_terminate, pilots_reap_lost
from pilots.tasks import reap_pilots
from tests.factories import JobAttemptFactory, JobFactory, PilotFactory
from tests.wms.test_race import TIMEOUT, Racer
from wms.switches import switch_set

pytestmark = pytest.mark.django_db

LONG_AGO = timedelta(minutes=30)


def running_attempt(pilot, **job_fields):
    job = JobFactory(state=JobState.RUNNING, pilot=pilot, **job_fields)
    return JobAttemptFactory(job=job, pilot=pilot, number=job.cur_retry)


def test_silent_pilots_are_lost_and_their_attempts_retried_or_failed():
    silent = PilotFactory(state=PilotState.BUSY, last_heartbeat=timezone.now() - LONG_AGO)
    idle_silent = PilotFactory(state=PilotState.IDLE, last_heartbeat=timezone.now() - LONG_AGO)
    alive = PilotFactory(state=PilotState.BUSY)
    retry = running_attempt(silent, retries=3, cur_retry=1)
    last = running_attempt(silent, retries=1, cur_retry=1)
    untouched = running_attempt(alive)

    result = pilots_reap_lost()

    assert (result.pilots, result.attempts, result.retried, result.failed) == (2, 2, 1, 1)
    for pilot in (silent, idle_silent):
        pilot.refresh_from_db()
        assert pilot.state == PilotState.LOST
        assert pilot.transitions.get().source == "reaper"
    assert Pilot.objects.get(pk=alive.pk).state == PilotState.BUSY
    for attempt in (retry, last):
        attempt.refresh_from_db()
        assert (attempt.state, attempt.error_code) == (AttemptState.LOST, "lost_heartbeat")
        assert attempt.ended_at is not None
    retried, failed = Job.objects.get(pk=retry.job_id), Job.objects.get(pk=last.job_id)
    assert (retried.state, retried.cur_retry) == (JobState.DEFINED, 2)
    assert (failed.state, failed.cur_retry) == (JobState.FAILED, 1)
    assert failed.time_end is not None
    assert retried.transitions.get().source == "reaper"
    untouched.refresh_from_db()
    assert untouched.state == AttemptState.RUNNING
    assert Job.objects.get(pk=untouched.job_id).state == JobState.RUNNING
    # the attempt history is kept: a new attempt gets the next number
    assert list(JobAttempt.objects.filter(job=retried).values_list("number", "state")) == [
        (1, "lost")
    ]

    again = pilots_reap_lost()  # nothing left to do
    assert (again.pilots, again.attempts, again.holding) == (0, 0, False)


def test_a_job_running_again_elsewhere_is_not_touched_by_its_old_pilots_end():
    """The job's attempt 0 ran on a pilot now lost (or terminated); attempt 1 runs on a live
    pilot. Neither the reaper nor the old pilot's terminate may touch attempt 1."""
    old = PilotFactory(state=PilotState.BUSY, last_heartbeat=timezone.now() - LONG_AGO)
    gone = PilotFactory(state=PilotState.BUSY)
    live = PilotFactory(state=PilotState.BUSY)
    jobs = []
    for previous in (old, gone):
        job = JobFactory(state=JobState.RUNNING, cur_retry=1, retries=3, pilot=live)
        JobAttemptFactory(job=job, pilot=previous, number=0, state=AttemptState.FAILED)
        jobs.append((job, JobAttemptFactory(job=job, pilot=live, number=1)))

    assert pilots_reap_lost().attempts == 0
    assert pilot_terminate(pilot_id=gone.pk, source="admin").attempts_failed == 0

    assert Pilot.objects.get(pk=old.pk).state == PilotState.LOST
    for job, current in jobs:
        current.refresh_from_db()
        assert current.state == AttemptState.RUNNING
        assert Job.objects.get(pk=job.pk).state == JobState.RUNNING


def test_the_lost_after_setting_decides(settings):
    pilot = PilotFactory(
        state=PilotState.IDLE, last_heartbeat=timezone.now() - timedelta(seconds=90)
    )
    settings.WMS_PILOT_LOST_AFTER = 120
    assert pilots_reap_lost().pilots == 0
    settings.WMS_PILOT_LOST_AFTER = 60
    assert pilots_reap_lost().pilots == 1
    assert Pilot.objects.get(pk=pilot.pk).state == PilotState.LOST


def test_final_pilots_are_left_alone():
    for state in (PilotState.TERMINATED, PilotState.LOST):
        PilotFactory(state=state, last_heartbeat=timezone.now() - LONG_AGO)
    assert pilots_reap_lost().pilots == 0


def test_the_reaper_can_be_switched_off_and_its_beat_runs_once_per_period(settings):
    pilot = PilotFactory(state=PilotState.IDLE, last_heartbeat=timezone.now() - LONG_AGO)
    switch_set(name="reaper", enabled=False, by="test")
    assert reap_pilots(beat=True) == 0 and pilots_reap_lost().pilots == 0
    assert Pilot.objects.get(pk=pilot.pk).state == PilotState.IDLE

    switch_set(name="reaper", enabled=True, by="test")
    settings.WMS_REAP_EVERY = 3600
    assert reap_pilots(beat=True) == 1
    other = PilotFactory(state=PilotState.IDLE, last_heartbeat=timezone.now() - LONG_AGO)
    assert reap_pilots(beat=True) == 0  # this period's cycle already ran
    assert Pilot.objects.get(pk=other.pk).state == PilotState.IDLE


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="SKIP LOCKED: Postgres")
def test_a_job_locked_by_a_report_is_skipped_and_taken_at_the_next_cycle():
    pilot = PilotFactory(state=PilotState.BUSY, last_heartbeat=timezone.now() - LONG_AGO)
    attempt = running_attempt(pilot)
    locked, release = threading.Event(), threading.Event()

    def hold():
        with transaction.atomic():
            Job.objects.select_for_update().get(pk=attempt.job_id)
            locked.set()
            release.wait(TIMEOUT)

    holder = Racer(hold)
    holder.start()
    try:
        assert locked.wait(TIMEOUT)
        first = pilots_reap_lost()
    finally:
        release.set()
        holder.outcome()

    assert (first.pilots, first.attempts) == (1, 0)
    assert Pilot.objects.get(pk=pilot.pk).state == PilotState.LOST
    assert JobAttempt.objects.get(pk=attempt.pk).state == AttemptState.RUNNING
    second = pilots_reap_lost()
    assert (second.pilots, second.attempts, second.retried) == (0, 1, 1)
    assert JobAttempt.objects.get(pk=attempt.pk).state == AttemptState.LOST


# --- a pilot's own terminate -------------------------------------------------------------------


def test_terminate_fails_the_running_attempts(make_pilot):
    pilot, client = make_pilot()
    Pilot.objects.filter(pk=pilot.pk).update(state=PilotState.BUSY)
    attempt = running_attempt(pilot, retries=2)
    last = running_attempt(pilot, retries=0)
    url = f"/api/v1/pilots/{pilot.pk}/terminate/"

    response = client.post(url, {"reason": "idle too long"}, format="json")

    assert response.status_code == 200, response.json()
    assert response.json() == {"pilot_id": pilot.pk, "state": "terminated", "attempts_failed": 2}
    pilot.refresh_from_db()
    assert pilot.state == PilotState.TERMINATED
    row = pilot.transitions.get()
    assert (row.source, row.reason) == (f"pilot:{pilot.pk}", "idle too long")
    attempt.refresh_from_db()
    assert (attempt.state, attempt.error_code) == (AttemptState.FAILED, "pilot_terminated")
    job = Job.objects.get(pk=attempt.job_id)
    assert (job.state, job.cur_retry) == (JobState.DEFINED, 1)
    assert Job.objects.get(pk=last.job_id).state == JobState.FAILED

    again = client.post(url, {}, format="json")
    assert again.json() == {"pilot_id": pilot.pk, "state": "terminated", "attempts_failed": 0}
    assert pilot.transitions.count() == 1


def test_terminate_of_a_lost_pilot_is_409_and_bad_input_400(make_pilot):
    pilot, client = make_pilot()
    url = f"/api/v1/pilots/{pilot.pk}/terminate/"
    assert client.post(url, {"why": "x"}, format="json").status_code == 400
    Pilot.objects.filter(pk=pilot.pk).update(state=PilotState.LOST)
    response = client.post(url, {}, format="json")
    assert response.status_code == 409 and response.json()["error"] == "invalid_transition"
