"""Issue 5's cancellation end to end: real web app, worker with beat and a pilot agent on
Postgres + RabbitMQ.

A task of long jobs runs on one CPU pilot with two slots: two jobs run, the others wait
(queued or defined). Its owner cancels it through the REST API; then no payload process of the
task is left (checked by pid), every job is ``cancelled``, the running attempts carry the kill's
request and acknowledgement and their logs are registered, jobs that were waiting never start,
and the pilot is idle and runs the next task. A second cancel is a no-op (200, no new
transition); cancelling a finished task is a 409 ``invalid_transition``.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import requests

from devtools.demo import demo_inputs_write
from files.dsm import get_dsm
from files.models import DatasetEntry, File, FileType
from jobs.models import AttemptState, Job, JobAttempt, JobState, JobTransition
from pilots.models import CommandKind, Pilot, PilotCommand, PilotState
from tasks.create import task_create
from tasks.models import Task, TaskState, TaskTransition
from tests.e2e.conftest import wait_until
from tests.factories import UserFactory, api_token

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

N_FILES = 8
SLOTS = 2
FINAL = (JobState.FINISHED, JobState.FAILED, JobState.CANCELLED)


def _dataset(tmp_path: Path, name: str, n: int, *, seed: int = 1000):
    entries, _seeds = demo_inputs_write(
        directory=tmp_path / name, files=n, events=200, base_seed=seed
    )
    with get_dsm() as dsm:
        info = dsm.register_dataset(name, role="input")
        dsm.register_files(info.uid, entries)
        dsm.close_dataset(info.uid, source="command")
    return info.uid


def _task(owner, uid, tmp_path, label, args):
    out = (tmp_path / "outputs" / owner.username / label).resolve().as_uri() + "/"
    return task_create(
        owner=owner,
        name=label,
        executable="wms-payload-map",
        args=args,
        data_in_uid=uid,
        data_out_url=out,
        storage_url=out,
        max_retries=0,
    )


def _payloads(job_uuids: set[str]) -> dict[str, list[psutil.Process]]:
    """The live processes whose environment names one of these jobs (the pilot sets
    ``WMS_JOB_UUID`` for everything a job starts)."""
    found: dict[str, list[psutil.Process]] = {}
    for proc in psutil.process_iter(["pid"]):
        try:
            uid = proc.environ().get("WMS_JOB_UUID")
            if uid in job_uuids and proc.status() != psutil.STATUS_ZOMBIE:
                found.setdefault(uid, []).append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _alive(pid: int) -> bool:
    if not psutil.pid_exists(pid):
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _output_closed(task: Task) -> bool:
    assert task.data_out_uid is not None  # task_create registered the output dataset
    with get_dsm() as dsm:
        return not dsm.get_dataset(task.data_out_uid).is_open


def test_cancelling_a_task_kills_its_processes_and_frees_the_pilot(make_stack, tmp_path):
    owner = UserFactory()
    _token, key = api_token(owner)
    uid = _dataset(tmp_path, "e2e.cancel", N_FILES)
    stack, out = make_stack(cpu=1, gpu=0, slots=SLOTS, env={"WMS_FINALIZE_EVERY": "2"})
    api = requests.Session()
    api.headers["Authorization"] = f"Token {key}"
    task = _task(owner, uid, tmp_path, "cancel", "--events 200 --sleep 30")

    # --- two jobs running, the others waiting --------------------------------------------------
    def both_running():
        attempts = list(JobAttempt.objects.filter(job__task=task, state=AttemptState.RUNNING))
        return attempts if len(attempts) == SLOTS else None

    running = wait_until(both_running, timeout=120, what=f"{SLOTS} attempts to run", out=out)
    running_jobs = {str(a.job.uuid): a for a in running}

    def their_payloads():
        found = _payloads(set(running_jobs))
        return found if set(found) == set(running_jobs) else None

    payloads = wait_until(their_payloads, timeout=30, what="both jobs' payloads", out=out)
    pids = sorted(p.pid for procs in payloads.values() for p in procs)
    pilot = Pilot.objects.get(pk=running[0].pilot_id)
    assert {a.pilot_id for a in running} == {pilot.pk}
    assert Job.objects.filter(task=task).count() == N_FILES
    waiting = set(
        Job.objects.filter(task=task, state__in=[JobState.DEFINED, JobState.QUEUED]).values_list(
            "pk", flat=True
        )
    )
    assert len(waiting) == N_FILES - SLOTS
    assert Job.objects.filter(task=task, state=JobState.QUEUED).exists()  # some wait in the queue

    # --- the owner cancels the task ---------------------------------------------------------
    url = f"{stack.server_url}/api/v1/tasks/{task.pk}/cancel/"
    resp = api.post(url, json={"reason": "e2e cancel"}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == TaskState.CANCELLED

    # at once, in the database: every job cancelled, the running attempts' kills requested
    assert set(Job.objects.filter(task=task).values_list("state", flat=True)) == {
        JobState.CANCELLED
    }
    for att in JobAttempt.objects.filter(pk__in=[a.pk for a in running]):
        assert att.state == AttemptState.CANCELLED
        assert att.kill_requested_at is not None
    kills = PilotCommand.objects.filter(pilot=pilot, command=CommandKind.KILL_JOB)
    assert sorted(kills.values_list("job_id", flat=True)) == sorted(a.job_id for a in running)

    # no process of the task is left on the pilot (by pid, and by environment)
    wait_until(
        lambda: not any(_alive(pid) for pid in pids),
        timeout=15,
        what=f"the payload processes {pids} to end",
        out=out,
    )
    all_uuids = {str(u) for u in Job.objects.filter(task=task).values_list("uuid", flat=True)}
    assert _payloads(all_uuids) == {}
    # the kills came by the pilot's command queue (the heartbeat answer is the fallback)
    received = [
        line
        for line in out.text().splitlines()
        if "command_received" in line and "kill_job" in line
    ]
    for job_uuid in running_jobs:
        assert any(job_uuid in line and "source=bus" in line for line in received), received

    # the pilot acknowledged the kills and kept the logs
    wait_until(
        lambda: (
            not JobAttempt.objects.filter(
                pk__in=[a.pk for a in running], kill_acked_at__isnull=True
            ).exists()
        ),
        timeout=30,
        what="the pilot's reports of the killed attempts",
        out=out,
    )
    for att in JobAttempt.objects.filter(pk__in=[a.pk for a in running]).select_related("job"):
        assert att.state == AttemptState.CANCELLED
        assert att.kill_acked_at >= att.kill_requested_at
        assert att.ended_at is not None
        assert att.job.state == JobState.CANCELLED
        logs = list(att.job.files.filter(type=FileType.LOG))
        assert len(logs) == 1, logs
        log_file = logs[0]
        assert log_file.size > 0
        assert f"/{att.number}/" in log_file.url
        assert DatasetEntry.objects.filter(
            dataset__uid=task.data_out_uid, url=log_file.url
        ).exists()
        # a killed attempt's outputs never reach the dataset
        assert not att.job.files.filter(type=FileType.OUTPUT).exists()

    # the jobs that were waiting never started: their queued messages were dropped (409)
    assert not JobAttempt.objects.filter(job_id__in=waiting).exists()
    assert JobAttempt.objects.filter(job__task=task).count() == SLOTS
    assert not File.objects.filter(job_id__in=waiting).exclude(type=FileType.INPUT).exists()

    # the pilot is idle again, and runs other work
    wait_until(
        lambda: Pilot.objects.filter(pk=pilot.pk, state=PilotState.IDLE).exists(),
        timeout=30,
        what="the pilot to be idle",
        out=out,
    )
    uid2 = _dataset(tmp_path, "e2e.after", 1, seed=7000)
    after = _task(owner, uid2, tmp_path, "after", "--events 200")
    job2 = wait_until(
        lambda: Job.objects.filter(task=after, state__in=FINAL).first(),
        timeout=120,
        what="the next task's job to end",
        out=out,
    )
    assert job2.state == JobState.FINISHED
    assert job2.pilot_id == pilot.pk
    pilot.refresh_from_db()
    assert pilot.state in (PilotState.IDLE, PilotState.BUSY)

    # the output dataset is closed by the finalizer
    wait_until(lambda: _output_closed(task), timeout=30, what="the output dataset closed", out=out)

    # --- a second cancel is a no-op ----------------------------------------------------------
    counts = (
        TaskTransition.objects.filter(subject=task).count(),
        JobTransition.objects.filter(subject__task=task).count(),
        PilotCommand.objects.count(),
    )
    resp = api.post(url, json={}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == TaskState.CANCELLED
    assert counts == (
        TaskTransition.objects.filter(subject=task).count(),
        JobTransition.objects.filter(subject__task=task).count(),
        PilotCommand.objects.count(),
    )

    # --- cancelling a finished task is a 409 -------------------------------------------------
    wait_until(
        lambda: Task.objects.filter(pk=after.pk, state=TaskState.FINISHED).exists(),
        timeout=30,
        what="the next task to finish",
        out=out,
    )
    resp = api.post(f"{stack.server_url}/api/v1/tasks/{after.pk}/cancel/", json={}, timeout=30)
    assert resp.status_code == 409, resp.text
    body = resp.json()
    assert body["error"] == "invalid_transition"
    assert body["detail"]
    assert Task.objects.get(pk=after.pk).state == TaskState.FINISHED
    assert Job.objects.get(pk=job2.pk).state == JobState.FINISHED
