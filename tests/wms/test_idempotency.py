"""Idempotency keys of the pilot protocol (``wms.idempotency``, docs/pilot-api.md): a call sent
again with its key gets the first answer again and changes nothing a second time."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.urls import path
from django.utils import timezone
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.test import APIClient
from rest_framework.views import APIView

from config.urls import urlpatterns as project_urls
from files.models import File
from jobs.models import JobAttempt, JobState, JobTransition
from pilots.commands import CommandSpec, pilot_commands_create
from pilots.models import CommandKind, Pilot, PilotCommand
from pilots.services import pilot_register
from tests.factories import JobFactory
from tests.jobs.test_report import HIST, dataset_files, log_file, started
from tests.wms.test_race import TIMEOUT, Racer
from wms.exceptions import BrokerError
from wms.idempotency import idempotency_keys_purge, idempotent
from wms.models import IdempotentRequest

pytestmark = pytest.mark.django_db


def key() -> str:
    return str(uuid.uuid4())


def post(client, url, body, k):
    return client.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY=k)


def start_url(job):
    return f"/api/v1/jobs/{job.uuid}/start/"


# --- start ---------------------------------------------------------------------------------------


def test_a_start_sent_again_gets_the_same_answer_and_starts_once(make_pilot):
    pilot, client = make_pilot()
    job = JobFactory(state=JobState.QUEUED)
    k = key()

    first = post(client, start_url(job), {"attempt": 0}, k)
    again = post(client, start_url(job), {"attempt": 0}, k)

    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and again.json()["job_uuid"] == str(job.uuid)
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert JobAttempt.objects.filter(job=job).count() == 1
    assert JobTransition.objects.filter(subject=job).count() == 1
    assert IdempotentRequest.objects.get(scope=f"pilot:{pilot.pk}", key=k).status == 200


def test_a_refused_start_is_replayed_as_refused(make_pilot):
    """409 changed nothing; it is remembered: the same call keeps its answer even if the job
    became startable since (the caller must make a new call, with a new key)."""
    _, client = make_pilot()
    job = JobFactory(state=JobState.DEFINED)
    k = key()
    first = post(client, start_url(job), {"attempt": 0}, k)
    assert first.status_code == 409 and first.json()["error"] == "job_not_queued"
    job.state = JobState.QUEUED
    job.save(update_fields=["state"])

    again = post(client, start_url(job), {"attempt": 0}, k)

    assert again.status_code == 409 and again.json() == first.json()
    assert not JobAttempt.objects.filter(job=job).exists()
    assert post(client, start_url(job), {"attempt": 0}, key()).status_code == 200


def test_keys_are_per_pilot(make_pilot):
    _, client = make_pilot()
    _, other = make_pilot(hostname="other")
    job = JobFactory(state=JobState.QUEUED)
    k = key()
    assert post(client, start_url(job), {"attempt": 0}, k).status_code == 200
    refused = post(other, start_url(job), {"attempt": 0}, k)
    assert refused.status_code == 409 and refused.json()["error"] == "job_not_queued"


# --- report, heartbeat, register, terminate ------------------------------------------------------


def test_a_final_report_sent_again_gets_applied_again_and_registers_once(make_pilot, output_task):
    _, client = make_pilot()
    job = started(client, output_task)
    body = {"attempt": 0, "state": "finished", "exit_code": 0, "outputs": [HIST, log_file(job)]}
    url = f"/api/v1/jobs/{job.uuid}/report/"
    k = key()
    first = post(client, url, body, k)
    assert first.json() == {"job_state": "finished", "outcome": "applied"}
    before = (File.objects.count(), JobTransition.objects.count(), dataset_files(output_task))

    again = post(client, url, body, k)

    assert again.status_code == 200
    assert again.json() == {"job_state": "finished", "outcome": "applied"}  # not "duplicate"
    after = (File.objects.count(), JobTransition.objects.count(), dataset_files(output_task))
    assert after == before


def test_a_report_refused_before_its_transaction_is_replayed_as_refused(make_pilot, output_task):
    """A bad report is refused by the step before the transaction (``prepare``): the refusal
    is stored like any other 4xx and sent again as it was; nothing is registered."""
    _, client = make_pilot()
    job = started(client, output_task)
    url = f"/api/v1/jobs/{job.uuid}/report/"
    k = key()
    bad = {"attempt": 0, "state": "finished", "exit_code": "zero"}

    first = post(client, url, bad, k)
    again = post(client, url, bad, k)

    assert first.status_code == again.status_code == 400
    assert first.json() == again.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert IdempotentRequest.objects.get(key=k).status == 400
    assert JobAttempt.objects.get(job=job).state == "running"


def test_a_dsm_failure_before_the_transaction_is_not_stored_and_the_retry_registers(
    make_pilot, output_task, monkeypatch
):
    """The DSM fails while the report's files are registered (before the transaction): a 502
    is not stored, nothing is written; the report sent again with its key is applied."""
    from files.dsm.local import LocalDSMClient
    from wms.exceptions import DSMError

    _, client = make_pilot()
    job = started(client, output_task)
    body = {"attempt": 0, "state": "finished", "exit_code": 0, "outputs": [HIST, log_file(job)]}
    url = f"/api/v1/jobs/{job.uuid}/report/"
    k = key()
    real = LocalDSMClient.register_files

    def down(self, *args, **kwargs):
        raise DSMError("the DSM is away")

    monkeypatch.setattr(LocalDSMClient, "register_files", down)
    first = post(client, url, body, k)
    assert first.status_code == 502 and first.json()["error"] == "dsm_error"
    assert not IdempotentRequest.objects.filter(key=k).exists()
    assert JobAttempt.objects.get(job=job).state == "running"
    assert not File.objects.filter(job=job).exists()

    monkeypatch.setattr(LocalDSMClient, "register_files", real)
    again = post(client, url, body, k)

    assert again.status_code == 200 and again.json()["outcome"] == "applied"
    assert "Idempotent-Replayed" not in again.headers
    assert set(dataset_files(output_task)) == {
        f"{job.uuid}/hist.json",
        f"{job.uuid}/0/{job.uuid}.0.log",
    }


def test_a_heartbeat_sent_again_gets_the_same_commands_and_writes_nothing(make_pilot):
    pilot, client = make_pilot()
    pilot_commands_create(commands=[CommandSpec(pilot_id=pilot.pk, command=CommandKind.DRAIN)])
    url = f"/api/v1/pilots/{pilot.pk}/heartbeat/"
    k = key()
    first = post(client, url, {"state": "idle"}, k)
    assert first.status_code == 200 and len(first.json()["commands"]) == 1
    seen = Pilot.objects.get(pk=pilot.pk).last_heartbeat

    again = post(client, url, {"state": "idle"}, k)

    assert again.json() == first.json()  # the command again: the first answer may be lost
    assert Pilot.objects.get(pk=pilot.pk).last_heartbeat == seen
    fresh = post(client, url, {"state": "idle"}, key())
    assert fresh.json()["commands"] == []  # a new heartbeat: delivered once
    assert PilotCommand.objects.count() == 1


def test_a_registration_sent_again_gets_the_same_pilot(admin_user):
    client = APIClient()
    client.force_authenticate(user=admin_user)
    body = {"hostname": "wn1.example.org", "device_type": "cpu"}
    k = key()
    first = post(client, "/api/v1/pilots/register/", body, k)
    again = post(client, "/api/v1/pilots/register/", body, k)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert Pilot.objects.count() == 1
    # the secrets are not stored: the replay derives them again from the call's key
    stored = IdempotentRequest.objects.get(key=k).body
    assert first.json()["token"] not in stored and first.json()["bus_key"] not in stored
    assert '"token"' not in stored
    # another key: another pilot, another token
    other = post(client, "/api/v1/pilots/register/", body, key())
    assert other.status_code == 201 and other.json()["token"] != first.json()["token"]
    # the token replayed is the pilot's (its hash is what is stored)
    pilot_client = APIClient()
    pilot_client.credentials(HTTP_AUTHORIZATION=f"Pilot {again.json()['token']}")
    pid = again.json()["pilot_id"]
    beat = pilot_client.post(f"/api/v1/pilots/{pid}/heartbeat/", {"state": "idle"}, format="json")
    assert beat.status_code == 200


def test_a_terminate_sent_again_is_replayed(make_pilot):
    pilot, client = make_pilot()
    url = f"/api/v1/pilots/{pilot.pk}/terminate/"
    k = key()
    first = post(client, url, {"reason": "bye"}, k)
    again = post(client, url, {"reason": "bye"}, k)
    assert first.status_code == again.status_code == 200 and again.json() == first.json()
    assert Pilot.objects.get(pk=pilot.pk).transitions.count() == 1


# --- misuse and bounds ---------------------------------------------------------------------------


def test_the_same_key_with_another_call_is_422_and_changes_nothing(make_pilot):
    _, client = make_pilot()
    job, other_job = JobFactory(state=JobState.QUEUED), JobFactory(state=JobState.QUEUED)
    k = key()
    assert post(client, start_url(job), {"attempt": 0}, k).status_code == 200

    other_path = post(client, start_url(other_job), {"attempt": 0}, k)
    other_body = post(client, start_url(job), {"attempt": 1}, k)

    for response in (other_path, other_body):
        assert response.status_code == 422
        assert response.json()["error"] == "idempotency_key_reused"
    other_job.refresh_from_db()
    assert other_job.state == JobState.QUEUED and not JobAttempt.objects.filter(job=other_job)


@pytest.mark.parametrize(
    "bad", ["short", "x" * 65, "has space in it", "semi;colon-key", "ключ-ключ-ключ", ""]
)
def test_a_malformed_key_is_400_and_changes_nothing(make_pilot, bad):
    _, client = make_pilot()
    job = JobFactory(state=JobState.QUEUED)
    response = client.post(start_url(job), {"attempt": 0}, format="json", HTTP_IDEMPOTENCY_KEY=bad)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_idempotency_key"
    job.refresh_from_db()
    assert job.state == JobState.QUEUED and not IdempotentRequest.objects.exists()


@pytest.mark.parametrize("good", ["a" * 8, "Z" * 64, "pilot-1:start.0_abc", str(uuid.uuid4())])
def test_well_formed_keys_are_taken(make_pilot, good):
    pilot, client = make_pilot()
    url = f"/api/v1/pilots/{pilot.pk}/heartbeat/"
    assert post(client, url, {"state": "idle"}, good).status_code == 200
    assert IdempotentRequest.objects.filter(key=good).count() == 1


def test_calls_without_a_key_are_not_remembered(make_pilot):
    _, client = make_pilot()
    job = JobFactory(state=JobState.QUEUED)
    assert client.post(start_url(job), {"attempt": 0}, format="json").status_code == 200
    assert not IdempotentRequest.objects.exists()


def test_the_store_costs_one_lookup_and_one_insert(make_pilot):
    """The hot path: one indexed read of the key, one INSERT with the call's change (and the
    savepoint the service's own transaction becomes); a retry only reads."""
    from django.test.utils import CaptureQueriesContext

    pilot, client = make_pilot()
    url = f"/api/v1/pilots/{pilot.pk}/heartbeat/"
    client.post(url, {"state": "idle"}, format="json")  # the first one changes the state
    with CaptureQueriesContext(connection) as plain:
        client.post(url, {"state": "idle"}, format="json")
    k = key()
    with CaptureQueriesContext(connection) as keyed:
        post(client, url, {"state": "idle"}, k)
    with CaptureQueriesContext(connection) as retried:
        post(client, url, {"state": "idle"}, k)
    store = [q["sql"] for q in keyed.captured_queries if "wms_idempotentrequest" in q["sql"]]
    assert [q.split()[0] for q in store] == ["SELECT", "INSERT"], store
    extra = len(keyed.captured_queries) - len(plain.captured_queries)
    assert extra <= 4, [q["sql"] for q in keyed.captured_queries]  # + SAVEPOINT, RELEASE
    # the retry: the key's read and the pilot's token lookup, nothing else
    assert len(retried.captured_queries) <= 2, [q["sql"] for q in retried.captured_queries]


# --- purge -------------------------------------------------------------------------------------


def test_the_purge_forgets_old_answers_only(make_pilot, settings):
    settings.WMS_IDEMPOTENCY_TTL = 3600
    pilot, client = make_pilot()
    url = f"/api/v1/pilots/{pilot.pk}/heartbeat/"
    old, new = key(), key()
    post(client, url, {"state": "idle"}, old)
    post(client, url, {"state": "idle"}, new)
    IdempotentRequest.objects.filter(key=old).update(created_at=timezone.now() - timedelta(hours=2))

    assert idempotency_keys_purge() == 1

    assert list(IdempotentRequest.objects.values_list("key", flat=True)) == [new]
    # a purged key is a new call again
    assert post(client, url, {"state": "idle"}, old).headers.get("Idempotent-Replayed") is None


def test_the_purge_is_scheduled_by_beat(settings):
    from config.celery import app

    entry = settings.CELERY_BEAT_SCHEDULE["purge-idempotency-keys"]
    assert entry["task"] == "wms.purge_idempotency_keys"
    app.loader.import_default_modules()
    assert "wms.purge_idempotency_keys" in app.tasks


# --- answers that are not replayed: 5xx, 429 -----------------------------------------------------

CALLS: list[str] = []


class FlakyView(APIView):
    """Answers 503 (the broker is away) the first time, then 200 with the call's number."""

    permission_classes = [AllowAny]
    authentication_classes: list = []

    @idempotent(lambda request: "test:flaky")
    def post(self, request: Request) -> Response:
        CALLS.append(str(request.data))  # type: ignore[arg-type]
        if len(CALLS) == 1:
            raise BrokerError("the broker is away")
        return Response({"calls": len(CALLS)})


urlpatterns = [path("api/v1/test/flaky/", FlakyView.as_view()), *project_urls]


@pytest.mark.urls("tests.wms.test_idempotency")
def test_a_5xx_answer_is_not_stored_the_retry_runs_again():
    CALLS.clear()
    client = APIClient()
    k = key()
    first = post(client, "/api/v1/test/flaky/", {"n": 1}, k)
    assert first.status_code == 503 and first.json()["error"] == "broker_unavailable"
    assert not IdempotentRequest.objects.exists()

    again = post(client, "/api/v1/test/flaky/", {"n": 1}, k)
    third = post(client, "/api/v1/test/flaky/", {"n": 1}, k)

    assert again.status_code == third.status_code == 200
    assert again.json() == third.json() == {"calls": 2}
    assert "Idempotent-Replayed" not in again.headers  # the 503 was not replayed
    assert third.headers["Idempotent-Replayed"] == "true"
    assert IdempotentRequest.objects.get(key=k).status == 200
    assert len(CALLS) == 2  # the third call was not run


# --- two copies of one call at once -------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="concurrent writers: Postgres")
def test_two_copies_of_one_start_at_once_start_once_and_answer_the_same():
    job = JobFactory(state=JobState.QUEUED)
    pilot, token = pilot_register(hostname="racer")
    k = key()
    import threading

    barrier = threading.Barrier(4)

    def go():
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Pilot {token}")
        barrier.wait(TIMEOUT)
        response = post(client, start_url(job), {"attempt": 0}, k)
        return response.status_code, response.json()

    racers = [Racer(go) for _ in range(4)]
    for r in racers:
        r.start()
    outcomes = [r.outcome() for r in racers]

    assert {status for status, _ in outcomes} == {200}
    assert all(body == outcomes[0][1] for _, body in outcomes)
    assert JobAttempt.objects.filter(job=job).count() == 1
    assert JobTransition.objects.filter(subject=job).count() == 1
    assert IdempotentRequest.objects.filter(scope=f"pilot:{pilot.pk}").count() == 1


@pytest.mark.parametrize(
    ("status", "kept"),
    [
        *[(200, True), (201, True), (400, True), (404, True), (409, True), (422, True)],
        *[(401, False), (403, False), (429, False), (500, False), (502, False), (503, False)],
    ],
)
def test_which_answers_are_replayed(status, kept):
    from wms.idempotency import storable

    assert storable(status) is kept


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="concurrent writers: Postgres")
def test_two_copies_of_one_registration_at_once_make_one_pilot(django_user_model):
    """The second copy's INSERT of the pilot (the same derived token) waits for the first
    one, fails on the token's unique hash, and answers the first one's answer."""
    import threading

    user = django_user_model.objects.create_user("registrar", is_staff=True)
    body = {"hostname": "wn2.example.org", "device_type": "cpu"}
    k = key()
    barrier = threading.Barrier(3)

    def go():
        client = APIClient()
        client.force_authenticate(user=user)
        barrier.wait(TIMEOUT)
        response = post(client, "/api/v1/pilots/register/", body, k)
        return response.status_code, response.json()

    racers = [Racer(go) for _ in range(3)]
    for r in racers:
        r.start()
    outcomes = [r.outcome() for r in racers]

    assert [status for status, _ in outcomes] == [201, 201, 201], outcomes
    assert all(answer == outcomes[0][1] for _, answer in outcomes)
    assert Pilot.objects.count() == 1
