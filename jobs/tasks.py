"""Celery tasks of the jobs app: thin, they call the executor."""

from __future__ import annotations

from celery import shared_task

from jobs.executor import dispatch as run_dispatch
from jobs.executor import republish_stale


@shared_task(name="wms.dispatch", ignore_result=True)
def dispatch(beat: bool = False) -> int:
    return run_dispatch(beat=beat).total


@shared_task(name="wms.reconcile_queued", ignore_result=True)
def reconcile_queued() -> int:
    return republish_stale()
