"""The end of a task (docs/lifecycle.md): tasks.finalizer.task_finalize and its beat."""

from __future__ import annotations

import pytest

from files.dsm import get_dsm
from files.models import Dataset, DatasetState, FileStatus, FileType
from files.services import dataset_add_files, dataset_close, dataset_register
from jobs.models import AttemptState, Job, JobAttempt, JobState
from pilots.models import PilotState
from tasks.create import task_create
from tasks.finalizer import task_finalize, tasks_finalize_all
from tasks.lifecycle import task_cancel
from tasks.models import Task, TaskState
from tasks.splitter import task_split
from tasks.tasks import finalize_tasks
from tests.factories import FileFactory
from wms.switches import switch_set

pytestmark = pytest.mark.django_db


def _task(user, n_files=4, *, close=True, split=True, **kwargs) -> Task:
    ds = dataset_register(name=f"in.{user.pk}.{n_files}.{Dataset.objects.count()}")
    dataset_add_files(
        dataset=ds, files=[{"name": f"f{i}.root", "size": 10} for i in range(n_files)]
    )
    if close:
        dataset_close(dataset=ds, source="test")
    task = task_create(owner=user, executable="wms-payload-map", data_in_uid=ds.uid, **kwargs)
    if split:
        task_split(task_id=task.pk)
    task.refresh_from_db()
    return task


def _set(task: Task, *states: str) -> None:
    """Put the task's jobs (in id order) in these states."""
    ids = list(Job.objects.filter(task=task).order_by("id").values_list("id", flat=True))
    assert len(ids) == len(states)
    for pk, state in zip(ids, states, strict=True):
        Job.objects.filter(pk=pk).update(state=state)


def _out_state(task: Task) -> str:
    task.refresh_from_db()
    assert task.data_out_uid is not None  # task_create registers it
    return Dataset.objects.get(uid=task.data_out_uid).state


def test_all_jobs_finished_finishes_the_task_and_closes_its_output(user):
    task = _task(user, 3)
    assert task.state == TaskState.RUNNING and Job.objects.filter(task=task).count() == 3
    with get_dsm() as dsm:
        dsm.register_files(
            task.data_out_uid, [{"name": "o0.root", "size": 100}, {"name": "o1.root", "size": 50}]
        )
    _set(task, *[JobState.FINISHED] * 3)

    result = task_finalize(task_id=task.pk)

    assert result.state == TaskState.FINISHED and result.output_closed
    task.refresh_from_db()
    assert task.state == TaskState.FINISHED
    assert (task.jobs_finished, task.jobs_failed, task.jobs_cancelled) == (3, 0, 0)
    assert task.output_closed_at is not None
    tr = task.transitions.get(to_state=TaskState.FINISHED)
    assert tr.source == "system" and "3 finished, 0 failed, 0 cancelled" in tr.reason
    out = Dataset.objects.get(uid=task.data_out_uid)
    assert out.state == DatasetState.CLOSED
    assert (out.file_count, out.total_size) == (2, 150)
    assert "2 files, 150 bytes" in out.transitions.get().reason
    # twice is harmless
    again = task_finalize(task_id=task.pk)
    assert again.state == "" and not again.output_closed
    assert task.transitions.count() == 2  # defined -> running -> finished


def test_one_failed_job_fails_a_task_with_the_default_threshold(user):
    task = _task(user, 4)
    _set(task, JobState.FINISHED, JobState.FINISHED, JobState.FINISHED, JobState.FAILED)
    assert task_finalize(task_id=task.pk).state == TaskState.FAILED
    task.refresh_from_db()
    assert (task.jobs_finished, task.jobs_failed) == (3, 1)
    assert "1 failed" in task.transitions.get(to_state="failed").reason
    assert _out_state(task) == DatasetState.CLOSED


def test_failures_under_the_threshold_finish_and_over_it_fail(user):
    under = _task(user, 4, max_failed_fraction=0.25)
    _set(under, JobState.FINISHED, JobState.FINISHED, JobState.FINISHED, JobState.FAILED)
    assert task_finalize(task_id=under.pk).state == TaskState.FINISHED
    under.refresh_from_db()
    assert (under.jobs_finished, under.jobs_failed) == (3, 1)

    over = _task(user, 4, max_failed_fraction=0.25)
    _set(over, JobState.FINISHED, JobState.FINISHED, JobState.FAILED, JobState.FAILED)
    assert task_finalize(task_id=over.pk).state == TaskState.FAILED


def test_not_while_the_input_dataset_is_open(user):
    task = _task(user, 2, close=False)
    _set(task, JobState.FINISHED, JobState.FINISHED)
    result = task_finalize(task_id=task.pk)
    assert result.state == "" and result.waiting == "input dataset open"
    assert _out_state(task) == DatasetState.OPEN
    task.refresh_from_db()
    assert task.state == TaskState.RUNNING
    dataset_close(dataset=Dataset.objects.get(uid=task.data_in_uid), source="test")
    assert task_finalize(task_id=task.pk).state == TaskState.FINISHED


@pytest.mark.parametrize("state", [JobState.RUNNING, JobState.QUEUED, JobState.DEFINED, "held"])
def test_not_while_a_job_is_not_final(user, state):
    task = _task(user, 2)
    _set(task, JobState.FINISHED, state)
    assert task_finalize(task_id=task.pk).waiting == "jobs not final"
    task.refresh_from_db()
    assert task.state == TaskState.RUNNING and task.output_closed_at is None
    assert _out_state(task) == DatasetState.OPEN


def test_not_before_every_input_file_has_a_job(user):
    # files_per_job 2 over 3 files of an open dataset: the third waits; then the dataset is
    # closed, but the splitter has not run again yet.
    task = _task(user, 3, close=False, files_per_job=2)
    _set(task, JobState.FINISHED)
    dataset_close(dataset=Dataset.objects.get(uid=task.data_in_uid), source="test")
    result = task_finalize(task_id=task.pk)
    assert result.waiting == "input files without a job"
    task.refresh_from_db()
    assert task.state == TaskState.RUNNING
    task_split(task_id=task.pk)
    Job.objects.filter(task=task).update(state=JobState.FINISHED)
    assert task_finalize(task_id=task.pk).state == TaskState.FINISHED


def test_a_task_not_yet_split_does_not_end(user):
    task = _task(user, 2, split=False)
    Task.objects.filter(pk=task.pk).update(state=TaskState.RUNNING)
    assert task_finalize(task_id=task.pk).waiting == "input files without a job"


def test_cancelled_task_output_closes_after_its_killed_attempts_end(user, make_pilot):
    task = _task(user, 2)
    done, running = Job.objects.filter(task=task).order_by("id")
    Job.objects.filter(pk=done.pk).update(state=JobState.FINISHED)
    out = FileFactory(job=done, task=task, type=FileType.OUTPUT, status=FileStatus.READY)
    log_file = FileFactory(job=done, task=task, type=FileType.LOG, status=FileStatus.READY)
    inp = done.files.get(type=FileType.INPUT)
    _pilot, client = make_pilot()
    Job.objects.filter(pk=running.pk).update(state=JobState.QUEUED)
    assert client.post(f"/api/v1/jobs/{running.uuid}/start/", {"attempt": 0}).status_code == 200

    task_cancel(task_id=task.pk, source="api", reason="stop")
    task_cancel(task_id=task.pk, source="api", reason="stop")  # idempotent
    assert task.transitions.filter(to_state="cancelled").count() == 1

    # the killed attempt has not reported: the output dataset stays open
    result = task_finalize(task_id=task.pk)
    assert result.waiting == "killed attempts not ended" and not result.output_closed
    assert _out_state(task) == DatasetState.OPEN
    assert tasks_finalize_all() and _out_state(task) == DatasetState.OPEN

    report = client.post(
        f"/api/v1/jobs/{running.uuid}/report/",
        {"attempt": 0, "state": "failed", "exit_code": -15, "error_code": "killed"},
        format="json",
    )
    assert report.json()["outcome"] == "applied"

    (result,) = [r for r in tasks_finalize_all() if r.task_id == task.pk]
    assert result.output_closed
    assert _out_state(task) == DatasetState.CLOSED
    out.refresh_from_db()
    log_file.refresh_from_db()
    inp.refresh_from_db()
    assert out.status == log_file.status == FileStatus.PARTIAL
    assert inp.status == FileStatus.READY
    task.refresh_from_db()
    assert task.state == TaskState.CANCELLED
    assert (task.jobs_finished, task.jobs_cancelled) == (1, 1)


def test_a_lost_pilot_ends_the_wait_for_a_killed_attempt(user, make_pilot):
    task = _task(user, 1)
    (job,) = Job.objects.filter(task=task)
    pilot, client = make_pilot()
    Job.objects.filter(pk=job.pk).update(state=JobState.QUEUED)
    assert client.post(f"/api/v1/jobs/{job.uuid}/start/", {"attempt": 0}).status_code == 200
    task_cancel(task_id=task.pk, source="api")
    assert JobAttempt.objects.get(job=job).state == AttemptState.CANCELLED
    assert task_finalize(task_id=task.pk).waiting == "killed attempts not ended"
    type(pilot).objects.filter(pk=pilot.pk).update(state=PilotState.LOST)
    assert task_finalize(task_id=task.pk).output_closed


def test_cancelling_a_finished_task_is_409(user, api_client):
    task = _task(user, 1)
    _set(task, JobState.FINISHED)
    task_finalize(task_id=task.pk)
    resp = api_client.post(f"/api/v1/tasks/{task.pk}/cancel/")
    assert resp.status_code == 409
    assert resp.json()["error"] == "invalid_transition"
    assert "finished" in resp.json()["detail"]


def test_a_cancelled_task_is_not_split_any_more(user):
    task = _task(user, 1, close=False)
    task_cancel(task_id=task.pk, source="api")
    dataset_add_files(
        dataset=Dataset.objects.get(uid=task.data_in_uid), files=[{"name": "late.root"}]
    )
    assert task_split(task_id=task.pk).jobs == 0
    assert Job.objects.filter(task=task).count() == 1


def test_beat_is_guarded_by_the_finalizer_switch(user):
    task = _task(user, 1)
    _set(task, JobState.FINISHED)
    switch_set(name="finalizer", enabled=False)
    assert finalize_tasks(beat=True) == 0 and finalize_tasks(task_id=task.pk) == 0
    task.refresh_from_db()
    assert task.state == TaskState.RUNNING
    switch_set(name="finalizer", enabled=True)
    assert finalize_tasks(beat=True) == 1
    assert finalize_tasks(beat=True) == 0  # the cycle was just claimed
    task.refresh_from_db()
    assert task.state == TaskState.FINISHED


def test_a_finished_report_kicks_the_finalizer(
    user, make_pilot, settings, monkeypatch, django_capture_on_commit_callbacks
):
    from config.celery import app

    sent = []
    monkeypatch.setattr(
        app, "send_task", lambda name, kwargs, **_options: sent.append((name, kwargs))
    )
    settings.WMS_KICKS_ENABLED = True
    task = _task(user, 1)
    (job,) = Job.objects.filter(task=task)
    Job.objects.filter(pk=job.pk).update(state=JobState.QUEUED)
    _pilot, client = make_pilot()
    assert client.post(f"/api/v1/jobs/{job.uuid}/start/", {"attempt": 0}).status_code == 200
    sent.clear()
    with django_capture_on_commit_callbacks(execute=True):
        client.post(
            f"/api/v1/jobs/{job.uuid}/report/",
            {"attempt": 0, "state": "finished", "exit_code": 0},
            format="json",
        )
    assert ("wms.finalize_tasks", {"task_id": task.pk}) in sent


def test_max_failed_fraction_is_validated_and_patchable(api_client, user):
    ds = dataset_register(name="frac.in")
    body = {"executable": "x", "data_in_uid": str(ds.uid), "max_failed_fraction": 1.5}
    resp = api_client.post("/api/v1/tasks/", body, format="json")
    assert resp.status_code == 400 and "max_failed_fraction" in resp.json()["detail"]
    body["max_failed_fraction"] = 0.2
    resp = api_client.post("/api/v1/tasks/", body, format="json")
    assert resp.status_code == 201 and resp.json()["max_failed_fraction"] == 0.2
    task_id = resp.json()["id"]
    resp = api_client.patch(
        f"/api/v1/tasks/{task_id}/", {"max_failed_fraction": -0.1}, format="json"
    )
    assert resp.status_code == 400
    resp = api_client.patch(
        f"/api/v1/tasks/{task_id}/", {"max_failed_fraction": 0.5}, format="json"
    )
    assert resp.status_code == 200 and Task.objects.get(pk=task_id).max_failed_fraction == 0.5
