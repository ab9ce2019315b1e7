"""Every write to pilots goes through here."""

from __future__ import annotations

import hashlib
import secrets

import structlog
from django.db import transaction
from django.utils import timezone

from pilots.models import Pilot, PilotState
from wms.choices import DeviceType
from wms.exceptions import NotFound, ValidationFailed
from wms.statemachine import TransitionResult, apply_transition

log = structlog.get_logger(__name__)

TOKEN_PREFIX = "wmsp_"  # noqa: S105 - a prefix, not a secret


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@transaction.atomic
def pilot_register(
    *,
    hostname: str,
    device_type: str = DeviceType.CPU,
    site: str = "",
    cores: int = 1,
    memory_mb: int = 0,
    gpus: int = 0,
    slots: int = 1,
    version: str = "",
) -> tuple[Pilot, str]:
    """Register a pilot; returns it with its token (shown once, only its hash is stored)."""
    if device_type not in DeviceType.values:
        raise ValidationFailed({"device_type": [f"Must be one of {DeviceType.values}."]})
    if not hostname:
        raise ValidationFailed({"hostname": ["This field is required."]})
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    pilot = Pilot.objects.create(
        hostname=hostname,
        site=site,
        device_type=device_type,
        cores=cores,
        memory_mb=memory_mb,
        gpus=gpus,
        slots=slots,
        version=version,
        started_at=timezone.now(),
        last_heartbeat=timezone.now(),
        token_hash=hash_token(token),
    )
    log.info("pilot_registered", pilot_id=pilot.pk, hostname=hostname, device_type=device_type)
    return pilot, token


@transaction.atomic
def pilot_revoke_token(*, pilot_id: int) -> None:
    """Revoke a pilot's token: its next call is refused (401)."""
    if not Pilot.objects.filter(pk=pilot_id).update(
        token_hash=None, token_revoked_at=timezone.now(), updated_at=timezone.now()
    ):
        raise NotFound(f"Pilot {pilot_id} does not exist.")
    log.info("pilot_token_revoked", pilot_id=pilot_id)


def pilot_transition(
    *, pilot_id: int, target: str, source: str, reason: str = ""
) -> TransitionResult:
    result = apply_transition(Pilot, pilot_id, target, source=source, reason=reason)
    if result.won:
        log.info(
            "pilot_state_changed",
            pilot_id=pilot_id,
            from_state=result.from_state,
            to_state=target,
            source=source,
        )
    return result


def pilot_terminate(*, pilot_id: int, source: str, reason: str = "") -> TransitionResult:
    return pilot_transition(
        pilot_id=pilot_id, target=PilotState.TERMINATED, source=source, reason=reason
    )
