"""Only a pilot speaks for itself on the bus: the events consumer applies an event only if its
message is signed with the bus key of the pilot it names (real RabbitMQ, real PostgreSQL).

Whoever holds the broker's credentials can publish to the events exchange; without the pilot's
key, what they publish is refused (acked and dropped, counted, logged with the pilot it
claims) and changes nothing: no job state, attempt, FILE_DAT row or catalogue entry."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient
from structlog.testing import capture_logs

from files.models import DatasetEntry, File, FileType
from jobs.models import AttemptState, Job, JobAttempt, JobState
from pilots.auth import pilot_bus_key, pilot_bus_keys
from pilots.services import pilot_revoke_token
from tests.factories import api_token
from tests.jobs.pilot_reports import (
    consume_now,
    output,
    publish,
    signed,
    snapshot,
    started,
    waiting,
)
from wms.contract import (
    EVENT_PILOT_HEADER,
    EVENT_SIGNATURE_HEADER,
    StatusEvent,
    event_headers,
    event_signature_valid,
    sign_event_body,
)

pytestmark = pytest.mark.django_db


def finished(job, pilot_id, outputs, **kw) -> StatusEvent:
    return StatusEvent(
        job_uuid=str(job.uuid),
        attempt=0,
        state=kw.pop("state", "finished"),
        pilot_id=pilot_id,
        exit_code=kw.pop("exit_code", 0),
        outputs=outputs,
        **kw,
    )


def forged_headers(body: bytes, pilot_id: int, key: str = "0" * 64) -> dict:
    return event_headers(body, pilot_id=pilot_id, key=key)


# --- the case: a forged final report, then the real one --------------------------------


def test_a_forged_report_naming_another_pilot_changes_nothing_and_the_real_one_is_applied(
    bus_prefix, make_pilot, output_task
):
    victim, victim_client = make_pilot(hostname="victim")
    intruder, _ = make_pilot(hostname="intruder")  # a pilot of its own, with its own key
    job = started(victim_client, output_task)
    fake = finished(job, victim.pk, [output(output_task, "fake.root", size=1)]).encode()
    tampered_body = finished(job, victim.pk, [output(output_task, "other.root")]).encode()
    before = snapshot()

    with capture_logs() as logs:
        publish(
            fake,  # unsigned: only the broker's credentials
            (fake, {EVENT_PILOT_HEADER: victim.pk}),  # names the pilot, no signature
            (fake, forged_headers(fake, victim.pk)),  # a made-up key
            # the intruder's own key, claiming to be the victim
            (fake, {**signed(intruder, fake)[1], EVENT_PILOT_HEADER: victim.pk}),
            signed(intruder, fake),  # signed by the intruder, naming the victim inside
            # the victim's signature of another body
            (tampered_body, signed(victim, fake)[1]),
        )
        total = consume_now()

    assert (total.received, total.unauthenticated, total.applied, total.refused) == (6, 6, 0, 0)
    assert waiting() == 0  # acked and dropped, never requeued
    assert snapshot() == before
    refusals = [e for e in logs if e["event"] == "event_unauthenticated"]
    assert [(e["reason"], e["claimed_pilot_id"]) for e in refusals] == [
        ("unsigned", victim.pk),
        ("unsigned", victim.pk),
        ("bad_signature", victim.pk),
        ("bad_signature", victim.pk),
        ("pilot_mismatch", intruder.pk),
        ("bad_signature", victim.pk),
    ]
    assert all(e["log_level"] == "warning" and e["event_pilot_id"] == victim.pk for e in refusals)

    # The victim's real report is then applied, its outputs registered (not a "duplicate").
    real = [output(output_task, "hist.json"), output(output_task, "job.log", kind="log")]
    response = victim_client.post(
        f"/api/v1/jobs/{job.uuid}/report/",
        {"attempt": 0, "state": "finished", "exit_code": 0, "outputs": real},
        format="json",
    )
    assert response.status_code == 200, response.json()
    assert response.json() == {"job_state": "finished", "outcome": "applied"}
    job.refresh_from_db()
    assert job.state == JobState.FINISHED
    names = set(File.objects.filter(job=job).exclude(type=FileType.INPUT).values_list("file_name"))
    assert names == {(f"{job.uuid}/hist.json",), (f"{job.uuid}/0/job.log",)}
    assert set(
        DatasetEntry.objects.filter(dataset__uid=output_task.data_out_uid).values_list(
            "name", flat=True
        )
    ) == {f"{job.uuid}/hist.json", f"{job.uuid}/0/job.log"}


def test_the_pilots_own_signed_report_on_the_bus_is_applied(bus_prefix, make_pilot, output_task):
    pilot, client = make_pilot()
    job = started(client, output_task)
    publish(signed(pilot, finished(job, pilot.pk, [output(output_task)])))

    total = consume_now()

    assert (total.received, total.applied, total.unauthenticated) == (1, 1, 0)
    assert Job.objects.get(pk=job.pk).state == JobState.FINISHED
    assert DatasetEntry.objects.filter(name=f"{job.uuid}/hist.json").exists()


# --- each way a message fails to prove its pilot -----------------------------------------------


def test_each_unproven_message_is_refused_counted_and_changes_nothing(
    bus_prefix, make_pilot, output_task
):
    pilot, client = make_pilot()
    other, _ = make_pilot(hostname="other")
    job = started(client, output_task)
    event = finished(job, pilot.pk, [output(output_task)])
    body = event.encode()
    good = signed(pilot, body)[1]
    tampered = body.replace(b'"size":1234', b'"size":1235')
    assert tampered != body
    messages = {
        "unsigned": body,
        "no pilot header": (body, {EVENT_SIGNATURE_HEADER: good[EVENT_SIGNATURE_HEADER]}),
        "no signature": (body, {EVENT_PILOT_HEADER: pilot.pk}),
        "wrong key": (body, forged_headers(body, pilot.pk, key="not the pilot's key")),
        "tampered body": (tampered, good),
        "signature of another pilot": (body, {**good, EVENT_PILOT_HEADER: other.pk}),
        "signed by another pilot, naming this one": signed(other, body),
        "unknown pilot": (body, forged_headers(body, 999_999)),
        "bad pilot header": (body, {**good, EVENT_PILOT_HEADER: "pilot-1"}),
        "short signature": (body, {**good, EVENT_SIGNATURE_HEADER: "00"}),
        "signature not text": (body, {**good, EVENT_SIGNATURE_HEADER: 12}),
        "non-ASCII signature": (body, {**good, EVENT_SIGNATURE_HEADER: "é" * 64}),
    }
    before = snapshot()

    publish(*messages.values())
    total = consume_now()

    assert total.received == len(messages)
    assert total.unauthenticated == len(messages), total
    assert (total.applied, total.refused, total.malformed, total.requeued) == (0, 0, 0, 0)
    assert waiting() == 0
    assert snapshot() == before
    assert Job.objects.get(pk=job.pk).state == JobState.RUNNING


def test_a_pilot_mismatch_inside_a_batch_refuses_only_that_message(
    bus_prefix, make_pilot, output_task
):
    """One batch mixing pilots: each message stands for its own signer, and a message whose
    event names another pilot than its signer is refused, the others applied."""
    first, first_client = make_pilot(hostname="first")
    second, second_client = make_pilot(hostname="second")
    mine = started(first_client, output_task)
    theirs = started(second_client, output_task)
    running = StatusEvent(str(mine.uuid), 0, "running", first.pk, metrics={"cpu_time": 1.0})
    other_running = StatusEvent(
        str(theirs.uuid), 0, "running", second.pk, metrics={"cpu_time": 2.0}
    )
    # the first pilot signs an event naming the second (its own key, someone else's name)
    impostor = StatusEvent(str(theirs.uuid), 0, "finished", second.pk, exit_code=0)
    # an event naming no pilot at all
    anonymous = signed(
        first, b'{"job_uuid": "%s", "attempt": 0, "state": "failed"}' % (str(mine.uuid).encode())
    )

    publish(
        signed(first, running), signed(first, impostor), signed(second, other_running), anonymous
    )
    total = consume_now(batch_size=10)

    assert (total.received, total.applied, total.unauthenticated) == (4, 2, 2)
    assert JobAttempt.objects.get(job=mine).metrics == {"cpu_time": 1.0}
    assert JobAttempt.objects.get(job=theirs).metrics == {"cpu_time": 2.0}
    assert JobAttempt.objects.get(job=theirs).state == AttemptState.RUNNING
    assert Job.objects.get(pk=theirs.pk).state == JobState.RUNNING
    assert Job.objects.get(pk=mine.pk).state == JobState.RUNNING


def test_a_revoked_pilots_key_no_longer_signs(bus_prefix, make_pilot, output_task):
    pilot, client = make_pilot()
    job = started(client, output_task)
    message = signed(pilot, finished(job, pilot.pk, [output(output_task)]))
    pilot_revoke_token(pilot_id=pilot.pk)
    before = snapshot()

    publish(message)
    with capture_logs() as logs:
        total = consume_now()

    assert (total.received, total.unauthenticated, total.applied) == (1, 1, 0)
    assert snapshot() == before
    (refusal,) = [e for e in logs if e["event"] == "event_unauthenticated"]
    assert (refusal["reason"], refusal["claimed_pilot_id"]) == (
        "unknown_or_revoked_pilot",
        pilot.pk,
    )


def test_a_signed_but_malformed_body_is_counted_as_malformed(bus_prefix, make_pilot):
    pilot, _ = make_pilot()
    publish(signed(pilot, b"not json"), b"not json either")
    total = consume_now()
    assert (total.received, total.malformed, total.unauthenticated) == (2, 1, 1)
    assert waiting() == 0


# --- the keys ------------------------------------------------------------------------------------


def test_the_registration_returns_the_key_that_the_consumer_accepts(
    bus_prefix, admin_user, output_task
):
    registrar = APIClient()
    registrar.credentials(HTTP_AUTHORIZATION=f"Token {api_token(admin_user)[1]}")
    body = registrar.post(
        "/api/v1/pilots/register/", {"hostname": "wn", "device_type": "cpu"}, format="json"
    ).json()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Pilot {body['token']}")
    job = started(client, output_task)
    event = StatusEvent(str(job.uuid), 0, "running", body["pilot_id"], metrics={"x": 1}).encode()

    publish((event, event_headers(event, pilot_id=body["pilot_id"], key=body["bus_key"])))
    total = consume_now()

    assert (total.applied, total.unauthenticated) == (1, 0)
    assert JobAttempt.objects.get(job=job).metrics == {"x": 1}


def test_a_key_is_bound_to_the_pilot_its_token_and_the_servers_secret(make_pilot, settings):
    pilot, _ = make_pilot()
    other, _ = make_pilot(hostname="other")
    key = pilot_bus_key(pilot_id=pilot.pk, token_hash=str(pilot.token_hash))
    assert len(key) == 64 and key != pilot.token_hash
    assert key != pilot_bus_key(pilot_id=other.pk, token_hash=str(pilot.token_hash))
    assert key != pilot_bus_key(pilot_id=pilot.pk, token_hash=str(other.token_hash))
    assert pilot_bus_keys([pilot.pk, other.pk, 999_999]) == {
        pilot.pk: (key,),
        other.pk: (pilot_bus_key(pilot_id=other.pk, token_hash=str(other.token_hash)),),
    }
    # a new SECRET_KEY makes new keys; the old one, listed in the fallbacks, still verifies
    old_secret = settings.SECRET_KEY
    settings.SECRET_KEY = "another secret entirely, long enough to be a real one"
    settings.SECRET_KEY_FALLBACKS = [old_secret]
    (new, previous) = pilot_bus_keys([pilot.pk])[pilot.pk]
    assert previous == key and new != key
    pilot_revoke_token(pilot_id=pilot.pk)
    assert pilot_bus_keys([pilot.pk]) == {}


def test_the_contract_signature_covers_every_byte():
    body = b'{"job_uuid":"x","pilot_id":1}'
    signature = sign_event_body(body, "k")
    assert event_signature_valid(body, signature, "k")
    assert event_signature_valid(body, signature.encode(), b"k")
    assert not event_signature_valid(body + b" ", signature, "k")
    assert not event_signature_valid(body, signature, "K")
    assert not event_signature_valid(body, signature.upper(), "k")
    assert not event_signature_valid(body, None, "k")
    assert event_headers(body, pilot_id=1, key="k") == {
        EVENT_PILOT_HEADER: 1,
        EVENT_SIGNATURE_HEADER: signature,
    }
