"""Registration's ``orphans``: what a new pilot found and killed of a dead pilot's payloads
(docs/pilot-api.md). Validated and bounded; recorded; the dead pilot ended at once only on
evidence (same hostname, live but silent for more than two heartbeat intervals, one of the
reported attempts running on it)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.models import AttemptState, Job, JobState
from pilots.api.pilot_serializers import MAX_ORPHAN_PIDS, MAX_ORPHANS
from pilots.models import Pilot, PilotState
from tests.factories import JobAttemptFactory, JobFactory, PilotFactory
from tests.pilots.test_protocol_auth import BODY, REGISTER, registrar, token_client

pytestmark = pytest.mark.django_db

HOST = BODY["hostname"]


def running_attempt(pilot, **job_fields):
    job = JobFactory(state=JobState.RUNNING, pilot=pilot, **job_fields)
    return JobAttemptFactory(job=job, pilot=pilot, number=job.cur_retry)


def orphan(attempt, pilot_id, pids=(4242, 4243)) -> dict:
    return {
        "job_uuid": str(attempt.job.uuid),
        "attempt": attempt.number,
        "pilot_id": pilot_id,
        "pids": list(pids),
    }


def register(orphans) -> dict:
    response = token_client(registrar()).post(REGISTER, {**BODY, "orphans": orphans}, format="json")
    assert response.status_code == 201, response.json()
    return response.json()


def silent_pilot(settings, *, hostname=HOST, intervals=3.0, state=PilotState.BUSY):
    ago = timedelta(seconds=intervals * settings.WMS_HEARTBEAT_INTERVAL)
    return PilotFactory(hostname=hostname, state=state, last_heartbeat=timezone.now() - ago)


def test_a_dead_pilot_named_with_evidence_is_lost_and_its_jobs_retried_at_once(settings):
    settings.WMS_HEARTBEAT_INTERVAL = 10
    settings.WMS_PILOT_LOST_AFTER = 3600  # the reaper would wait an hour
    dead = silent_pilot(settings)
    named = running_attempt(dead, retries=3, cur_retry=0)
    other = running_attempt(dead, retries=0, cur_retry=0)  # also ran there: ended too

    body = register([orphan(named, dead.pk)])

    new_id = body["pilot_id"]
    dead.refresh_from_db()
    assert dead.state == PilotState.LOST
    transition = dead.transitions.get()
    assert transition.source == f"pilot:{new_id}"
    assert "found this pilot's payloads orphaned" in transition.reason
    assert f"job {named.job.uuid} attempt 0 of pilot {dead.pk}: pids 4242,4243" in (
        transition.reason
    )
    for attempt in (named, other):
        attempt.refresh_from_db()
        assert (attempt.state, attempt.error_code) == (AttemptState.LOST, "pilot_died")
        assert f"pilot {new_id} started on {HOST}" in attempt.error_message
    retried = Job.objects.get(pk=named.job_id)
    assert (retried.state, retried.cur_retry) == (JobState.DEFINED, 1)
    assert Job.objects.get(pk=other.job_id).state == JobState.FAILED
    new = Pilot.objects.get(pk=new_id)
    assert new.state == PilotState.REGISTERED
    assert new.status.startswith("registered; killed what a dead pilot left: job ")


@pytest.mark.parametrize(
    "case",
    ["other_host", "heard_lately", "attempt_not_its_own", "already_lost", "not_named"],
)
def test_without_the_evidence_nothing_of_the_named_pilot_changes(settings, case):
    settings.WMS_HEARTBEAT_INTERVAL = 10
    prev = silent_pilot(
        settings,
        hostname="elsewhere.example.org" if case == "other_host" else HOST,
        intervals=1.5 if case == "heard_lately" else 3.0,
        state=PilotState.LOST if case == "already_lost" else PilotState.BUSY,
    )
    attempt = running_attempt(prev)
    if case == "attempt_not_its_own":
        attempt = running_attempt(PilotFactory(hostname=HOST))  # a live pilot's job
    report = orphan(attempt, None if case == "not_named" else prev.pk)

    body = register([report])

    prev.refresh_from_db()
    assert prev.state == (PilotState.LOST if case == "already_lost" else PilotState.BUSY)
    assert not prev.transitions.exists()
    attempt.refresh_from_db()
    assert attempt.state == AttemptState.RUNNING
    assert Job.objects.get(pk=attempt.job_id).state == JobState.RUNNING
    # recorded all the same, for the operator
    assert "killed what a dead pilot left" in Pilot.objects.get(pk=body["pilot_id"]).status


def test_an_orphan_record_with_no_process_left_is_taken_too(settings):
    dead = silent_pilot(settings)
    attempt = running_attempt(dead)

    register([orphan(attempt, dead.pk, pids=[])])

    dead.refresh_from_db()
    assert dead.state == PilotState.LOST
    assert Pilot.objects.order_by("-id").first().status.endswith(f"of pilot {dead.pk}: gone")


GOOD = {"job_uuid": str(uuid.uuid4()), "attempt": 0, "pilot_id": 3, "pids": [12]}


@pytest.mark.parametrize(
    "orphans",
    [
        "not a list",
        [GOOD] * (MAX_ORPHANS + 1),
        [{**GOOD, "pids": list(range(1, MAX_ORPHAN_PIDS + 2))}],
        [{**GOOD, "pids": ["12"]}],
        [{**GOOD, "pids": [0]}],
        [{**GOOD, "pids": [1 << 40]}],
        [{**GOOD, "pids": 12}],
        [{**GOOD, "attempt": -1}],
        [{**GOOD, "attempt": "zero"}],
        [{**GOOD, "job_uuid": "not-a-uuid"}],
        [{**GOOD, "pilot_id": "3"}],
        [{**GOOD, "pilot_id": 0}],
        [{**GOOD, "extra": 1}],
        [{k: v for k, v in GOOD.items() if k != "job_uuid"}],
        ["a string"],
    ],
)
def test_bad_orphans_are_400_and_nothing_is_written(orphans):
    response = token_client(registrar()).post(REGISTER, {**BODY, "orphans": orphans}, format="json")

    assert response.status_code == 400, response.json()
    assert response.json()["error"] == "validation_failed"
    assert "orphans" in response.json()["detail"]
    assert not Pilot.objects.exists()


def test_the_bounds_themselves_are_accepted_and_the_field_is_optional():
    most = [{**GOOD, "pids": list(range(1, MAX_ORPHAN_PIDS + 1))}] * MAX_ORPHANS
    register(most)
    register([])
    register([{"job_uuid": GOOD["job_uuid"], "attempt": 2}])  # pilot_id null, no pids
    assert Pilot.objects.count() == 3
