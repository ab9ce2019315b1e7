"""Every write to pilots and their commands goes through here.

The pilot protocol (docs/pilot-api.md): :func:`pilot_register` (with the payloads a dead pilot
left, :func:`pilot_orphans_record`), :func:`pilot_heartbeat`,
:func:`pilot_terminate`; commands to pilots (:func:`pilot_command_create`,
:func:`pilot_commands_create`); and the reaper of silent pilots (:func:`pilots_reap_lost`).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog
from django.conf import settings
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from pilots.commands import CommandSpec, pilot_commands_create
from pilots.heartbeat_rows import deliver_commands, touch
from pilots.models import (
    LIVE_PILOT_STATES,
    CommandKind,
    Pilot,
    PilotCommand,
    PilotState,
)
from wms.choices import DeviceType
from wms.contract import Command
from wms.exceptions import NotFound, ValidationFailed
from wms.models import ApiToken
from wms.services import api_token_create, api_token_revoke, service_account_ensure
from wms.statemachine import TransitionResult, apply_transition

log = structlog.get_logger(__name__)

TOKEN_PREFIX = "wmsp_"  # noqa: S105 - a prefix, not a secret


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


PILOT_REGISTRAR = "pilot-registrar"


@transaction.atomic
def pilot_registrar_ensure(
    *,
    username: str = PILOT_REGISTRAR,
    label: str = "pilot registration",
    replace: bool = False,
) -> str:
    """Make sure the account pilots register with exists and may add pilots
    (``pilots.add_pilot``, see docs/pilot-api.md), give it a new API token named
    ``label`` and return its key (shown this once: only its hash is kept).

    ``replace`` revokes the account's earlier tokens of that name first (``manage.py up``
    makes a new one for its local pilots at every start). The account is not staff and has
    no usable password.
    """
    user, _created = service_account_ensure(username)
    permission, _ = Permission.objects.get_or_create(
        codename="add_pilot",
        content_type=ContentType.objects.get_for_model(Pilot),
        defaults={"name": "Can add pilot"},
    )
    user.user_permissions.add(permission)
    if replace:
        for token_id in ApiToken.objects.filter(
            user=user, name=label, revoked_at__isnull=True
        ).values_list("id", flat=True):
            api_token_revoke(token_id=token_id)
    _token, key = api_token_create(user=user, name=label)
    return key


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
    orphans: Sequence[Mapping[str, Any]] = (),
    token: str | None = None,
) -> tuple[Pilot, str]:
    """Register a pilot; returns it with its token (shown once, only its hash is stored).
    ``orphans``: what the pilot found and killed of a dead pilot's payloads at start-up
    (:func:`pilot_orphans_record`). ``token``: the token to give it
    (``pilots.auth.registration_token``, for a registration with an idempotency key); a new
    random one by default."""
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
    if orphans:
        pilot_orphans_record(pilot=pilot, orphans=orphans)
    return pilot, token


def _orphans_text(orphans: Sequence[Mapping[str, Any]]) -> str:
    return "; ".join(
        f"job {o['job_uuid']} attempt {o['attempt']} of pilot {o.get('pilot_id') or '?'}: "
        + (f"pids {','.join(map(str, o.get('pids') or []))} killed" if o.get("pids") else "gone")
        for o in orphans
    )


@transaction.atomic
def pilot_orphans_record(*, pilot: Pilot, orphans: Sequence[Mapping[str, Any]]) -> list[int]:
    """A pilot starting on a work directory found payloads a dead pilot left there and killed
    them (``orphans``: ``{job_uuid, attempt, pilot_id, pids}``, docs/pilot-api.md).

    Logged, and written in the new pilot's ``status`` (until its first heartbeat). A previous
    pilot named there is ended now (``lost``, its running attempts ``lost`` with error code
    ``pilot_died``, their jobs retried at once rather than after ``WMS_PILOT_LOST_AFTER``)
    only on evidence that it is dead, which a registrant cannot fake for another site's live
    pilot: it is on the same hostname as the registrant, still live in the WMS but silent for
    more than two heartbeat intervals (a pilot heard from lately is left alone, whatever the
    report says), and one of the reported attempts is a running attempt of it. The work
    directory's lock, which the new pilot holds, tells the agent the previous one is gone.
    Returns the ids of the pilots ended.
    """
    from jobs.control import attempts_interrupt
    from jobs.models import AttemptState, JobAttempt

    text = _orphans_text(orphans)
    log.warning(
        "pilot_orphans_reported",
        pilot_id=pilot.pk,
        hostname=pilot.hostname,
        jobs=len(orphans),
        orphans=[dict(o, job_uuid=str(o["job_uuid"])) for o in orphans],
    )
    Pilot.objects.filter(pk=pilot.pk).update(
        status=f"registered; killed what a dead pilot left: {text}"[:255],
        updated_at=timezone.now(),
    )
    named = {o["pilot_id"] for o in orphans if o.get("pilot_id") and o["pilot_id"] != pilot.pk}
    if not named:
        return []
    now = timezone.now()
    cutoff = now - timedelta(seconds=2 * settings.WMS_HEARTBEAT_INTERVAL)
    # locked rows are being heard from (a heartbeat) or reaped: left alone
    silent = dict(
        Pilot.objects.select_for_update(skip_locked=True)
        .filter(pk__in=named, hostname=pilot.hostname, state__in=LIVE_PILOT_STATES)
        .filter(
            Q(last_heartbeat__lt=cutoff) | Q(last_heartbeat__isnull=True, created_at__lt=cutoff)
        )
        .order_by("id")
        .values_list("id", "state")
    )
    running = set(
        JobAttempt.objects.filter(
            pilot_id__in=list(silent),
            state=AttemptState.RUNNING,
            job__uuid__in=[str(o["job_uuid"]) for o in orphans],
        ).values_list("pilot_id", "job__uuid", "number")
    )
    source = pilot_source(pilot.pk)
    ended = []
    for prev_id, state in silent.items():
        mine = [o for o in orphans if o.get("pilot_id") == prev_id]
        if not any((prev_id, _uuid(o["job_uuid"]), o["attempt"]) in running for o in mine):
            continue
        why = (
            f"pilot {pilot.pk} started on {pilot.hostname} found this pilot's payloads "
            f"orphaned (it died): {_orphans_text(mine)}"
        )
        apply_transition(
            Pilot, prev_id, PilotState.LOST, source=source, reason=why, locked_state=state
        )
        interrupted = attempts_interrupt(
            pilot_ids=[prev_id],
            attempt_state=AttemptState.LOST,
            error_code="pilot_died",
            error_message=why[:2000],
            source=source,
        )
        ended.append(prev_id)
        log.warning(
            "pilot_died_reported",
            pilot_id=prev_id,
            by_pilot_id=pilot.pk,
            hostname=pilot.hostname,
            attempts=interrupted.attempts,
            retried=interrupted.retried,
            failed=interrupted.failed,
        )
    return ended


def _uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


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


# --- heartbeat ----------------------------------------------------------------------------------

REPORTED_STATES = (PilotState.IDLE, PilotState.BUSY, PilotState.DRAINING)


@dataclass(frozen=True)
class HeartbeatReply:
    commands: list[Command] = field(default_factory=list)
    heartbeat_interval: int = 30
    state: str = ""


def pilot_heartbeat(
    *,
    pilot_id: int,
    state: str,
    status: str = "",
    metrics: Mapping[str, Any] | None = None,
    jobs: Sequence[Mapping[str, Any]] = (),
    reporting: Sequence[Mapping[str, Any]] | None = None,
    acked_commands: Iterable[uuid.UUID | str] = (),
) -> HeartbeatReply:
    """A pilot says it is alive, how it is doing and what it runs; it gets its commands.

    - ``registered`` moves to the reported state (``idle`` at first); ``idle``/``busy`` follow
      the report; ``draining`` stays until the pilot ends. A ``lost`` pilot was heard from
      again: it moves to the reported state (reason "heard from again") and carries on. A
      terminated pilot keeps its state and is told (once) to shut down. Only a change of
      state writes a transition row (and an INFO line); a heartbeat that changes nothing
      logs nothing.
    - The attempts the pilot names, running (``jobs``: ``{job_uuid, attempt, <metric>:
      number}``) or with a final report in its spool (``reporting``: ``{job_uuid, attempt}``),
      are reconciled with the server's (``pilots.reconcile.pilot_attempts_reconcile``): its own
      current attempts carry on, attempts the reaper ended are reclaimed while their job has
      not started again, anything else gets a ``kill_job`` command in this reply; attempts
      the server has running on this pilot that it names in neither list fail
      (``not_on_pilot``, only when ``reporting`` is sent: an older agent does not say).
    - ``last_heartbeat``, ``status`` and ``metrics`` are stored; the metrics of the running
      attempts are stored in bulk by ``jobs.reports.job_events_apply``, as running events.
    - ``acked_commands`` are marked acknowledged; the commands not given to the pilot yet are
      returned and marked delivered with one UPDATE (each is delivered once).

    The pilot's row is locked first, so two heartbeats of one pilot are served one after the
    other, and the reaper (``SKIP LOCKED``) leaves a pilot alone while it is heard from.
    A constant number of queries: a pilot that runs nothing and names nothing, whose state
    does not change, costs two statements on PostgreSQL (the row's lock and update, and the
    commands' delivery), plus one to mark acknowledged commands when it sends some.
    """
    if state not in REPORTED_STATES:
        raise ValidationFailed({"state": [f"Must be one of {list(REPORTED_STATES)}."]})
    try:
        acked = [a if isinstance(a, uuid.UUID) else uuid.UUID(str(a)) for a in acked_commands]
    except ValueError as exc:
        raise ValidationFailed({"acked_commands": ["Must be a list of command ids."]}) from exc
    reply = _heartbeat(
        pilot_id=pilot_id,
        state=state,
        status=status,
        metrics=metrics,
        jobs=jobs,
        reporting=reporting,
        acked=acked,
    )
    if reply is None:
        raise NotFound(f"Pilot {pilot_id} does not exist.")
    return reply


# Inside its caller's transaction when there is one (the idempotency key's): no savepoint of
# its own (two statements less). Bad input is refused before it (above), a missing pilot
# writes nothing and is answered after it; any other error spoils the caller's transaction,
# which is then rolled back whole, as the idempotent call's is.
@transaction.atomic(savepoint=False)
def _heartbeat(
    *,
    pilot_id: int,
    state: str,
    status: str,
    metrics: Mapping[str, Any] | None,
    jobs: Sequence[Mapping[str, Any]],
    reporting: Sequence[Mapping[str, Any]] | None,
    acked: list[uuid.UUID],
) -> HeartbeatReply | None:
    now = timezone.now()
    updates: dict[str, Any] = {
        "last_heartbeat": now,
        "updated_at": now,
        "status": (status or "")[:255],
    }
    if metrics is not None:
        updates["metrics"] = dict(metrics)
    touched = touch(pilot_id, updates)
    if touched is None:
        return None  # nothing written
    current, previous_heartbeat, running_here = touched
    source = pilot_source(pilot_id)

    if acked:
        PilotCommand.objects.filter(pilot_id=pilot_id, pk__in=acked, acked_at__isnull=True).update(
            acked_at=now
        )

    target, reason = None, "heartbeat"
    if current == PilotState.LOST:
        target, reason = state, "heard from again"
    elif current == PilotState.REGISTERED or (
        current in (PilotState.IDLE, PilotState.BUSY) and state != current
    ):
        target = state
    if target is not None:
        apply_transition(
            Pilot, pilot_id, target, source=source, reason=reason, locked_state=current
        )
        log.info(
            "pilot_state_changed",
            pilot_id=pilot_id,
            from_state=current,
            to_state=target,
            reason=reason,
        )
        if current == PilotState.LOST:
            log.warning("pilot_heard_from_again", pilot_id=pilot_id, state=target)
        current = target

    if current in LIVE_PILOT_STATES and (jobs or reporting is not None):
        from pilots.reconcile import pilot_attempts_reconcile_locked

        pilot_attempts_reconcile_locked(
            pilot_id=pilot_id,
            running=jobs,
            reporting=reporting,
            now=now,
            previous_heartbeat=previous_heartbeat,
            running_here=running_here,
        )
    if jobs:
        from jobs.reports import job_events_apply

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

    if (
        current == PilotState.TERMINATED
        and not PilotCommand.objects.filter(
            pilot_id=pilot_id, command=CommandKind.SHUTDOWN
        ).exists()
    ):
        # A pilot that terminated (itself, or an operator said so) but is still alive: its
        # attempts were ended and retried elsewhere, so it must stop. (A lost pilot is not
        # told so: it is heard from again, above, and carries on.)
        pilot_commands_create(
            commands=[
                CommandSpec(
                    pilot_id=pilot_id,
                    command=CommandKind.SHUTDOWN,
                    reason=f"the WMS considers this pilot {current}",
                )
            ]
        )

    return HeartbeatReply(
        commands=deliver_commands(pilot_id, now),
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
    from jobs.control import attempts_interrupt
    from jobs.models import AttemptState

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
