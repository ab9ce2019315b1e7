"""Run-time switches of the background services, and the guard of their beat cycles."""

from __future__ import annotations

from datetime import timedelta

import structlog
from django.db import IntegrityError, models, transaction
from django.utils import timezone

from wms.exceptions import ValidationFailed
from wms.models import Switch

log = structlog.get_logger(__name__)

SERVICES = ("splitter", "executor", "reaper", "finalizer")


def _ensure(name: str) -> None:
    if name not in SERVICES:
        raise ValidationFailed({"name": [f"Must be one of {SERVICES}."]})
    if not Switch.objects.filter(pk=name).exists():
        try:
            with transaction.atomic():
                Switch.objects.create(name=name)
        except IntegrityError:
            pass  # created by a concurrent caller


def switch_enabled(name: str) -> bool:
    """Is the service switched on globally? (Unknown means on: nothing switched it off.)"""
    value = Switch.objects.filter(pk=name).values_list("enabled", flat=True).first()
    return True if value is None else value


@transaction.atomic
def switch_set(*, name: str, enabled: bool, by: str = "") -> Switch:
    """Switch a service on or off for every task; logged, effective at the next cycle."""
    _ensure(name)
    Switch.objects.filter(pk=name).update(enabled=enabled, updated_at=timezone.now(), updated_by=by)
    log.info("service_switched", service=name, enabled=enabled, by=by)
    return Switch.objects.get(pk=name)


def service_tick(name: str, *, min_interval: float) -> bool:
    """Claim this beat cycle of a service; False when switched off or already claimed.

    One conditional UPDATE (``... WHERE last_run_at < now - min_interval``) decides, so of two
    beats (or two workers given the same periodic task) only one runs the cycle. The run itself
    holds no lock: its work is claimed row by row with ``SELECT ... FOR UPDATE SKIP LOCKED``.
    """
    _ensure(name)
    now = timezone.now()
    won = (
        Switch.objects.filter(pk=name, enabled=True)
        .filter(
            models.Q(last_run_at__isnull=True)
            | models.Q(last_run_at__lt=now - timedelta(seconds=min_interval))
        )
        .update(last_run_at=now)
    )
    return bool(won)
