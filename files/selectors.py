"""Reads of datasets and files shared by several callers."""

from __future__ import annotations

import uuid

from django.db.models import QuerySet

from files.models import Dataset, File
from wms.exceptions import NotFound


def dataset_get(*, uid: uuid.UUID | str) -> Dataset:
    try:
        return Dataset.objects.get(uid=uid)
    except (Dataset.DoesNotExist, ValueError) as exc:
        raise NotFound(f"Dataset {uid} does not exist.") from exc


def files_of_job(*, job_id: int) -> QuerySet[File]:
    return File.objects.filter(job_id=job_id).order_by("type", "id")
