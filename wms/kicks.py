"""On-demand kicks of the periodic services, sent after the current transaction commits.

A kick is an optimisation (work starts now instead of at the next beat); if the broker cannot
take it, the beat does the work a few seconds later, so a failed kick is logged, never raised.
"""

from __future__ import annotations

from typing import Any

import structlog
from django.db import transaction

log = structlog.get_logger(__name__)


def kick(task_name: str, **kwargs: Any) -> None:
    from django.conf import settings

    if not getattr(settings, "WMS_KICKS_ENABLED", True):
        return

    def send() -> None:
        from config.celery import app

        try:
            # one attempt (broker_connection_timeout): a kick is not worth a slow request
            app.send_task(task_name, kwargs=kwargs, retry=False)
        except Exception as exc:  # broker down: the beat will catch up
            log.warning("kick_failed", celery_task=task_name, error=str(exc))

    transaction.on_commit(send)
