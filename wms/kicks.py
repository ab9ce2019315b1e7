"""On-demand kicks of the periodic services, sent after the current transaction commits.

The task is named, never imported, and sent through Celery's current app (the project's,
``config.celery``, made current when ``config`` is imported): the shared core depends on no app
and not on ``config``.

A kick is an optimisation (work starts now instead of at the next beat); if the broker cannot
take it, the beat does the work a few seconds later, so a failed kick is logged, never raised.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import current_app
from django.db import transaction

log = structlog.get_logger(__name__)


# The periodic services a kick can wake, by their Celery task names (registered by the apps:
# tasks.tasks, jobs.tasks).
SPLIT = "wms.split"
DISPATCH = "wms.dispatch"
FINALIZE = "wms.finalize_tasks"
SPLIT_DATASET = "wms.split_dataset"


def kick_split(*, task_id: int | None = None) -> None:
    """Split now (one task, or every task that may split)."""
    kick(SPLIT, task_id=task_id)


def kick_split_dataset(*, dataset_uid: str) -> None:
    """A dataset gained files or was closed: split now the tasks that read it (the tasks app
    finds them; the files app does not know tasks)."""
    kick(SPLIT_DATASET, dataset_uid=dataset_uid)


def kick_dispatch() -> None:
    """Dispatch defined jobs now."""
    kick(DISPATCH)


def kick_finalize(*, task_id: int | None = None) -> None:
    """Look now at whether a task (or every running task) has ended."""
    if task_id is None:
        kick(FINALIZE)
    else:
        kick(FINALIZE, task_id=task_id)


def kick(task_name: str, **kwargs: Any) -> None:
    from django.conf import settings

    if not getattr(settings, "WMS_KICKS_ENABLED", True):
        return

    def send() -> None:
        try:
            # one attempt (broker_connection_timeout): a kick is not worth a slow request
            current_app.send_task(task_name, kwargs=kwargs, retry=False)
        except Exception as exc:  # broker down: the beat will catch up
            log.warning("kick_failed", celery_task=task_name, error=str(exc))

    transaction.on_commit(send)
