"""Celery tasks of the pilots app: thin, they call the services."""

from __future__ import annotations

from celery import shared_task

from pilots.reaper import pilots_reap_lost


@shared_task(name="wms.reap_pilots", ignore_result=True)
def reap_pilots(beat: bool = False) -> int:
    """Silent pilots become lost; their running attempts are retried or failed."""
    return pilots_reap_lost(beat=beat).pilots
