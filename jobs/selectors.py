"""Reads of jobs shared by several callers."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import QuerySet

from jobs.models import Job


def jobs_visible_to(*, user: AbstractBaseUser | AnonymousUser) -> QuerySet[Job]:
    """The jobs a user may see and act on: those of their own tasks; staff see every job."""
    if getattr(user, "is_staff", False):
        return Job.objects.all()
    return Job.objects.filter(task__owner_id=user.pk)
