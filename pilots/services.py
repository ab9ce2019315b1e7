"""Every write to pilots and their commands goes through here.

The pilot protocol (docs/pilot-api.md): :func:`pilot_register`, :func:`pilot_heartbeat`,
:func:`pilot_terminate`; commands to pilots (:func:`pilot_command_create`,
:func:`pilot_commands_create`); and the reaper of silent pilots (:func:`pilots_reap_lost`).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from pilots.models import LIVE_PILOT_STATES, CommandKind, Pilot, PilotCommand, PilotState
from wms import bus
from wms.choices import DeviceType, TransitionSource
from wms.contract import Command
from wms.exceptions import BrokerError, NotFound, ValidationFailed
from wms.statemachine import TransitionResult, apply_transition, apply_transition_bulk
from wms.switches import service_tick, switch_enabled

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
    registered_by: str = "",
    token: str | None = None,
) -> tuple[Pilot, str]:
    """Register a pilot; returns it with its token (shown once, only its hash is stored).
    ``token``: the token to give it (``pilots.auth.registration_token``, for a registration
    with an idempotency key); a new random one by default."""
    if device_type not in DeviceType.values:
        raise ValidationFailed({"device_type": [f"Must be one of {DeviceType.values}."]})
    if not hostname:
        raise ValidationFailed({"hostname": ["This field is required."]})
    token = token or TOKEN_PREFIX + secrets.token_urlsafe(32)
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
    log.info(
        "pilot_registered",
        pilot_id=pilot.pk,
        hostname=hostname,
        site=site,
        device_type=device_type,
        by=registered_by,
    )
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


def pilot_source(pilot_id: int) -> str:
    """The transition source of a pilot's own request."""
    return f"pilot:{pilot_id}"


# --- commands -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandSpec:
    """One command to create: ``kill_job`` names the job (id and uuid) and the attempt."""

    pilot_id: int
    command: str
    job_id: int | None = None
    job_uuid: str = ""
    attempt: int | None = None
    reason: str = ""


def command_message(cmd: PilotCommand, job_uuid: str = "") -> Command:
    """The wire form (``wms.contract.Command``) of a command row."""
    return Command(
        command=cmd.command,
        pilot_id=cmd.pilot_id,
        id=str(cmd.pk),
        job_uuid=job_uuid,
        attempt=cmd.attempt,
        reason=cmd.reason,
    )


def _publish_after_commit(messages: list[Command]) -> None:
    """Publish to the pilots' command queues once the commands are committed.

    A broker failure is logged, not raised: the command stays undelivered in the database and
    the pilot's next heartbeat carries it.
    """
    if not messages:
        return

    def send() -> None:
        try:
            bus.publish_commands(messages)
        except BrokerError as exc:
            log.warning("command_publish_failed", commands=len(messages), detail=str(exc.detail))
            return
        except Exception:  # a bug must not turn a committed change into a 500
            log.exception("command_publish_failed", commands=len(messages))
            return
        PilotCommand.objects.filter(pk__in=[uuid.UUID(m.id) for m in messages]).update(
            published_at=timezone.now()
        )

    transaction.on_commit(send)


@transaction.atomic
def pilot_commands_create(*, commands: Sequence[CommandSpec]) -> list[PilotCommand]:
    """Create commands in bulk (one INSERT) and publish them after commit (one batch)."""
    if not commands:
        return []
    for spec in commands:
        if spec.command not in CommandKind.values:
            raise ValidationFailed({"command": [f"Must be one of {CommandKind.values}."]})
        if spec.command == CommandKind.KILL_JOB and (spec.job_id is None or not spec.job_uuid):
            raise ValidationFailed({"job": ["A kill_job command names the job."]})
    now = timezone.now()
    rows = PilotCommand.objects.bulk_create(
        [
            PilotCommand(
                pilot_id=spec.pilot_id,
                command=spec.command,
                job_id=spec.job_id,
                attempt=spec.attempt,
                reason=spec.reason[:1000],
                created_at=now,
            )
            for spec in commands
        ]
    )
    _publish_after_commit(
        [command_message(row, spec.job_uuid) for row, spec in zip(rows, commands, strict=True)]
    )
    log.info(
        "pilot_commands_created",
        count=len(rows),
        commands=sorted({spec.command for spec in commands}),
    )
    return rows


@transaction.atomic
def pilot_command_create(
    *,
    pilot_id: int,
    command: str,
    job_id: int | None = None,
    attempt: int | None = None,
    reason: str = "",
) -> PilotCommand:
    """One command to one pilot: the row, then (after commit) its command queue."""
    if not Pilot.objects.filter(pk=pilot_id).exists():
        raise NotFound(f"Pilot {pilot_id} does not exist.")
    job_uuid = ""
    if job_id is not None:
        from jobs.models import Job

        found = Job.objects.filter(pk=job_id).values_list("uuid", flat=True).first()
        if found is None:
            raise NotFound(f"Job {job_id} does not exist.")
        job_uuid = str(found)
    (row,) = pilot_commands_create(
        commands=[
            CommandSpec(
                pilot_id=pilot_id,
                command=command,
                job_id=job_id,
                job_uuid=job_uuid,
                attempt=attempt,
                reason=reason,
            )
        ]
    )
    return row


# --- heartbeat ----------------------------------------------------------------------------------

REPORTED_STATES = (PilotState.IDLE, PilotState.BUSY, PilotState.DRAINING)


@dataclass(frozen=True)
class HeartbeatReply:
    commands: list[Command] = field(default_factory=list)
    heartbeat_interval: int = 30
    state: str = ""


def _command_job_uuids(rows: list[PilotCommand]) -> dict[int, str]:
    from jobs.models import Job

    ids = {r.job_id for r in rows if r.job_id is not None}
    if not ids:
        return {}
    return {pk: str(u) for pk, u in Job.objects.filter(pk__in=ids).values_list("pk", "uuid")}


@transaction.atomic
def pilot_heartbeat(
    *,
    pilot_id: int,
    state: str,
    status: str = "",
    metrics: Mapping[str, Any] | None = None,
    jobs: Sequence[Mapping[str, Any]] = (),
    acked_commands: Iterable[uuid.UUID | str] = (),
) -> HeartbeatReply:
    """A pilot says it is alive, how it is doing and what it runs; it gets its commands.

    - ``registered`` moves to the reported state (``idle`` at first); ``idle``/``busy`` follow
      the report; ``draining`` stays until the pilot ends. A terminated or lost pilot keeps its
      state and is told (once) to shut down.
    - ``last_heartbeat``, ``status`` and ``metrics`` are stored; the metrics of the running
      attempts listed in ``jobs`` (``{job_uuid, attempt, <metric>: number}``) are stored in
      bulk by ``jobs.services.job_events_apply``, as running events.
    - ``acked_commands`` are marked acknowledged; the commands not given to the pilot yet are
      returned and marked delivered with one UPDATE (each is delivered once).

    The pilot's row is locked first, so two heartbeats of one pilot are served one after the
    other, and the reaper (``SKIP LOCKED``) leaves a pilot alone while it is heard from.
    A constant number of queries.
    """
    if state not in REPORTED_STATES:
        raise ValidationFailed({"state": [f"Must be one of {list(REPORTED_STATES)}."]})
    locked = Pilot.objects.select_for_update().filter(pk=pilot_id).values_list("state", flat=True)
    current = locked.first()  # only the state: the auth already read the whole row
    if current is None:
        raise NotFound(f"Pilot {pilot_id} does not exist.")
    now = timezone.now()
    source = pilot_source(pilot_id)

    try:
        acked = [a if isinstance(a, uuid.UUID) else uuid.UUID(str(a)) for a in acked_commands]
    except ValueError as exc:
        raise ValidationFailed({"acked_commands": ["Must be a list of command ids."]}) from exc
    if acked:
        PilotCommand.objects.filter(pilot_id=pilot_id, pk__in=acked, acked_at__isnull=True).update(
            acked_at=now
        )

    if jobs:
        from jobs.services import job_events_apply

        results = job_events_apply(
            events=[
                {
                    "job_uuid": item["job_uuid"],
                    "attempt": item["attempt"],
                    "state": "running",
                    "metrics": {k: v for k, v in item.items() if k not in ("job_uuid", "attempt")},
                }
                for item in jobs
            ],
            pilot_id=pilot_id,
        )
        refused = [r for r in results if not r.ok]
        if refused:
            log.warning(
                "heartbeat_job_metrics_refused",
                pilot_id=pilot_id,
                refused=len(refused),
                first=refused[0].as_dict(),
            )

    updates: dict[str, Any] = {"last_heartbeat": now, "status": (status or "")[:255]}
    if metrics is not None:
        updates["metrics"] = dict(metrics)
    target = None
    if current == PilotState.REGISTERED or (
        current in (PilotState.IDLE, PilotState.BUSY) and state != current
    ):
        target = state
    if target is not None:
        apply_transition(
            Pilot, pilot_id, target, source=source, reason="heartbeat", updates=updates
        )
        log.info("pilot_state_changed", pilot_id=pilot_id, from_state=current, to_state=target)
        current = target
    else:
        Pilot.objects.filter(pk=pilot_id).update(updated_at=now, **updates)

    if (
        current not in LIVE_PILOT_STATES
        and not PilotCommand.objects.filter(
            pilot_id=pilot_id, command=CommandKind.SHUTDOWN
        ).exists()
    ):
        # A pilot the WMS gave up on (lost, terminated) but that is still alive: its attempts
        # were ended and retried elsewhere, so it must stop.
        pilot_commands_create(
            commands=[
                CommandSpec(
                    pilot_id=pilot_id,
                    command=CommandKind.SHUTDOWN,
                    reason=f"the WMS considers this pilot {current}",
                )
            ]
        )

    pending = list(
        PilotCommand.objects.filter(
            pilot_id=pilot_id, delivered_at__isnull=True, acked_at__isnull=True
        ).order_by("created_at", "id")
    )
    if pending:
        PilotCommand.objects.filter(pk__in=[c.pk for c in pending]).update(delivered_at=now)
    job_uuids = _command_job_uuids(pending)
    return HeartbeatReply(
        commands=[
            command_message(c, job_uuids.get(c.job_id, "") if c.job_id is not None else "")
            for c in pending
        ],
        heartbeat_interval=settings.WMS_HEARTBEAT_INTERVAL,
        state=current,
    )


# --- the end of a pilot -------------------------------------------------------------------------


@dataclass(frozen=True)
class PilotTerminated(TransitionResult):
    attempts_failed: int = 0


@transaction.atomic
def pilot_terminate(*, pilot_id: int, source: str, reason: str = "") -> PilotTerminated:
    """The pilot ends (it says it exits, or an operator says so): ``terminated``.

    Its running attempts, if any, fail with error code ``pilot_terminated``; their jobs are
    retried (back to ``defined``) or failed when no retry is left. Terminating a terminated
    pilot is a no-op; a lost one answers 409.
    """
    from jobs.models import AttemptState
    from jobs.services import attempts_interrupt

    if not Pilot.objects.select_for_update().filter(pk=pilot_id).exists():
        raise NotFound(f"Pilot {pilot_id} does not exist.")
    result = pilot_transition(
        pilot_id=pilot_id, target=PilotState.TERMINATED, source=source, reason=reason
    )
    interrupted = attempts_interrupt(
        pilot_ids=[pilot_id],
        attempt_state=AttemptState.FAILED,
        error_code="pilot_terminated",
        error_message=reason or "the pilot terminated",
        source=source,
    )
    return PilotTerminated(
        won=result.won,
        from_state=result.from_state,
        to_state=result.to_state,
        attempts_failed=interrupted.attempts,
    )


@dataclass(frozen=True)
class ReapResult:
    pilots: int = 0  # pilots found silent, now lost
    attempts: int = 0  # running attempts of lost pilots, now lost
    retried: int = 0  # their jobs back to defined
    failed: int = 0  # their jobs failed (no retry left)


def pilots_reap_lost(
    *, beat: bool = False, now: datetime | None = None, limit: int = 1000
) -> ReapResult:
    """The reaper (``wms.reap_pilots``): silent pilots become ``lost``, their attempts too.

    1. Live pilots whose last heartbeat is older than ``WMS_PILOT_LOST_AFTER`` seconds are
       taken ``FOR UPDATE SKIP LOCKED`` (a pilot in the middle of a heartbeat is skipped)
       and moved to ``lost`` with one UPDATE per state.
    2. The running attempts of lost pilots become ``lost`` (error code ``lost_heartbeat``);
       their jobs go back to ``defined`` with ``cur_retry + 1``, or fail when no retry is left.
       Jobs locked by a concurrent report are skipped and taken at the next cycle: step 2
       looks at every lost pilot, not only the ones of this cycle.

    ``beat=True`` first claims the cycle (``service_tick("reaper")``); the reaper can be
    switched off like the splitter and the executor.
    """
    from jobs.models import AttemptState
    from jobs.services import attempts_interrupt

    if beat and not service_tick("reaper", min_interval=settings.WMS_REAP_EVERY / 2):
        return ReapResult()
    if not switch_enabled("reaper"):
        return ReapResult()
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.WMS_PILOT_LOST_AFTER)
    with transaction.atomic():
        rows = list(
            Pilot.objects.select_for_update(skip_locked=True)
            .filter(state__in=LIVE_PILOT_STATES)
            .filter(
                Q(last_heartbeat__lt=cutoff) | Q(last_heartbeat__isnull=True, created_at__lt=cutoff)
            )
            .order_by("last_heartbeat", "id")
            .values_list("id", "state")[:limit]
        )
        by_state: dict[str, list[int]] = {}
        for pk, state in rows:
            by_state.setdefault(state, []).append(pk)
        reason = f"no heartbeat for {settings.WMS_PILOT_LOST_AFTER} s"
        for state, pks in by_state.items():
            apply_transition_bulk(
                Pilot,
                pks,
                PilotState.LOST,
                from_state=state,
                source=TransitionSource.REAPER,
                reason=reason,
                locked=True,
            )
        lost = attempts_interrupt(
            pilot_states=(PilotState.LOST,),
            attempt_state=AttemptState.LOST,
            error_code="lost_heartbeat",
            error_message=f"the pilot was silent for {settings.WMS_PILOT_LOST_AFTER} s",
            source=TransitionSource.REAPER,
            skip_locked=True,
        )
        # A start that raced a terminate: the attempt began on a pilot that is gone.
        gone = attempts_interrupt(
            pilot_states=(PilotState.TERMINATED,),
            attempt_state=AttemptState.FAILED,
            error_code="pilot_terminated",
            error_message="the pilot terminated",
            source=TransitionSource.REAPER,
            skip_locked=True,
        )
    result = ReapResult(
        pilots=len(rows),
        attempts=lost.attempts + gone.attempts,
        retried=lost.retried + gone.retried,
        failed=lost.failed + gone.failed,
    )
    if rows or result.attempts:
        log.info(
            "pilots_reaped",
            pilots=result.pilots,
            attempts=result.attempts,
            retried=result.retried,
            failed=result.failed,
        )
    return result
