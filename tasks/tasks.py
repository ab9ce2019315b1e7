"""Celery tasks of the tasks app: thin, they call the splitter."""

from __future__ import annotations

from celery import shared_task

from tasks.splitter import split_all, task_split
from wms.kicks import kick


@shared_task(name="wms.split", ignore_result=True, acks_late=True)
def split(task_id: int | None = None, beat: bool = False) -> int:
    """Split one task (a kick) or every splittable task (the beat)."""
    if task_id is not None:
        return task_split(task_id=task_id).jobs
    return sum(r.jobs for r in split_all(beat=beat))


def kick_split(*, task_id: int | None = None) -> None:
    kick("wms.split", task_id=task_id)
