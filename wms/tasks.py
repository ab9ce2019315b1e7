"""Celery tasks of the shared core: thin, they call the services."""

from __future__ import annotations

from celery import shared_task

from wms.idempotency import idempotency_keys_purge


@shared_task(name="wms.purge_idempotency_keys", ignore_result=True)
def purge_idempotency_keys() -> int:
    """Forget the answers of idempotent calls older than ``WMS_IDEMPOTENCY_TTL``."""
    return idempotency_keys_purge()
