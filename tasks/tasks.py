"""Celery tasks of the tasks app: thin, they call the splitter."""

from __future__ import annotations

from celery import shared_task

from tasks.finalizer import task_finalize, tasks_finalize_all
from tasks.selectors import tasks_reading
from tasks.splitter import split_all, task_split
from wms.kicks import kick_split


@shared_task(name="wms.split", ignore_result=True, acks_late=True)
def split(task_id: int | None = None, beat: bool = False) -> int:
    """Split one task (a kick) or every splittable task (the beat)."""
    if task_id is not None:
        return task_split(task_id=task_id).jobs
    return sum(r.jobs for r in split_all(beat=beat))


@shared_task(name="wms.split_dataset", ignore_result=True)
def split_dataset(dataset_uid: str) -> int:
    """A dataset gained files or was closed (kicked by ``files.services``): kick the splitter
    for each task that reads it and is not done with it. Returns how many were kicked."""
    task_ids = tasks_reading(dataset_uid=dataset_uid)
    for task_id in task_ids:
        kick_split(task_id=task_id)
    return len(task_ids)


@shared_task(name="wms.finalize_tasks", ignore_result=True, acks_late=True)
def finalize_tasks(task_id: int | None = None, beat: bool = False) -> int:
    """End one task whose work is done (a kick) or every such task (the beat); close the
    output datasets of ended tasks. Returns how many tasks ended or had their output closed."""
    if task_id is not None:
        r = task_finalize(task_id=task_id)
        return int(bool(r.state or r.output_closed))
    return sum(1 for r in tasks_finalize_all(beat=beat) if r.state or r.output_closed)
