"""A final report that contradicts the one already applied is a conflict, not a duplicate.

The first final report of an attempt ends it and registers its files. The same report again
(files in any order, other metrics, another ``sent_at``) is a harmless ``duplicate``; another
one (a file renamed, resized, with another checksum or URL, a file more or less, another state,
exit or error code) is refused: 409 ``report_conflict`` on REST, an error of its own in a bulk
answer, ``conflicts`` on the bus; logged with both versions, and nothing changes."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from files.models import File, FileType
from jobs.control import job_cancel
from jobs.models import AttemptState, Job, JobAttempt, JobState
from tests.jobs.pilot_reports import consume_now, output, publish, signed, snapshot, started
from wms.contract import StatusEvent

pytestmark = pytest.mark.django_db


def report(client, job, **body):
    body.setdefault("attempt", 0)
    return client.post(f"/api/v1/jobs/{job.uuid}/report/", body, format="json")


def first_report(task) -> dict:
    return {
        "state": "finished",
        "exit_code": 0,
        "error_code": "",
        "metrics": {"cpu_time": 1.5},
        "outputs": [output(task, "hist.json"), output(task, "job.log", kind="log", size=77)],
    }


def changes(task) -> dict[str, dict]:
    """Ways a second final report may differ from the first one (``first_report``)."""
    hist, log = output(task, "hist.json"), output(task, "job.log", kind="log", size=77)
    return {
        "output size": {"outputs": [{**hist, "size": 1}, log]},
        "output checksum": {"outputs": [{**hist, "check_sum": "adler32:00000001"}, log]},
        "output url": {"outputs": [{**hist, "url": hist["url"] + ".bak"}, log]},
        "output name": {"outputs": [output(task, "other.json"), log]},
        "log size": {"outputs": [hist, {**log, "size": 78}]},
        "one more file": {"outputs": [hist, log, output(task, "extra.json")]},
        "one file less": {"outputs": [hist]},
        "no files": {"outputs": []},
        "state": {"state": "failed", "exit_code": 1},
        "exit code": {"exit_code": 3},
        "error code": {"error_code": "late_failure"},
    }


CHANGES = [
    "output size",
    "output checksum",
    "output url",
    "output name",
    "log size",
    "one more file",
    "one file less",
    "no files",
    "state",
    "exit code",
    "error code",
]


@pytest.mark.parametrize("change", CHANGES)
def test_a_different_final_report_is_a_409_conflict_and_changes_nothing(
    make_pilot, output_task, change
):
    pilot, client = make_pilot()
    job = started(client, output_task)
    applied = first_report(output_task)
    assert report(client, job, **applied).json() == {"job_state": "finished", "outcome": "applied"}
    before = snapshot()

    with capture_logs() as logs:
        response = report(client, job, **{**applied, **changes(output_task)[change]})

    assert response.status_code == 409, response.json()
    assert response.json()["error"] == "report_conflict"
    assert snapshot() == before
    (logged,) = [e for e in logs if e["event"] == "report_conflict"]
    assert (logged["job_uuid"], logged["attempt"], logged["pilot_id"]) == (
        str(job.uuid),
        0,
        pilot.pk,
    )
    assert logged["applied"]["state"] == "finished" and logged["applied"]["files"] == 2
    assert sorted(f[1] for f in logged["applied"]["first_files"]) == [
        f"{job.uuid}/0/job.log",
        f"{job.uuid}/hist.json",
    ]
    assert logged["refused"] != logged["applied"]


def test_the_identical_report_again_is_a_duplicate_even_reordered_or_with_new_metrics(
    make_pilot, output_task
):
    _, client = make_pilot()
    job = started(client, output_task)
    applied = first_report(output_task)
    assert report(client, job, **applied).json()["outcome"] == "applied"
    before = snapshot()
    again = {
        **applied,
        "outputs": list(reversed(applied["outputs"])),
        "metrics": {"cpu_time": 2.0, "rss_mb": 10.0},
        "error_message": "sent again from the spool",
        "sent_at": "2026-12-04T00:00:00Z",
    }

    for body in (applied, again):
        response = report(client, job, **body)
        assert response.status_code == 200, response.json()
        assert response.json() == {"job_state": "finished", "outcome": "duplicate"}
    assert snapshot() == before
    assert JobAttempt.objects.get(job=job).metrics == {"cpu_time": 1.5}


def test_a_retried_attempts_report_cannot_be_rewritten_as_a_success(make_pilot, output_task):
    """Attempt 0 failed (the job went round again); a later 'finished' of attempt 0 is a
    conflict: it neither finishes the job nor registers outputs."""
    _, client = make_pilot()
    job = started(client, output_task)
    failed = {
        "state": "failed",
        "exit_code": 1,
        "outputs": [output(output_task, "a.log", kind="log")],
    }
    assert report(client, job, **failed).json() == {"job_state": "defined", "outcome": "applied"}
    before = snapshot()

    response = report(client, job, state="finished", exit_code=0, outputs=[output(output_task)])

    assert response.status_code == 409 and response.json()["error"] == "report_conflict"
    assert snapshot() == before
    assert Job.objects.get(pk=job.pk).state == JobState.DEFINED
    assert report(client, job, **failed).json() == {"job_state": "defined", "outcome": "duplicate"}


def test_the_kill_acknowledgement_of_a_cancelled_job_cannot_be_rewritten(make_pilot, output_task):
    _, client = make_pilot()
    job = started(client, output_task)
    job_cancel(job_id=job.pk, source="api", reason="not needed")
    killed = {"state": "failed", "exit_code": -9, "error_code": "killed", "outputs": []}
    assert report(client, job, **killed).json() == {"job_state": "cancelled", "outcome": "applied"}
    before = snapshot()

    response = report(client, job, **{**killed, "outputs": [output(output_task)]})

    assert response.status_code == 409 and response.json()["error"] == "report_conflict"
    assert snapshot() == before
    assert JobAttempt.objects.get(job=job).state == AttemptState.CANCELLED
    assert report(client, job, **killed).json()["outcome"] == "duplicate"


def test_a_report_of_an_attempt_the_server_ended_is_still_ignored(
    make_pilot, output_task, settings
):
    """No report ended a lost attempt: a late one, once its job started the next attempt, is
    not a conflict, it is ignored. (Before that, its pilot reclaims it: pilots.reconcile.)"""
    from pilots.reaper import pilots_reap_lost

    _, client = make_pilot()
    job = started(client, output_task)
    settings.WMS_PILOT_LOST_AFTER = 0
    assert pilots_reap_lost().attempts == 1
    Job.objects.filter(pk=job.pk).update(state=JobState.QUEUED)  # the executor's doing
    _, other = make_pilot(hostname="wn2.test")
    assert other.post(f"/api/v1/jobs/{job.uuid}/start/", {"attempt": 1}).status_code == 200
    before = snapshot()

    response = report(client, job, **first_report(output_task))

    assert response.json() == {"job_state": "running", "outcome": "ignored"}
    assert snapshot() == before


def test_bulk_events_answer_a_conflict_per_event(make_pilot, output_task):
    """In one request: a report applied, the same again (duplicate), another version
    (conflict); and for a job already reported, a conflicting version."""
    pilot, client = make_pilot()
    done, fresh = started(client, output_task), started(client, output_task)
    applied = first_report(output_task)
    assert report(client, done, **applied).json()["outcome"] == "applied"
    other = {**applied, "exit_code": 2}
    events = [
        {"job_uuid": str(done.uuid), "attempt": 0, **other},
        {"job_uuid": str(fresh.uuid), "attempt": 0, **applied},
        {"job_uuid": str(fresh.uuid), "attempt": 0, **applied},
        {"job_uuid": str(fresh.uuid), "attempt": 0, **other},
    ]

    response = client.post(f"/api/v1/pilots/{pilot.pk}/events/", {"events": events}, format="json")

    assert response.status_code == 200, response.json()
    assert [r.get("outcome") or r["error"] for r in response.json()["results"]] == [
        "report_conflict",
        "applied",
        "duplicate",
        "report_conflict",
    ]
    attempt = JobAttempt.objects.get(job=fresh)
    assert (attempt.state, attempt.exit_code) == ("finished", 0)
    assert File.objects.filter(job=fresh).exclude(type=FileType.INPUT).count() == 2
    assert JobAttempt.objects.get(job=done).exit_code == 0


def test_on_the_bus_a_conflict_is_refused_and_counted(bus_prefix, make_pilot, output_task):
    pilot, client = make_pilot()
    job = started(client, output_task)
    applied = first_report(output_task)
    assert report(client, job, **applied).json()["outcome"] == "applied"
    before = snapshot()

    def event(**change) -> StatusEvent:
        body = {**applied, **change}
        return StatusEvent(job_uuid=str(job.uuid), attempt=0, pilot_id=pilot.pk, **body)

    publish(
        signed(pilot, event()),  # the same again: a duplicate
        signed(pilot, event(outputs=[output(output_task, "forged.root")])),
    )
    total = consume_now()

    assert (total.received, total.applied, total.conflicts, total.refused) == (2, 1, 1, 0)
    assert snapshot() == before
