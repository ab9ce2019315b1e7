"""Reads of jobs shared by several callers."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import QuerySet

from jobs.models import AttemptState, Job, JobAttempt
from wms.choices import GONE_PILOT_STATES


def jobs_visible_to(*, user: AbstractBaseUser | AnonymousUser) -> QuerySet[Job]:
    """The jobs a user may see and act on: those of their own tasks; staff see every job."""
    if getattr(user, "is_staff", False):
        return Job.objects.all()
    return Job.objects.filter(task__owner_id=user.pk)


def task_kills_pending(*, task_id: int) -> bool:
    """Is a killed attempt of this task possibly still running (and writing outputs)?

    A cancelled attempt stays "may run" until its pilot's final report acknowledges the kill
    (``kill_acked_at``) or its pilot is gone (terminated, or lost: the reaper's call).
    """
    return (
        JobAttempt.objects.filter(
            job__task_id=task_id,
            state=AttemptState.CANCELLED,
            kill_requested_at__isnull=False,
            kill_acked_at__isnull=True,
            pilot__isnull=False,
        )
        .exclude(pilot__state__in=GONE_PILOT_STATES)
        .exists()
    )
