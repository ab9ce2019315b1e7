"""Reads of datasets and files shared by several callers."""

from __future__ import annotations

import uuid

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Q, QuerySet

from files.models import Dataset, File
from wms.exceptions import NotFound


def dataset_get(*, uid: uuid.UUID | str) -> Dataset:
    try:
        return Dataset.objects.get(uid=uid)
    except (Dataset.DoesNotExist, ValueError) as exc:
        raise NotFound(f"Dataset {uid} does not exist.") from exc


def files_of_job(*, job_id: int) -> QuerySet[File]:
    return File.objects.filter(job_id=job_id).order_by("type", "id")


def files_visible_to(*, user: AbstractBaseUser | AnonymousUser) -> QuerySet[File]:
    """The FILE_DAT rows a user may see: the files of their own tasks (through the row's task,
    or its job's task); staff see every file."""
    if getattr(user, "is_staff", False):
        return File.objects.all()
    return File.objects.filter(Q(task__owner_id=user.pk) | Q(job__task__owner_id=user.pk))
