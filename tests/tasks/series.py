"""Helpers of the tests of a task over a series of input datasets (test_inputs, test_series,
test_inputs_api): datasets of the local DSM, the series and jobs of a task."""

from __future__ import annotations

import uuid
from collections import defaultdict

from django.urls import reverse

from files.models import Dataset, DatasetEntry, DatasetRole, File, FileType
from files.services import dataset_add_files, dataset_close, dataset_register
from jobs.models import Job, JobState
from tasks.create import task_create
from tasks.models import Task, TaskInput

URL = "/api/v1/tasks/"
ADD = reverse("admin:tasks_task_add")
NO_MATCH = "No input dataset (not already an input) matches this pattern."
ALREADY = "This dataset is in the task's inputs already."
UNKNOWN = "No dataset with this uid."
ONE_WAY = "Give only one of data_in_uid, data_in_uids and data_in_selection."


def input_dataset(name: str, n: int = 0, *, close: bool = False) -> Dataset:
    """An input dataset of the local DSM with ``n`` files (``<name>.f000`` ...)."""
    ds = dataset_register(name=name)
    if n:
        add_files(ds, *(f"{name}.f{i:03d}" for i in range(n)))
    if close:
        dataset_close(dataset=ds, source="test")
    return ds


def add_files(ds: Dataset, *names: str) -> None:
    dataset_add_files(dataset=ds, files=[{"name": n, "size": 7} for n in names])


def close_dataset(ds: Dataset) -> None:
    dataset_close(dataset=ds, source="test")


def series_of(task) -> list[uuid.UUID]:
    rows = TaskInput.objects.filter(task_id=task.pk).order_by("position")
    positions = [r.position for r in rows]
    assert positions == list(range(len(positions)))  # no gaps, from 0
    return [r.dataset_uid for r in rows]


def input_row(task, ds) -> TaskInput:
    return TaskInput.objects.get(task_id=task.pk, dataset_uid=ds.uid)


def jobs_of(task) -> list[tuple[int, str, int]]:
    """Every job of the task in id order: (job id, THE dataset of its inputs, n inputs)."""
    by_job: dict[int, list[str]] = defaultdict(list)
    for job_id, name in File.objects.filter(task_id=task.pk, type=FileType.INPUT).values_list(
        "job_id", "dataset__name"
    ):
        by_job[job_id].append(name)
    out = []
    for job_id in sorted(by_job):
        names = set(by_job[job_id])
        assert len(names) == 1, f"job {job_id} mixes datasets {names}"
        out.append((job_id, names.pop(), len(by_job[job_id])))
    assert len(out) == Job.objects.filter(task_id=task.pk).count()  # no job without inputs
    return out


def each_file_once(task, *datasets: Dataset) -> None:
    """Every file of these datasets has exactly one input FILE_DAT row (one job) in the task."""
    for ds in datasets:
        entries = sorted(DatasetEntry.objects.filter(dataset=ds).values_list("id", flat=True))
        used = sorted(
            File.objects.filter(
                task_id=task.pk, type=FileType.INPUT, entry__dataset=ds
            ).values_list("entry_id", flat=True)
        )
        assert used == entries, ds.name


def finish_jobs(task) -> None:
    Job.objects.filter(task_id=task.pk).update(state=JobState.FINISHED)


def nothing_written() -> None:
    assert not Task.objects.exists()
    assert not TaskInput.objects.exists()
    assert not Dataset.objects.filter(role=DatasetRole.OUTPUT).exists()


def create_task(user, **kwargs) -> Task:
    return task_create(owner=user, executable="wms-payload-map", **kwargs)
