"""A pilot's final report names its files with plain relative names, at URLs under its job's
output URL; otherwise the whole report is refused and nothing changes (no FILE_DAT row, no
catalogue entry, the job and its attempt still running). The three doors share the check:
REST ``report``, the bulk ``events`` endpoint and the bus."""

from __future__ import annotations

import pytest

from files.models import DatasetEntry, File
from jobs.models import AttemptState, Job, JobAttempt, JobState, JobTransition
from tests.factories import JobFactory
from tests.jobs.pilot_reports import signed
from tests.pilots.test_consumer import consume_now, publish, running_attempt
from wms import checksums
from wms.contract import StatusEvent

pytestmark = pytest.mark.django_db

GOOD = {
    "name": "hist.json",
    "type": "output",
    "size": 10,
    "check_sum": checksums.bytes_checksum(b"h"),
    "url": "file:///out/hist.json",  # the tests' tasks put outputs under file:///out
}

BAD_NAMES = [
    "../../../etc/cron.d/evil",
    "sub/../../x",
    "/etc/shadow",
    "file:///etc/shadow",
    "c:evil",
    "a\\..\\..\\b",
    "a//b",
    "./a",
    "a/.",
]

BAD_URLS = [
    "file:///etc/shadow",
    "file:///out/../etc/shadow",
    "file:///out/%2e%2e/etc/shadow",
    "file:///output2/hist.json",  # a sibling that starts like the job's output URL
    "file://otherhost/out/hist.json",
    "root://eos.example.org//out/hist.json",
    "/etc/shadow",
    "hist.json",
    "file:///out/a%2Fb",
]


def started(client, task):
    job = JobFactory(task=task, state=JobState.QUEUED)
    response = client.post(f"/api/v1/jobs/{job.uuid}/start/", {"attempt": 0}, format="json")
    assert response.status_code == 200, response.json()
    return job


def snapshot(job):
    attempt = JobAttempt.objects.get(job=job, number=0)
    return (
        File.objects.filter(job=job).count(),
        DatasetEntry.objects.count(),
        Job.objects.get(pk=job.pk).state,
        attempt.state,
        attempt.ended_at,
        JobTransition.objects.filter(subject=job).count(),
    )


def assert_unchanged(job, before):
    assert snapshot(job) == before
    assert before[2] == JobState.RUNNING and before[3] == AttemptState.RUNNING
    assert not File.objects.filter(job=job).exists()


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_report_with_an_output_name_that_is_not_plain_is_refused(make_pilot, output_task, name):
    _, client = make_pilot()
    job = started(client, output_task)
    before = snapshot(job)

    response = client.post(
        f"/api/v1/jobs/{job.uuid}/report/",
        {
            "attempt": 0,
            "state": "finished",
            "exit_code": 0,
            "outputs": [GOOD, {**GOOD, "name": name}],
        },
        format="json",
    )

    assert response.status_code == 400, response.json()
    body = response.json()
    assert body["error"] == "validation_failed"
    assert body["detail"]["outputs"][0] == {} and "name" in body["detail"]["outputs"][1]
    assert_unchanged(job, before)


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_report_with_a_url_outside_the_job_s_output_url_is_refused(make_pilot, output_task, url):
    _, client = make_pilot()
    job = started(client, output_task)
    before = snapshot(job)

    response = client.post(
        f"/api/v1/jobs/{job.uuid}/report/",
        {
            "attempt": 0,
            "state": "finished",
            "exit_code": 0,
            "outputs": [GOOD, {**GOOD, "name": "second.json", "url": url}],
        },
        format="json",
    )

    assert response.status_code == 400, response.json()
    body = response.json()
    assert body["error"] == "validation_failed"
    assert body["detail"]["outputs"][0] == {} and "url" in body["detail"]["outputs"][1]
    assert_unchanged(job, before)


def test_a_failed_report_with_a_bad_log_url_is_refused_too(make_pilot, output_task):
    _, client = make_pilot()
    job = started(client, output_task)
    before = snapshot(job)
    log = {**GOOD, "name": f"{job.uuid}.0.log", "type": "log", "url": "file:///etc/passwd"}

    response = client.post(
        f"/api/v1/jobs/{job.uuid}/report/",
        {"attempt": 0, "state": "failed", "exit_code": 1, "outputs": [log]},
        format="json",
    )

    assert response.status_code == 400
    assert_unchanged(job, before)


def test_sub_directories_under_the_output_url_are_accepted(make_pilot, output_task):
    _, client = make_pilot()
    job = started(client, output_task)
    nested = {**GOOD, "name": "plots/pt.png", "url": f"file:///out/{job.uuid}/plots/pt.png"}

    response = client.post(
        f"/api/v1/jobs/{job.uuid}/report/",
        {"attempt": 0, "state": "finished", "exit_code": 0, "outputs": [nested]},
        format="json",
    )

    assert response.status_code == 200, response.json()
    assert File.objects.get(job=job).file_name == f"{job.uuid}/plots/pt.png"


def test_the_bulk_endpoint_refuses_the_bad_report_and_applies_the_others(make_pilot, output_task):
    pilot, client = make_pilot()
    good_job, bad_job = started(client, output_task), started(client, output_task)
    before = snapshot(bad_job)
    events = [
        {
            "job_uuid": str(good_job.uuid),
            "attempt": 0,
            "state": "finished",
            "exit_code": 0,
            "outputs": [GOOD],
        },
        {
            "job_uuid": str(bad_job.uuid),
            "attempt": 0,
            "state": "finished",
            "exit_code": 0,
            "outputs": [{**GOOD, "name": "x.json", "url": "file:///etc/shadow"}],
        },
    ]

    response = client.post(f"/api/v1/pilots/{pilot.pk}/events/", {"events": events}, format="json")

    assert response.status_code == 200
    results = response.json()["results"]
    assert [r.get("outcome") or r["error"] for r in results] == ["applied", "validation_failed"]
    assert "url" in results[1]["detail"]["outputs"][0]
    assert Job.objects.get(pk=good_job.pk).state == JobState.FINISHED
    after = list(snapshot(bad_job))
    after[1] = before[1]  # the good report's files were registered
    assert tuple(after) == before
    assert not DatasetEntry.objects.filter(url="file:///etc/shadow").exists()


def test_the_bus_refuses_and_counts_a_report_with_an_escaping_name(bus_prefix, output_task):
    from pilots.services import pilot_register

    pilot, _ = pilot_register(hostname="wn-bus-data")
    attempt = running_attempt(pilot, output_task)
    entries = DatasetEntry.objects.count()
    evil = {**GOOD, "name": "../../../etc/cron.d/evil", "url": "file:///etc/cron.d/evil"}
    publish(
        signed(
            pilot,
            StatusEvent(
                str(attempt.job.uuid), 0, "finished", pilot.pk, exit_code=0, outputs=[GOOD, evil]
            ),
        )
    )

    total = consume_now(max_wait=0.1, max_batches=1)

    assert (total.received, total.refused, total.applied) == (1, 1, 0)
    assert Job.objects.get(pk=attempt.job_id).state == JobState.RUNNING
    assert JobAttempt.objects.get(pk=attempt.pk).state == AttemptState.RUNNING
    assert not File.objects.filter(job_id=attempt.job_id).exists()
    assert DatasetEntry.objects.count() == entries
