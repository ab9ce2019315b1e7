"""``POST /jobs/{uuid}/report/`` and ``POST /pilots/{id}/events/``: pilots' status events, one
write path (``jobs.reports.job_events_apply``) for both and for the bus."""

from __future__ import annotations

import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from files.dsm import get_dsm, iter_files
from files.models import Dataset, File, FileStatus, FileType
from jobs.control import job_cancel
from jobs.models import AttemptState, Job, JobAttempt, JobState, JobTransition
from jobs.reports import job_events_apply, job_events_prepare
from pilots.models import PilotCommand
from pilots.reaper import pilots_reap_lost
from tests.factories import JobFactory
from wms import checksums

pytestmark = pytest.mark.django_db

HIST = {
    "name": "hist.json",
    "type": "output",
    "size": 1234,
    "check_sum": checksums.bytes_checksum(b"hist"),
    "url": "file:///out/hist.json",
}


def log_file(job, attempt=0):
    return {
        "name": f"{job.uuid}.{attempt}.log",
        "type": "log",
        "size": 77,
        "check_sum": checksums.bytes_checksum(b"log", "sha256"),
        "url": f"file:///out/{job.uuid}.{attempt}.log",
    }


def started(client, task, **kw):
    """A job of ``task`` started by the pilot of ``client`` (attempt ``cur_retry``)."""
    job = JobFactory(task=task, state=JobState.QUEUED, **kw)
    response = client.post(
        f"/api/v1/jobs/{job.uuid}/start/", {"attempt": job.cur_retry}, format="json"
    )
    assert response.status_code == 200, response.json()
    job.refresh_from_db()
    return job


def report(client, job, **body):
    body.setdefault("attempt", 0)
    return client.post(f"/api/v1/jobs/{job.uuid}/report/", body, format="json")


def dataset_files(task) -> dict[str, tuple[int, str, str]]:
    with get_dsm() as dsm:
        return {f.name: (f.size, f.check_sum, f.url) for f in iter_files(dsm, task.data_out_uid)}


# --- finished ----------------------------------------------------------------------------------


def test_a_finished_report_registers_outputs_and_log_and_finishes_the_job(make_pilot, output_task):
    pilot, client = make_pilot()
    job = started(client, output_task)

    response = report(
        client,
        job,
        state="finished",
        exit_code=0,
        metrics={"cpu_time": 3.5, "events": 200},
        outputs=[HIST, log_file(job)],
    )

    assert response.status_code == 200, response.json()
    assert response.json() == {"job_state": "finished", "outcome": "applied"}
    job.refresh_from_db()
    assert job.state == JobState.FINISHED and job.time_end is not None
    attempt = JobAttempt.objects.get(job=job)
    assert (attempt.state, attempt.exit_code, attempt.error_code) == ("finished", 0, "")
    assert attempt.metrics == {"cpu_time": 3.5, "events": 200} and attempt.ended_at
    out_name, log_name = f"{job.uuid}/hist.json", f"{job.uuid}/0/{job.uuid}.0.log"
    # FILE_DAT: the job's output and log, ready, in the output dataset
    files = {f.file_name: f for f in File.objects.filter(job=job).exclude(type=FileType.INPUT)}
    assert set(files) == {out_name, log_name}
    out, log = files[out_name], files[log_name]
    assert (out.type, out.size, out.check_sum, out.url, out.status) == (
        "output",
        1234,
        HIST["check_sum"],
        HIST["url"],
        FileStatus.READY,
    )
    assert (log.type, log.size, log.status) == ("log", 77, FileStatus.READY)
    output_ds = Dataset.objects.get(uid=output_task.data_out_uid)
    assert out.dataset_id == log.dataset_id == output_ds.pk
    assert out.task_id == output_task.pk and out.entry.name == out_name
    assert (job.file_out_id, job.file_log_id) == (out.pk, log.pk)
    # the DSM: both in the task's output dataset, with size and checksum
    assert dataset_files(output_task) == {
        out_name: (1234, HIST["check_sum"], HIST["url"]),
        log_name: (77, log_file(job)["check_sum"], log_file(job)["url"]),
    }
    output_ds.refresh_from_db()
    assert (output_ds.file_count, output_ds.total_size) == (2, 1234 + 77)
    assert list(job.transitions.values_list("to_state", "source")) == [
        ("running", f"pilot:{pilot.pk}"),
        ("finished", f"pilot:{pilot.pk}"),
    ]


def test_the_same_final_report_twice_is_a_duplicate_and_changes_nothing(make_pilot, output_task):
    _, client = make_pilot()
    job = started(client, output_task)
    body = {"state": "finished", "exit_code": 0, "outputs": [HIST, log_file(job)]}
    assert report(client, job, **body).json()["outcome"] == "applied"
    before = (File.objects.count(), JobTransition.objects.count(), dataset_files(output_task))
    ended = JobAttempt.objects.get(job=job).ended_at

    again = report(client, job, **body)

    assert again.status_code == 200
    assert again.json() == {"job_state": "finished", "outcome": "duplicate"}
    assert (File.objects.count(), JobTransition.objects.count(), dataset_files(output_task)) == (
        before
    )
    assert JobAttempt.objects.get(job=job).ended_at == ended


def test_a_report_whose_transaction_was_lost_after_registration_finds_its_entries(
    make_pilot, output_task
):
    """The first step registered the files in the DSM and the transaction never came (the
    worker died between the two): the report sent again takes the names already there as
    registered, and its FILE_DAT rows point at those entries of the local catalogue."""
    pilot, client = make_pilot()
    job = started(client, output_task)
    event = {
        "job_uuid": str(job.uuid),
        "attempt": 0,
        "state": "finished",
        "exit_code": 0,
        "outputs": [HIST, log_file(job)],
    }
    prepared = job_events_prepare(events=[event], pilot_id=pilot.pk)  # and nothing more
    assert len(prepared.registered.entries) == 2
    first = dataset_files(output_task)

    [outcome] = job_events_apply(events=[event], pilot_id=pilot.pk)

    assert outcome.outcome == "applied"
    assert dataset_files(output_task) == first  # nothing registered twice
    files = File.objects.filter(job=job).exclude(type=FileType.INPUT).select_related("entry")
    assert {f.file_name: f.entry_id for f in files} == {
        name: entry_id for (_, name), entry_id in prepared.registered.entries.items()
    }
    assert all(f.entry.name == f.file_name and f.status == FileStatus.READY for f in files)


def test_running_reports_store_metrics(make_pilot, output_task):
    _, client = make_pilot()
    job = started(client, output_task)
    response = report(client, job, state="running", metrics={"cpu_time": 1.0, "rss_mb": 40})
    assert response.json() == {"job_state": "running", "outcome": "applied"}
    report(client, job, state="running", metrics={"cpu_time": 2.0})
    attempt = JobAttempt.objects.get(job=job)
    assert attempt.metrics == {"cpu_time": 2.0, "rss_mb": 40}
    assert attempt.state == AttemptState.RUNNING
    assert Job.objects.get(pk=job.pk).state == JobState.RUNNING


# --- failed ------------------------------------------------------------------------------------


def test_a_failed_attempt_with_retries_left_goes_round_again_and_history_is_kept(
    make_pilot, output_task
):
    _pilot, client = make_pilot()
    job = started(client, output_task)  # retries = 2 (the task's max_retries)

    response = report(
        client,
        job,
        state="failed",
        exit_code=3,
        error_code="payload_error",
        error_message="segfault in reco",
        outputs=[HIST, log_file(job)],
    )

    assert response.json() == {"job_state": "defined", "outcome": "applied"}
    job.refresh_from_db()
    assert (job.state, job.cur_retry, job.time_end) == (JobState.DEFINED, 1, None)
    first = JobAttempt.objects.get(job=job, number=0)
    assert (first.state, first.exit_code, first.error_code, first.error_message) == (
        "failed",
        3,
        "payload_error",
        "segfault in reco",
    )
    # the log is registered (its name holds the attempt), the output of a failed attempt is
    # kept as partial and not put in the dataset (the retry writes it again)
    assert set(dataset_files(output_task)) == {f"{job.uuid}/0/{job.uuid}.0.log"}
    partial = File.objects.get(job=job, type=FileType.OUTPUT)
    assert (partial.status, partial.file_name, partial.dataset_id) == (
        FileStatus.PARTIAL,
        f"{job.uuid}/0/hist.json",
        None,
    )
    assert job.transitions.last().reason == "attempt failed (payload_error); retry"

    # the executor queues it again; attempt 1 runs and finishes
    Job.objects.filter(pk=job.pk).update(state=JobState.QUEUED)
    assert (
        client.post(f"/api/v1/jobs/{job.uuid}/start/", {"attempt": 0}, format="json").json()[
            "error"
        ]
        == "stale_attempt"
    )
    assert (
        client.post(f"/api/v1/jobs/{job.uuid}/start/", {"attempt": 1}, format="json").status_code
        == 200
    )
    report(client, job, attempt=1, state="finished", exit_code=0, outputs=[HIST, log_file(job, 1)])

    job.refresh_from_db()
    assert job.state == JobState.FINISHED
    assert list(JobAttempt.objects.filter(job=job).values_list("number", "state")) == [
        (0, "failed"),
        (1, "finished"),
    ]
    assert set(dataset_files(output_task)) == {
        f"{job.uuid}/0/{job.uuid}.0.log",
        f"{job.uuid}/1/{job.uuid}.1.log",
        f"{job.uuid}/hist.json",
    }
    assert job.file_log.file_name == f"{job.uuid}/1/{job.uuid}.1.log"
    assert job.file_out.file_name == f"{job.uuid}/hist.json"


def test_a_failed_attempt_without_retries_fails_the_job_with_its_error(make_pilot, output_task):
    _, client = make_pilot()
    job = started(client, output_task, retries=0)

    response = report(client, job, state="failed", exit_code=1, error_message="boom")

    assert response.json() == {"job_state": "failed", "outcome": "applied"}
    job.refresh_from_db()
    assert (job.state, job.cur_retry) == (JobState.FAILED, 0)
    assert job.time_end is not None
    assert job.transitions.last().reason == "attempt failed (exit code 1); no retry left"
    attempt = job.attempts.get()
    assert (attempt.state, attempt.exit_code, attempt.error_message) == ("failed", 1, "boom")


# --- late, foreign, bad ------------------------------------------------------------------------


def test_a_late_report_of_a_lost_attempt_is_ignored_and_moves_nothing_back(
    make_pilot, output_task, settings
):
    """The attempt lost its job: the next attempt runs on another pilot. Its late final report
    registers nothing (only one attempt's outputs are ever registered). Had the next attempt
    not started, the report would have reclaimed it (tests/jobs/test_reconcile.py)."""
    _pilot, client = make_pilot()
    job = started(client, output_task)
    settings.WMS_PILOT_LOST_AFTER = 0
    assert pilots_reap_lost().attempts == 1
    job.refresh_from_db()
    assert (job.state, job.cur_retry) == (JobState.DEFINED, 1)
    Job.objects.filter(pk=job.pk).update(state=JobState.QUEUED)  # the executor's doing
    _, other = make_pilot(hostname="wn2.test")
    assert other.post(f"/api/v1/jobs/{job.uuid}/start/", {"attempt": 1}).status_code == 200

    response = report(client, job, state="finished", exit_code=0, outputs=[HIST])

    assert response.status_code == 200
    assert response.json() == {"job_state": "running", "outcome": "ignored"}
    job.refresh_from_db()
    assert (job.state, job.cur_retry) == (JobState.RUNNING, 1)
    assert JobAttempt.objects.get(job=job, number=0).state == AttemptState.LOST
    assert not File.objects.filter(job=job).exclude(type=FileType.INPUT).exists()
    assert dataset_files(output_task) == {}


def test_a_report_of_an_attempt_that_never_started_is_ignored(make_pilot):
    _, client = make_pilot()
    job = JobFactory(state=JobState.QUEUED)
    response = report(client, job, state="finished", exit_code=0)
    assert response.json() == {"job_state": "queued", "outcome": "ignored"}
    assert Job.objects.get(pk=job.pk).state == JobState.QUEUED


def test_another_pilots_attempt_is_403(make_pilot, output_task):
    _, owner = make_pilot()
    _, intruder = make_pilot(hostname="intruder")
    job = started(owner, output_task)

    response = report(intruder, job, state="finished", exit_code=0)

    assert response.status_code == 403
    assert response.json()["error"] == "permission_denied"
    assert Job.objects.get(pk=job.pk).state == JobState.RUNNING
    assert JobAttempt.objects.get(job=job).state == AttemptState.RUNNING


def test_an_unknown_job_is_404(make_pilot):
    _, client = make_pilot()
    response = client.post(
        f"/api/v1/jobs/{uuid.uuid4()}/report/", {"attempt": 0, "state": "running"}, format="json"
    )
    assert response.status_code == 404 and response.json()["error"] == "not_found"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"state": "lost"}, "state"),
        ({"state": "finished", "attempt": -1}, "attempt"),
        ({"state": "finished", "outputs": [{**HIST, "check_sum": "crc:1"}]}, "outputs"),
        ({"state": "finished", "outputs": [{**HIST, "type": "input"}]}, "outputs"),
        ({"state": "finished", "outputs": [{**HIST, "owner": "me"}]}, "outputs"),
        ({"state": "finished", "outputs": [HIST, HIST]}, "outputs"),
        ({"state": "finished", "metrics": "fast"}, "metrics"),
        ({"state": "running", "outputs": [HIST]}, "outputs"),
        ({"state": "finished", "exit_code": "zero"}, "exit_code"),
        ({"state": "finished", "job_uuid": str(uuid.uuid4())}, "job_uuid"),
        ({"state": "finished", "pilot_id": 987654}, "pilot_id"),
        ({"state": "finished", "v": 2}, "v"),
        ({"state": "finished", "colour": "red"}, "colour"),
    ],
)
def test_a_bad_report_is_400_and_nothing_changes(make_pilot, output_task, body, field):
    _, client = make_pilot()
    job = started(client, output_task)

    response = report(client, job, **body)

    assert response.status_code == 400, response.json()
    assert response.json()["error"] == "validation_failed"
    assert field in response.json()["detail"], response.json()
    assert Job.objects.get(pk=job.pk).state == JobState.RUNNING
    assert JobAttempt.objects.get(job=job).state == AttemptState.RUNNING
    assert not File.objects.filter(job=job).exclude(type=FileType.INPUT).exists()


def test_the_contract_fields_of_a_status_event_are_accepted(make_pilot, output_task):
    pilot, client = make_pilot()
    job = started(client, output_task)
    response = report(
        client,
        job,
        v=1,
        kind="event",
        job_uuid=str(job.uuid),
        pilot_id=pilot.pk,
        sent_at="2026-01-01T00:00:00Z",
        state="finished",
        exit_code=0,
        error_code="",
        error_message="",
        metrics={},
        outputs=[HIST],
    )
    assert response.json() == {"job_state": "finished", "outcome": "applied"}


# --- a job cancelled while it runs -------------------------------------------------------------


def test_the_final_report_of_a_cancelled_job_records_the_end_log_and_kill_ack(
    make_pilot, output_task
):
    pilot, client = make_pilot()
    job = started(client, output_task)
    job_cancel(job_id=job.pk, source="api", reason="not needed")
    attempt = JobAttempt.objects.get(job=job)
    assert attempt.state == AttemptState.CANCELLED and attempt.kill_requested_at
    assert attempt.kill_acked_at is None
    assert PilotCommand.objects.get(pilot=pilot).command == "kill_job"

    body = {
        "state": "failed",
        "exit_code": -9,
        "error_code": "killed",
        "metrics": {"cpu_time": 9.0},
        "outputs": [HIST, log_file(job)],
    }
    response = report(client, job, **body)

    assert response.json() == {"job_state": "cancelled", "outcome": "applied"}
    attempt.refresh_from_db()
    assert attempt.state == AttemptState.CANCELLED
    assert attempt.kill_acked_at is not None
    assert (attempt.exit_code, attempt.error_code, attempt.metrics) == (
        -9,
        "killed",
        {"cpu_time": 9.0},
    )
    job.refresh_from_db()
    assert job.state == JobState.CANCELLED
    assert set(dataset_files(output_task)) == {f"{job.uuid}/0/{job.uuid}.0.log"}
    assert job.file_log.type == FileType.LOG
    assert File.objects.get(job=job, type=FileType.OUTPUT).status == FileStatus.PARTIAL

    again = report(client, job, **body)
    assert again.json() == {"job_state": "cancelled", "outcome": "duplicate"}
    assert File.objects.filter(job=job).exclude(type=FileType.INPUT).count() == 2


# --- the bulk endpoint -------------------------------------------------------------------------


def test_bulk_events_one_bad_event_spoils_no_other(make_pilot, output_task):
    pilot, client = make_pilot()
    _, other_client = make_pilot(hostname="other")
    running = started(client, output_task)
    finishing = started(client, output_task)
    foreign = started(other_client, output_task)
    missing = uuid.uuid4()
    events = [
        {"job_uuid": str(running.uuid), "attempt": 0, "state": "running", "metrics": {"x": 1}},
        {
            "job_uuid": str(finishing.uuid),
            "attempt": 0,
            "state": "finished",
            "exit_code": 0,
            "outputs": [HIST],
        },
        {"job_uuid": str(running.uuid), "attempt": 0, "state": "exploded"},
        {"job_uuid": str(missing), "attempt": 0, "state": "running"},
        {"job_uuid": str(foreign.uuid), "attempt": 0, "state": "finished", "exit_code": 0},
        {
            "job_uuid": str(finishing.uuid),
            "attempt": 0,
            "state": "finished",
            "exit_code": 0,
            "outputs": [HIST],
        },
        "not an object",
    ]

    response = client.post(f"/api/v1/pilots/{pilot.pk}/events/", {"events": events}, format="json")

    assert response.status_code == 200, response.json()
    results = response.json()["results"]
    assert [r.get("outcome") or r["error"] for r in results] == [
        "applied",
        "applied",
        "validation_failed",
        "not_found",
        "permission_denied",
        "duplicate",  # the same final report again, within the batch
        "validation_failed",
    ]
    assert results[0] == {
        "job_uuid": str(running.uuid),
        "attempt": 0,
        "outcome": "applied",
        "job_state": "running",
    }
    assert "state" in results[2]["detail"]
    assert JobAttempt.objects.get(job=running).metrics == {"x": 1}
    assert Job.objects.get(pk=finishing.pk).state == JobState.FINISHED
    assert Job.objects.get(pk=foreign.pk).state == JobState.RUNNING
    assert set(dataset_files(output_task)) == {f"{finishing.uuid}/hist.json"}


def test_bulk_events_envelope_is_checked(make_pilot):
    pilot, client = make_pilot()
    url = f"/api/v1/pilots/{pilot.pk}/events/"
    event = {"job_uuid": str(uuid.uuid4()), "attempt": 0, "state": "running"}
    assert client.post(url, {"events": []}, format="json").status_code == 400
    assert client.post(url, {"events": [event] * 1001}, format="json").status_code == 400
    assert client.post(url, {"events": [event], "x": 1}, format="json").status_code == 400
    assert client.post(url, {"events": [event]}, format="json").status_code == 200


@pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite splits big INSERTs")
def test_the_bulk_path_costs_a_bounded_number_of_queries(make_pilot, output_task):
    pilot, client = make_pilot()

    def cost(n: int) -> tuple[int, int]:
        jobs = [started(client, output_task) for _ in range(2 * n)]
        metrics = [
            {"job_uuid": str(j.uuid), "attempt": 0, "state": "running", "metrics": {"i": i}}
            for i, j in enumerate(jobs)
        ]
        finals = [
            {
                "job_uuid": str(j.uuid),
                "attempt": 0,
                "state": "finished",
                "exit_code": 0,
                "outputs": [HIST, log_file(j)],
            }
            for j in jobs[:n]
        ] + [
            {
                "job_uuid": str(j.uuid),
                "attempt": 0,
                "state": "failed",
                "exit_code": 1,
                "outputs": [log_file(j)],
            }
            for j in jobs[n:]
        ]
        with CaptureQueriesContext(connection) as running_ctx:
            assert all(r.ok for r in job_events_apply(events=metrics, pilot_id=pilot.pk))
        with CaptureQueriesContext(connection) as final_ctx:
            assert all(r.ok for r in job_events_apply(events=finals, pilot_id=pilot.pk))
        assert Job.objects.filter(pk__in=[j.pk for j in jobs[:n]], state="finished").count() == n
        return len(running_ctx.captured_queries), len(final_ctx.captured_queries)

    assert cost(2) == cost(30)
