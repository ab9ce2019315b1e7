"""The pilot protocol's doors: registration (a user token with pilots.add_pilot) and the
pilot's own token (``Authorization: Pilot <token>``) on the pilot endpoints only, where a
pilot speaks for itself only: on REST, an event naming another pilot, or an attempt that is
not the caller's, is refused and changes nothing (the bus: ``tests/jobs/test_bus_auth.py``)."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from rest_framework.test import APIClient

from jobs.control import attempts_interrupt
from jobs.models import Job, JobState
from pilots.auth import pilot_bus_key, pilot_by_token_hash
from pilots.models import Pilot, PilotState
from pilots.services import hash_token, pilot_revoke_token
from tests.factories import JobFactory, UserFactory, api_token
from tests.jobs.pilot_reports import output, snapshot

pytestmark = pytest.mark.django_db

REGISTER = "/api/v1/pilots/register/"
BODY = {
    "hostname": "wn042.example.org",
    "site": "SITE-A",
    "device_type": "gpu",
    "cores": 16,
    "memory_mb": 64000,
    "gpus": 2,
    "slots": 4,
    "version": "1.0",
}


def token_client(user) -> APIClient:
    client = APIClient()
    _token, key = api_token(user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


def registrar():
    user = UserFactory()
    user.user_permissions.add(Permission.objects.get(codename="add_pilot"))
    return user


# --- registration ------------------------------------------------------------------------------


def test_a_user_allowed_to_add_pilots_registers_one(settings, bus_prefix):
    settings.WMS_HEARTBEAT_INTERVAL = 17
    response = token_client(registrar()).post(REGISTER, BODY, format="json")

    assert response.status_code == 201, response.json()
    body = response.json()
    pilot = Pilot.objects.get(pk=body["pilot_id"])
    assert body == {
        "pilot_id": pilot.pk,
        "token": body["token"],
        "bus_key": pilot_bus_key(pilot_id=pilot.pk, token_hash=hash_token(body["token"])),
        "device_type": "gpu",
        "job_queue": f"{bus_prefix}.jobs.gpu",
        "command_queue": f"{bus_prefix}.pilot.{pilot.pk}",
        "bus_prefix": bus_prefix,
        "queue_type": "classic",
        "heartbeat_interval": 17,
    }
    assert pilot.token_hash == hash_token(body["token"])
    assert (pilot.hostname, pilot.site, pilot.cores, pilot.gpus, pilot.slots) == (
        "wn042.example.org",
        "SITE-A",
        16,
        2,
        4,
    )
    assert pilot.state == PilotState.REGISTERED


def test_staff_may_register_without_the_explicit_permission(admin_user):
    assert token_client(admin_user).post(REGISTER, BODY, format="json").status_code == 201


def test_a_user_without_the_permission_gets_403_and_nothing_is_written(user):
    response = token_client(user).post(REGISTER, BODY, format="json")
    assert response.status_code == 403
    assert response.json()["error"] == "permission_denied"
    assert not Pilot.objects.exists()


def test_anonymous_registration_is_401(anon_client):
    response = anon_client.post(REGISTER, BODY, format="json")
    assert response.status_code == 401
    assert response.json()["error"] == "not_authenticated"
    assert not Pilot.objects.exists()


def test_a_pilot_cannot_register_pilots(make_pilot):
    _, client = make_pilot()
    response = client.post(REGISTER, BODY, format="json")
    assert response.status_code == 403
    assert Pilot.objects.count() == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"device_type": "tpu"}, "device_type"),
        ({"hostname": ""}, "hostname"),
        ({"slots": 0}, "slots"),
        ({"token": "mine"}, "token"),  # unknown fields are refused, not ignored
    ],
)
def test_bad_registration_is_400(change, field):
    response = token_client(registrar()).post(REGISTER, {**BODY, **change}, format="json")
    assert response.status_code == 400
    assert response.json()["error"] == "validation_failed"
    assert field in response.json()["detail"]
    assert not Pilot.objects.exists()


# --- the pilot's own token ---------------------------------------------------------------------


def heartbeat(client, pilot_id):
    return client.post(f"/api/v1/pilots/{pilot_id}/heartbeat/", {"state": "idle"}, format="json")


def test_the_pilot_token_opens_its_own_endpoints(make_pilot):
    pilot, client = make_pilot()
    assert heartbeat(client, pilot.pk).status_code == 200


def test_a_revoked_token_is_401(make_pilot):
    pilot, client = make_pilot()
    pilot_revoke_token(pilot_id=pilot.pk)
    response = heartbeat(client, pilot.pk)
    assert response.status_code == 401
    assert response.json()["error"] == "not_authenticated"
    assert response["WWW-Authenticate"] == "Pilot"


def test_the_token_lookup_reads_the_pilot_as_the_orm_would(make_pilot):
    pilot, _ = make_pilot()
    Pilot.objects.filter(pk=pilot.pk).update(metrics={"load1": 0.5}, status="ok")
    found = pilot_by_token_hash(pilot.token_hash)
    expected = Pilot.objects.get(pk=pilot.pk)
    assert found is not None and found.pk == pilot.pk
    fields = [f.attname for f in Pilot._meta.concrete_fields]
    assert [getattr(found, f) for f in fields] == [getattr(expected, f) for f in fields]
    assert found.metrics == {"load1": 0.5}
    assert pilot_by_token_hash("0" * 64) is None


def test_a_token_revoked_after_a_call_is_refused_at_once(make_pilot):
    pilot, client = make_pilot()
    assert heartbeat(client, pilot.pk).status_code == 200
    pilot_revoke_token(pilot_id=pilot.pk)
    assert heartbeat(client, pilot.pk).status_code == 401


@pytest.mark.parametrize("header", ["Pilot wrong-token", "Pilot", "Pilot a b"])
def test_a_bad_pilot_header_is_401(make_pilot, header):
    pilot, _ = make_pilot()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    assert heartbeat(client, pilot.pk).status_code == 401


def test_another_pilots_id_is_403(make_pilot):
    _pilot, client = make_pilot()
    other, _ = make_pilot(hostname="other")
    before = other.last_heartbeat
    for path in ("heartbeat", "terminate", "events"):
        response = client.post(f"/api/v1/pilots/{other.pk}/{path}/", {}, format="json")
        assert response.status_code == 403, path
        assert response.json()["error"] == "permission_denied"
    other.refresh_from_db()
    assert other.state == PilotState.REGISTERED and other.last_heartbeat == before


def test_a_user_token_cannot_act_as_a_pilot(make_pilot, admin_user):
    pilot, _ = make_pilot()
    job = JobFactory(state=JobState.QUEUED)
    client = token_client(admin_user)  # even staff
    responses = [
        heartbeat(client, pilot.pk),
        client.post(f"/api/v1/pilots/{pilot.pk}/terminate/", {}, format="json"),
        client.post(f"/api/v1/jobs/{job.uuid}/start/", {"attempt": 0}, format="json"),
        client.post(
            f"/api/v1/jobs/{job.uuid}/report/", {"attempt": 0, "state": "running"}, format="json"
        ),
    ]
    assert [r.status_code for r in responses] == [401] * 4
    assert Job.objects.get(pk=job.pk).state == JobState.QUEUED
    assert Pilot.objects.get(pk=pilot.pk).state == PilotState.REGISTERED


def test_a_session_user_cannot_act_as_a_pilot(make_pilot, admin_client_logged):
    pilot, _ = make_pilot()
    response = admin_client_logged.post(
        f"/api/v1/pilots/{pilot.pk}/heartbeat/", {"state": "idle"}, content_type="application/json"
    )
    assert response.status_code == 401


def test_a_pilot_token_is_refused_on_user_endpoints(make_pilot):
    pilot, client = make_pilot()
    JobFactory()
    for url in (
        "/api/v1/jobs/",
        "/api/v1/tasks/",
        "/api/v1/pilots/",
        f"/api/v1/pilots/{pilot.pk}/",
    ):
        response = client.get(url)
        assert response.status_code == 403, url
        assert response.json()["error"] == "permission_denied"
    response = client.post("/api/v1/tasks/", {"executable": "x"}, format="json")
    assert response.status_code == 403


def test_user_endpoints_still_work(api_client, make_pilot):
    pilot, _ = make_pilot()
    job = JobFactory(task__owner=api_client.handler._force_user)
    assert api_client.get("/api/v1/pilots/").status_code == 200
    assert api_client.get(f"/api/v1/pilots/{pilot.pk}/").json()["id"] == pilot.pk
    assert api_client.get(f"/api/v1/jobs/{job.pk}/").json()["uuid"] == str(job.uuid)
    assert api_client.post(f"/api/v1/jobs/{job.pk}/cancel/", {}, format="json").status_code == 200


# --- a pilot speaks for itself only: events naming another pilot, jobs it does not hold -----------


def _start(client, job, attempt=0):
    response = client.post(f"/api/v1/jobs/{job.uuid}/start/", {"attempt": attempt}, format="json")
    assert response.status_code == 200, response.json()


def _final(task, **kw):
    return {"state": "finished", "exit_code": 0, "outputs": [output(task)], **kw}


def _held_elsewhere(make_pilot, task):
    """A job the victim runs now (attempt 1), after the intruder held attempt 0 and lost it."""
    intruder, intruder_client = make_pilot(hostname="intruder")
    victim, victim_client = make_pilot(hostname="victim")
    job = JobFactory(task=task, state=JobState.QUEUED)
    _start(intruder_client, job)
    attempts_interrupt(
        pilot_ids=[intruder.pk],
        attempt_state="lost",
        error_code="lost_heartbeat",
        error_message="",
        source="test",
    )
    Job.objects.filter(pk=job.pk).update(state=JobState.QUEUED)  # dispatched again
    _start(victim_client, job, attempt=1)
    return intruder, intruder_client, victim, job


def _door(client, pilot, job, event):
    """One event by each REST door: (status, error or outcome)."""
    report = client.post(f"/api/v1/jobs/{job.uuid}/report/", event, format="json")
    bulk = client.post(
        f"/api/v1/pilots/{pilot.pk}/events/",
        {"events": [{"job_uuid": str(job.uuid), **event}]},
        format="json",
    )
    (result,) = bulk.json()["results"]
    body = report.json()
    return (report.status_code, body.get("error") or body.get("outcome")), (
        bulk.status_code,
        result.get("error") or result.get("outcome"),
    )


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        # the victim's current attempt: not the intruder's
        ({"attempt": 1}, ((403, "permission_denied"), (200, "permission_denied"))),
        (
            {"attempt": 1, "state": "running"},
            ((403, "permission_denied"), (200, "permission_denied")),
        ),
        # naming the victim as the sender
        (
            {"attempt": 1, "pilot_id": "victim"},
            ((400, "validation_failed"), (200, "validation_failed")),
        ),
        (
            {"attempt": 0, "pilot_id": "victim"},
            ((400, "validation_failed"), (200, "validation_failed")),
        ),
        # the intruder's own attempt, long ended by the server: ignored, never moves the job
        ({"attempt": 0}, ((200, "ignored"), (200, "ignored"))),
        # an attempt nobody started
        ({"attempt": 2}, ((200, "ignored"), (200, "ignored"))),
    ],
)
def test_rest_events_on_a_job_another_pilot_holds_change_nothing(
    make_pilot, output_task, event, expected
):
    intruder, client, victim, job = _held_elsewhere(make_pilot, output_task)
    if event.get("pilot_id") == "victim":
        event = {**event, "pilot_id": victim.pk}
    body = {**_final(output_task), **event}
    if body["state"] == "running":
        body = {"attempt": body["attempt"], "state": "running", "metrics": {"cpu_time": 9.0}}
    before = snapshot()

    assert _door(client, intruder, job, body) == expected

    assert snapshot() == before
    job.refresh_from_db()
    assert (job.state, job.cur_retry, job.pilot_id) == (JobState.RUNNING, 1, victim.pk)


def test_a_heartbeat_cannot_report_metrics_of_another_pilots_attempt(make_pilot, output_task):
    intruder, client, _victim, job = _held_elsewhere(make_pilot, output_task)
    before = snapshot()
    response = client.post(
        f"/api/v1/pilots/{intruder.pk}/heartbeat/",
        {"state": "busy", "jobs": [{"job_uuid": str(job.uuid), "attempt": 1, "cpu_time": 5.0}]},
        format="json",
    )
    assert response.status_code == 200
    assert snapshot() == before
