"""Who may write a dataset through the API (add files, close it).

Reading the catalogue (list, show, list a dataset's files) is open to every authenticated user,
and so is registering a dataset (the caller becomes its owner). Writing one is not:

- an **output** dataset (role ``output``) is written by the WMS only: the pilots' reports
  register outputs into it and the finalizer closes it once no job may still write into it
  (docs/lifecycle.md). Through the API nobody, staff included, adds files to it or closes it;
- an **input** dataset: its owner, staff, or a user with the model permission
  ``files.change_dataset`` (a producer's service account);
- an input dataset without owner (made by the system, mirrored, older than the owner column):
  staff or ``files.change_dataset`` only.

A refusal raises ``wms.exceptions.Forbidden``: 403 ``{"error": "permission_denied", "detail"}``.
The WMS's own writes (``files.services``, the DSM clients) do not pass through here.
"""

from __future__ import annotations

from typing import Any

from rest_framework import permissions

from files.models import Dataset, DatasetRole
from wms.exceptions import Forbidden

CHANGE_DATASET = "files.change_dataset"


def dataset_write_refusal(user: Any, dataset: Dataset) -> str | None:
    """Why ``user`` may not add files to ``dataset`` nor close it through the API, or ``None``."""
    if dataset.role == DatasetRole.OUTPUT:
        return (
            f"Output datasets are written by the WMS only: {dataset.name} receives the outputs "
            "of its task's jobs and is closed when the task ends and no job may still write "
            "into it."
        )
    if user.is_staff or user.has_perm(CHANGE_DATASET):
        return None
    if dataset.owner_id is None:
        return (
            f"Dataset {dataset.name} has no owner: only staff or a user with the permission "
            f"{CHANGE_DATASET} may add files to it or close it."
        )
    if dataset.owner_id != user.pk:
        return (
            f"Dataset {dataset.name} belongs to another user: only its owner, staff or a user "
            f"with the permission {CHANGE_DATASET} may add files to it or close it."
        )
    return None


class DatasetWritePermission(permissions.BasePermission):
    """Reads for everyone (authenticated); writes of an existing dataset by the rules above."""

    def has_object_permission(self, request: Any, view: Any, obj: Any) -> bool:
        if request.method in permissions.SAFE_METHODS:
            return True
        refusal = dataset_write_refusal(request.user, obj)
        if refusal is not None:
            raise Forbidden(refusal)
        return True
