"""Reads of tasks shared by the API, the admin and the services."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Count, QuerySet

from jobs.models import Job, JobState
from tasks.models import ACTIVE_TASK_STATES, Task, TaskInput
from wms.exceptions import NotFound


def task_get(*, task_id: int) -> Task:
    """One task by id; 404 (``NotFound``) if there is none."""
    try:
        return Task.objects.get(pk=task_id)
    except Task.DoesNotExist as exc:
        raise NotFound(f"Task {task_id} does not exist.") from exc


def task_job_counts(*, task_id: int) -> dict[str, int]:
    """Jobs of one task per state, every state present (0 where none)."""
    return tasks_job_counts(task_ids=[task_id]).get(task_id, {s: 0 for s in JobState.values})


def tasks_job_counts(*, task_ids: Iterable[int]) -> dict[int, dict[str, int]]:
    """Jobs per state for several tasks in ONE query (list pages, no N+1)."""
    ids = list(task_ids)
    out: dict[int, dict[str, int]] = {tid: {s: 0 for s in JobState.values} for tid in ids}
    rows = (
        Job.objects.filter(task_id__in=ids)
        .values_list("task_id", "state")
        .annotate(n=Count("id"))
        .order_by()
    )
    for task_id, state, n in rows:
        out[task_id][state] = n
    return out


def tasks_visible_to(*, user: AbstractBaseUser | AnonymousUser) -> QuerySet[Task]:
    """The tasks a user may see and act on: their own; staff see every task."""
    if getattr(user, "is_staff", False):
        return Task.objects.all()
    return Task.objects.filter(owner_id=user.pk)


def tasks_reading(*, dataset_uid: uuid.UUID | str) -> list[int]:
    """The active tasks that read this dataset and are not done with it (the splitter's
    business when it gains files or closes)."""
    return list(
        TaskInput.objects.filter(
            dataset_uid=dataset_uid,
            split_done_at__isnull=True,
            task__state__in=ACTIVE_TASK_STATES,
        )
        .values_list("task_id", flat=True)
        .distinct()
    )
