"""``POST /pilots/{id}/starts/``: a pilot's batched starts, each claimed or refused alone, in a
fixed number of statements; and the bulk ``events`` answering their final reports in a fixed
number of statements too (issue 15)."""

from __future__ import annotations

import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from files.models import File, FileType
from jobs.models import Job, JobAttempt, JobState, JobTransition
from pilots.models import Pilot, PilotState
from tasks.models import Task, TaskState
from tests.factories import JobFactory, TaskFactory
from wms import checksums
from wms.models import IdempotentRequest

pytestmark = pytest.mark.django_db


def queued_jobs(task, n: int) -> list[Job]:
    """``n`` queued jobs of ``task``, made in one INSERT."""
    return Job.objects.bulk_create(
        [JobFactory.build(task=task, state=JobState.QUEUED) for _ in range(n)]
    )


def starts(client, pilot, entries, **headers):
    return client.post(
        f"/api/v1/pilots/{pilot.pk}/starts/", {"starts": entries}, format="json", **headers
    )


def entry(job, attempt=None):
    return {"job_uuid": str(job.uuid), "attempt": job.cur_retry if attempt is None else attempt}


def test_several_jobs_are_started_in_one_call_with_their_job_messages(make_pilot, output_task):
    pilot, client = make_pilot()
    jobs = queued_jobs(output_task, 3)

    response = starts(client, pilot, [entry(j) for j in jobs])

    assert response.status_code == 200, response.json()
    results = response.json()["results"]
    assert [r["job_uuid"] for r in results] == [str(j.uuid) for j in jobs]
    for job, result in zip(jobs, results, strict=True):
        assert result["outcome"] == "started" and result["attempt"] == 0
        message = result["job"]
        assert (message["job_uuid"], message["attempt"], message["kind"]) == (
            str(job.uuid),
            0,
            "job",
        )
        assert message["output_url"] == output_task.data_out_url
        assert message["output_dataset_uid"] == str(output_task.data_out_uid)
    assert set(Job.objects.filter(task=output_task).values_list("state", "pilot_id")) == {
        (JobState.RUNNING, pilot.pk)
    }
    assert JobAttempt.objects.filter(job__in=jobs, pilot=pilot, number=0).count() == 3
    assert (
        JobTransition.objects.filter(
            subject__in=jobs, from_state="queued", to_state="running", source=f"pilot:{pilot.pk}"
        ).count()
        == 3
    )
    assert Pilot.objects.get(pk=pilot.pk).state == PilotState.BUSY


def test_each_bad_start_is_refused_alone_with_its_reason_and_the_rest_are_started(
    make_pilot, output_task
):
    pilot, client = make_pilot()
    good, stale, taken, cancelled, twice = queued_jobs(output_task, 5)
    gpu_job = JobFactory(task=TaskFactory(device_type="gpu"), state=JobState.QUEUED)
    _other, other_client = make_pilot(hostname="other")
    assert starts(other_client, _other, [entry(taken)]).json()["results"][0]["outcome"] == "started"
    Job.objects.filter(pk=cancelled.pk).update(state=JobState.CANCELLED)
    entries = [
        entry(good),
        {"job_uuid": "not-a-uuid", "attempt": 0},
        {"job_uuid": str(uuid.uuid4()), "attempt": 0},
        entry(stale, attempt=3),
        entry(taken),
        entry(cancelled),
        entry(gpu_job),
        {"job_uuid": str(good.uuid)},
        entry(twice),
        entry(twice),
        ["not", "an", "object"],
        {**entry(twice), "extra": 1},
    ]

    response = starts(client, pilot, entries)

    assert response.status_code == 200, response.json()
    results = response.json()["results"]
    got = [(r.get("outcome") or r["error"]) for r in results]
    assert got == [
        "started",
        "validation_failed",
        "not_found",
        "stale_attempt",
        "job_not_queued",
        "job_not_queued",
        "wrong_device",
        "validation_failed",
        "started",
        "job_not_queued",  # named twice in one call
        "validation_failed",
        "validation_failed",
    ]
    assert results[3]["detail"] and results[3]["attempt"] == 3
    assert results[1]["job_uuid"] == "not-a-uuid" and results[10]["job_uuid"] == ""
    assert "attempt" in results[7]["detail"]
    # the good ones run with this pilot; nothing of the refused ones was written
    assert set(Job.objects.filter(pk__in=[good.pk, twice.pk]).values_list("state", "pilot_id")) == {
        (JobState.RUNNING, pilot.pk)
    }
    assert Job.objects.get(pk=stale.pk).state == JobState.QUEUED
    assert Job.objects.get(pk=taken.pk).pilot_id == _other.pk
    assert Job.objects.get(pk=cancelled.pk).state == JobState.CANCELLED
    assert Job.objects.get(pk=gpu_job.pk).state == JobState.QUEUED
    assert JobAttempt.objects.filter(pilot=pilot).count() == 2


def test_a_paused_task_sends_its_jobs_back_to_wait_and_the_others_start(make_pilot, output_task):
    pilot, client = make_pilot()
    running = queued_jobs(output_task, 1)[0]
    paused_task = TaskFactory()
    Task.objects.filter(pk=paused_task.pk).update(state=TaskState.PAUSED)
    paused = JobFactory(task=paused_task, state=JobState.QUEUED)

    results = starts(client, pilot, [entry(paused), entry(running)]).json()["results"]

    assert [r.get("outcome") or r["error"] for r in results] == ["task_paused", "started"]
    assert Job.objects.get(pk=paused.pk).state == JobState.DEFINED
    assert not JobAttempt.objects.filter(job=paused).exists()
    assert Job.objects.get(pk=running.pk).state == JobState.RUNNING


def test_the_same_call_again_answers_the_same_job_messages_and_writes_nothing(
    make_pilot, output_task
):
    pilot, client = make_pilot()
    jobs = queued_jobs(output_task, 4)
    body = [entry(j) for j in jobs]
    first = starts(client, pilot, body, HTTP_IDEMPOTENCY_KEY="starts-key-1")
    assert first.status_code == 200
    written = (JobAttempt.objects.count(), JobTransition.objects.count())

    # with its key: the stored answer
    again = starts(client, pilot, body, HTTP_IDEMPOTENCY_KEY="starts-key-1")
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    # without a key (or with a new one: the answer was lost before it was stored): the
    # server recognises its own starts and answers the same messages
    fresh = starts(client, pilot, body, HTTP_IDEMPOTENCY_KEY="starts-key-2")
    assert fresh.json() == first.json()
    assert starts(client, pilot, body).json() == first.json()
    assert (JobAttempt.objects.count(), JobTransition.objects.count()) == written
    assert IdempotentRequest.objects.filter(key__in=["starts-key-1", "starts-key-2"]).count() == 2


def test_a_pilot_that_is_not_live_is_refused_as_a_whole(make_pilot, output_task):
    pilot, client = make_pilot()
    jobs = queued_jobs(output_task, 2)
    Pilot.objects.filter(pk=pilot.pk).update(state=PilotState.LOST)

    response = starts(client, pilot, [entry(j) for j in jobs])

    assert response.status_code == 409 and response.json()["error"] == "pilot_not_live"
    assert set(Job.objects.filter(task=output_task).values_list("state", flat=True)) == {"queued"}


def test_the_call_is_for_the_pilot_itself_and_bounded(make_pilot, output_task):
    pilot, client = make_pilot()
    other, _ = make_pilot(hostname="other")
    job = queued_jobs(output_task, 1)[0]
    assert starts(client, other, [entry(job)]).status_code == 403
    too_many = [{"job_uuid": str(uuid.uuid4()), "attempt": 0}] * 1001
    assert starts(client, pilot, too_many).status_code == 400
    assert starts(client, pilot, []).status_code == 400
    assert (
        client.post(
            f"/api/v1/pilots/{pilot.pk}/starts/", {"starts": [entry(job)], "x": 1}, format="json"
        ).status_code
        == 400
    )
    assert Job.objects.get(pk=job.pk).state == JobState.QUEUED


def final_report(job, message):
    root = f"{message['output_url'].rstrip('/')}/{job}"
    return {
        "job_uuid": job,
        "attempt": 0,
        "state": "finished",
        "exit_code": 0,
        "metrics": {"wall_time": 0.01},
        "outputs": [
            {
                "name": "out.root",
                "type": "output",
                "size": 10,
                "check_sum": checksums.bytes_checksum(b"out"),
                "url": f"{root}/out.root",
            },
            {
                "name": f"{job}.0.log",
                "type": "log",
                "size": 5,
                "check_sum": checksums.bytes_checksum(b"log"),
                "url": f"{root}/0/{job}.0.log",
            },
        ],
    }


@pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite splits big INSERTs")
@pytest.mark.parametrize("n", [10, 1000])
def test_starts_and_final_reports_cost_a_fixed_number_of_statements(
    n, make_pilot, output_task, django_assert_max_num_queries
):
    """The same bound for a batch of 10 and of 1,000: the whole request (authentication,
    idempotency key, the claim; the reports' registration in the DSM and their transaction)."""
    pilot, client = make_pilot()
    jobs = queued_jobs(output_task, n)

    with django_assert_max_num_queries(14):
        response = starts(
            client, pilot, [entry(j) for j in jobs], HTTP_IDEMPOTENCY_KEY=f"starts-{n}"
        )
    assert response.status_code == 200
    results = response.json()["results"]
    assert all(r["outcome"] == "started" for r in results)
    events = [final_report(r["job_uuid"], r["job"]) for r in results]
    with django_assert_max_num_queries(22):
        answer = client.post(
            f"/api/v1/pilots/{pilot.pk}/events/",
            {"events": events},
            format="json",
            HTTP_IDEMPOTENCY_KEY=f"events-{n}",
        )
    assert answer.status_code == 200
    assert {r["outcome"] for r in answer.json()["results"]} == {"applied"}
    assert Job.objects.filter(task=output_task, state=JobState.FINISHED).count() == n
    assert File.objects.filter(task=output_task, type=FileType.OUTPUT).count() == n


def test_the_statements_do_not_grow_with_the_batch(make_pilot, output_task):
    """Counted exactly: a batch of 1,000 costs what a batch of 10 costs."""
    pilot, client = make_pilot()

    def cost(n: int) -> tuple[int, int]:
        jobs = queued_jobs(output_task, n)
        with CaptureQueriesContext(connection) as start_ctx:
            results = starts(client, pilot, [entry(j) for j in jobs]).json()["results"]
        events = [final_report(r["job_uuid"], r["job"]) for r in results]
        with CaptureQueriesContext(connection) as report_ctx:
            client.post(f"/api/v1/pilots/{pilot.pk}/events/", {"events": events}, format="json")
        assert Job.objects.filter(pk__in=[j.pk for j in jobs], state="finished").count() == n
        return len(start_ctx.captured_queries), len(report_ctx.captured_queries)

    if connection.vendor != "postgresql":
        pytest.skip("SQLite splits big INSERTs")
    cost(10)  # the pilot is busy from now on: the same path for both measures
    assert cost(10) == cost(1000)
