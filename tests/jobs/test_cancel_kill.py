"""Cancelling a running job reaches the process on the worker node: a kill_job command for the
attempt's pilot, published to its command queue (real RabbitMQ) and carried by its heartbeat."""

from __future__ import annotations

import pytest

from jobs.control import job_cancel, jobs_cancel
from jobs.models import AttemptState, JobAttempt, JobState
from pilots.models import CommandKind, PilotCommand
from tasks.lifecycle import task_cancel
from tests.factories import JobAttemptFactory, JobFactory, PilotFactory

pytestmark = pytest.mark.django_db


def test_cancel_of_a_running_job_kills_it_by_both_paths(
    make_pilot, bus_prefix, django_capture_on_commit_callbacks, read_commands
):
    pilot, client = make_pilot()
    job = JobFactory(state=JobState.QUEUED)
    assert client.post(f"/api/v1/jobs/{job.uuid}/start/", {"attempt": 0}).status_code == 200

    with django_capture_on_commit_callbacks(execute=True):
        job_cancel(job_id=job.pk, source="api", reason="wrong input")

    attempt = JobAttempt.objects.get(job=job)
    assert attempt.state == AttemptState.CANCELLED and attempt.kill_requested_at is not None
    command = PilotCommand.objects.get(pilot=pilot)
    assert (command.command, command.job_id, command.attempt) == ("kill_job", job.pk, 0)
    assert command.published_at is not None
    # the bus path: the pilot's own queue holds the command
    (message,) = read_commands(pilot.pk)
    assert message == {
        "command": "kill_job",
        "pilot_id": pilot.pk,
        "id": str(command.pk),
        "job_uuid": str(job.uuid),
        "attempt": 0,
        "reason": "wrong input",
        "v": 1,
        "kind": "command",
    }
    # the heartbeat path: the next heartbeat carries it, once
    reply = client.post(
        f"/api/v1/pilots/{pilot.pk}/heartbeat/", {"state": "busy"}, format="json"
    ).json()
    assert [(c["id"], c["command"], c["job_uuid"]) for c in reply["commands"]] == [
        (str(command.pk), "kill_job", str(job.uuid))
    ]
    again = client.post(f"/api/v1/pilots/{pilot.pk}/heartbeat/", {"state": "busy"}, format="json")
    assert again.json()["commands"] == []
    # the pilot's final report acknowledges the kill
    report = client.post(
        f"/api/v1/jobs/{job.uuid}/report/",
        {"attempt": 0, "state": "failed", "exit_code": -15, "error_code": "killed"},
        format="json",
    )
    assert report.json() == {"job_state": "cancelled", "outcome": "applied"}
    attempt.refresh_from_db()
    assert attempt.kill_acked_at is not None and attempt.kill_acked_at >= attempt.kill_requested_at


def test_bulk_cancel_sends_one_kill_per_running_attempt(
    bus_prefix, django_capture_on_commit_callbacks, read_commands
):
    pilots = [PilotFactory(), PilotFactory()]
    running = [JobFactory(state=JobState.RUNNING) for _ in range(3)]
    attempts = [
        JobAttemptFactory(job=j, pilot=pilots[i % 2], number=0) for i, j in enumerate(running)
    ]
    queued = JobFactory(state=JobState.QUEUED)

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        assert jobs_cancel(job_ids=[j.pk for j in [*running, queued]], source="api") == 4

    assert len(callbacks) == 1  # one batch published after commit
    commands = PilotCommand.objects.order_by("job_id")
    assert [(c.pilot_id, c.job_id, c.command) for c in commands] == [
        (a.pilot_id, a.job_id, CommandKind.KILL_JOB) for a in attempts
    ]
    assert all(c.published_at for c in commands)
    assert {m["job_uuid"] for m in read_commands(pilots[0].pk)} == {
        str(running[0].uuid),
        str(running[2].uuid),
    }
    assert [m["job_uuid"] for m in read_commands(pilots[1].pk)] == [str(running[1].uuid)]


def test_task_cancel_kills_its_running_jobs():
    pilot = PilotFactory()
    job = JobFactory(state=JobState.RUNNING)
    JobAttemptFactory(job=job, pilot=pilot)
    task_cancel(task_id=job.task_id, source="api")
    assert PilotCommand.objects.get(pilot=pilot).job_id == job.pk


def test_cancel_of_a_job_not_running_sends_nothing():
    job_cancel(job_id=JobFactory(state=JobState.QUEUED).pk, source="api")
    assert not PilotCommand.objects.exists()
