"""``POST /jobs/{uuid}/start/``: a pilot's atomic claim of a queued job's current attempt."""

from __future__ import annotations

import threading

import pytest
from django.db import connection
from rest_framework.test import APIClient

from jobs.control import job_cancel
from jobs.models import AttemptState, Job, JobAttempt, JobState
from pilots.models import Pilot, PilotState
from pilots.protocol import pilot_job_start
from pilots.services import pilot_register
from tests.factories import JobAttemptFactory, JobFactory
from tests.wms.test_race import TIMEOUT, Racer, _held_race
from wms.exceptions import JobNotQueued

pytestmark = pytest.mark.django_db


def start(client, job, attempt=0):
    return client.post(f"/api/v1/jobs/{job.uuid}/start/", {"attempt": attempt}, format="json")


def test_the_winner_gets_the_job_message_and_the_job_runs_on_it(make_pilot, output_task, settings):
    settings.WMS_SERVER_URL = "http://wms.test"
    pilot, client = make_pilot()
    job = JobFactory(task=output_task, state=JobState.QUEUED, args="--events 7", rank=3)

    response = start(client, job)

    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["job_uuid"] == str(job.uuid) and body["attempt"] == 0
    assert (body["v"], body["kind"], body["device_type"]) == (1, "job", "cpu")
    assert (body["task_id"], body["args"], body["rank"]) == (output_task.pk, "--events 7", 3)
    assert body["output_dataset_uid"] == str(output_task.data_out_uid)
    assert body["output_url"] == output_task.data_out_url
    assert body["server_url"] == "http://wms.test"
    job.refresh_from_db()
    assert job.state == JobState.RUNNING and job.pilot_id == pilot.pk
    assert job.time_start is not None
    attempt = JobAttempt.objects.get(job=job)
    assert (attempt.number, attempt.pilot_id, attempt.state) == (0, pilot.pk, "running")
    assert list(job.transitions.values_list("from_state", "to_state", "source")) == [
        ("queued", "running", f"pilot:{pilot.pk}")
    ]
    assert Pilot.objects.get(pk=pilot.pk).state == PilotState.BUSY


def test_a_duplicated_message_is_started_once(make_pilot):
    _pilot, client = make_pilot()
    _other, other_client = make_pilot(hostname="other")
    job = JobFactory(state=JobState.QUEUED)
    assert start(client, job).status_code == 200
    again = start(other_client, job)
    assert again.status_code == 409 and again.json()["error"] == "job_not_queued"
    assert JobAttempt.objects.filter(job=job).count() == 1


def test_the_same_start_again_by_its_pilot_gets_the_same_message(make_pilot):
    """The answer of a start was lost: the pilot sends it again (no idempotency key) and gets
    the same job message; nothing is written a second time."""
    pilot, client = make_pilot()
    job = JobFactory(state=JobState.QUEUED)
    first = start(client, job)
    assert first.status_code == 200
    job.refresh_from_db()
    time_start = job.time_start

    again = start(client, job)

    assert again.status_code == 200, again.json()
    assert again.json() == first.json()
    job.refresh_from_db()
    assert (job.state, job.pilot_id, job.time_start) == (JobState.RUNNING, pilot.pk, time_start)
    assert JobAttempt.objects.filter(job=job).count() == 1
    assert job.transitions.count() == 1


def test_the_same_start_of_an_attempt_that_ended_is_409(make_pilot):
    """Only a running attempt is started again: once it ended (here by a cancel), 409."""
    _pilot, client = make_pilot()
    job = JobFactory(state=JobState.QUEUED)
    assert start(client, job).status_code == 200
    job_cancel(job_id=job.pk, source="api")
    again = start(client, job)
    assert again.status_code == 409 and again.json()["error"] == "job_not_queued"


@pytest.mark.parametrize(
    "state", [JobState.CANCELLED, JobState.DEFINED, JobState.FINISHED, JobState.FAILED]
)
def test_a_job_that_is_not_queued_is_409(make_pilot, state):
    _, client = make_pilot()
    job = JobFactory(state=state)
    response = start(client, job)
    assert response.status_code == 409
    assert response.json()["error"] == "job_not_queued"
    assert Job.objects.get(pk=job.pk).state == state
    assert not JobAttempt.objects.exists()


def test_a_job_cancelled_while_queued_is_409(make_pilot):
    _, client = make_pilot()
    job = JobFactory(state=JobState.QUEUED)
    job_cancel(job_id=job.pk, source="api")
    assert start(client, job).json()["error"] == "job_not_queued"


def test_a_message_of_an_older_attempt_is_stale(make_pilot):
    pilot, client = make_pilot()
    job = JobFactory(state=JobState.QUEUED, cur_retry=1)
    JobAttemptFactory(job=job, number=0, pilot=pilot, state=AttemptState.FAILED)
    response = start(client, job, attempt=0)
    assert response.status_code == 409 and response.json()["error"] == "stale_attempt"
    assert Job.objects.get(pk=job.pk).state == JobState.QUEUED
    assert start(client, job, attempt=1).status_code == 200
    assert JobAttempt.objects.get(job=job, number=1).state == AttemptState.RUNNING


def test_a_cpu_pilot_cannot_take_a_gpu_job(make_pilot):
    _, client = make_pilot(device_type="cpu")
    job = JobFactory(state=JobState.QUEUED, device_type="gpu")
    response = start(client, job)
    assert response.status_code == 409 and response.json()["error"] == "wrong_device"
    assert Job.objects.get(pk=job.pk).state == JobState.QUEUED


@pytest.mark.parametrize("state", [PilotState.LOST, PilotState.TERMINATED])
def test_a_pilot_that_is_gone_cannot_start(make_pilot, state):
    pilot, client = make_pilot()
    Pilot.objects.filter(pk=pilot.pk).update(state=state)
    job = JobFactory(state=JobState.QUEUED)
    response = start(client, job)
    assert response.status_code == 409 and response.json()["error"] == "pilot_not_live"
    assert Job.objects.get(pk=job.pk).state == JobState.QUEUED


def test_a_draining_pilot_stays_draining(make_pilot):
    pilot, client = make_pilot()
    Pilot.objects.filter(pk=pilot.pk).update(state=PilotState.DRAINING)
    assert start(client, JobFactory(state=JobState.QUEUED)).status_code == 200
    assert Pilot.objects.get(pk=pilot.pk).state == PilotState.DRAINING


def test_unknown_job_and_bad_body(make_pilot):
    _, client = make_pilot()
    job = JobFactory(state=JobState.QUEUED)
    assert (
        client.post(
            "/api/v1/jobs/6f1c5d0e-0000-4000-8000-000000000000/start/", {"attempt": 0}
        ).status_code
        == 404
    )
    for body in ({}, {"attempt": -1}, {"attempt": "x"}, {"attempt": 0, "pilot": 3}):
        response = client.post(f"/api/v1/jobs/{job.uuid}/start/", body, format="json")
        assert response.status_code == 400, body
    assert Job.objects.get(pk=job.pk).state == JobState.QUEUED


# --- races, on real connections ----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="concurrent writers: Postgres")
def test_eight_pilots_racing_for_one_job_one_wins():
    job = JobFactory(state=JobState.QUEUED)
    clients = []
    for i in range(8):
        _, token = pilot_register(hostname=f"racer{i}")
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Pilot {token}")
        clients.append(client)
    barrier = threading.Barrier(len(clients))

    def go(client):
        barrier.wait(TIMEOUT)
        response = start(client, job)
        return response.status_code, response.json().get("error")

    racers = [Racer(lambda c=c: go(c)) for c in clients]
    for r in racers:
        r.start()
    outcomes = sorted(r.outcome() for r in racers)

    assert outcomes == [(200, None)] + [(409, "job_not_queued")] * 7
    assert JobAttempt.objects.filter(job=job).count() == 1
    job.refresh_from_db()
    assert job.state == JobState.RUNNING
    assert job.pilot_id == JobAttempt.objects.get(job=job).pilot_id
    assert job.transitions.count() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks: Postgres")
def test_the_second_start_waits_for_the_first_and_loses():
    job = JobFactory(state=JobState.QUEUED)
    first_pilot, _ = pilot_register(hostname="first")
    second_pilot, _ = pilot_register(hostname="second")

    first, second = _held_race(
        lambda: pilot_job_start(pilot=first_pilot, job_uuid=job.uuid, attempt=0),
        lambda: pilot_job_start(pilot=second_pilot, job_uuid=job.uuid, attempt=0),
    )

    assert first.job_uuid == str(job.uuid)
    assert isinstance(second, JobNotQueued)
    assert list(JobAttempt.objects.filter(job=job).values_list("pilot_id", flat=True)) == [
        first_pilot.pk
    ]


def test_the_constraints_are_the_last_line_of_defence(make_pilot):
    """An attempt row already there for the job's current attempt (state drifted by hand):
    the start is refused by the unique constraint, as a 409, and nothing is written."""
    pilot, client = make_pilot()
    job = JobFactory(state=JobState.QUEUED)
    JobAttemptFactory(job=job, number=0, pilot=pilot, state=AttemptState.FAILED)

    response = start(client, job)

    assert response.status_code == 409 and response.json()["error"] == "job_not_queued"
    job.refresh_from_db()
    assert job.state == JobState.QUEUED and not job.transitions.exists()
    assert Pilot.objects.get(pk=pilot.pk).state == PilotState.REGISTERED
