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


def kick(task_name: str, **kwargs: Any) -> None:
    from django.conf import settings

    if not getattr(settings, "WMS_KICKS_ENABLED", True):
        return

    def send() -> None:
        try:
            current_app.send_task(task_name, kwargs=kwargs)
        except Exception as exc:  # broker down: the beat will catch up
            log.warning("kick_failed", celery_task=task_name, error=str(exc))

    transaction.on_commit(send)
