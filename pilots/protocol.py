"""A pilot's job calls (docs/pilot-api.md): the pilot's side of ``start``, and the kill
commands the jobs app asks for.

The pilots app sits above jobs (dependencies one way): it holds its own rows (the pilot's
state, its commands) and calls the jobs app's services for the job's half.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import structlog
from django.db import IntegrityError, transaction

from jobs.signals import KillOrder
from jobs.start import Claim, jobs_claim
from pilots.commands import CommandSpec, pilot_commands_create
from pilots.models import CommandKind, Pilot, PilotState
from wms.contract import JobMessage
from wms.exceptions import JobNotQueued, NotFound, PilotNotLive, ValidationFailed, WMSError
from wms.statemachine import apply_transition

log = structlog.get_logger(__name__)


def pilot_job_start(*, pilot: Pilot, job_uuid: uuid.UUID | str, attempt: int) -> JobMessage:
    """A pilot's atomic claim of one attempt of a job (``POST /jobs/{uuid}/start/``): the
    one-job form of :func:`pilot_jobs_start`; returns the job message to run, or raises the
    refusal (409): ``pilot_not_live``, ``stale_attempt``, ``wrong_device``,
    ``job_not_queued`` (nothing written) and ``task_paused``, whose one change (the job back
    ``queued → defined``) is committed before it is raised.
    """
    (claim,) = pilot_jobs_start(pilot=pilot, starts=[(job_uuid, attempt)])
    if claim.refusal is not None:
        raise claim.refusal
    assert claim.message is not None
    return claim.message


def pilot_jobs_start(*, pilot: Pilot, starts: Sequence[tuple[uuid.UUID | str, int]]) -> list[Claim]:
    """A pilot's atomic claims of attempts of jobs (``POST /pilots/{id}/starts/`` and the
    one-job ``start``); one :class:`~jobs.start.Claim` per start, in order, each started or
    refused alone (``jobs.start.jobs_claim``), in one transaction of a constant number of
    statements.

    The pilot's row, then the jobs' rows, are locked (``FOR UPDATE``, in this order
    everywhere), so of two pilots starting the same job (a duplicated message) the second one
    waits and then finds the job ``running``: ``job_not_queued``. A pilot that is terminated
    or lost is refused as a whole (409 ``pilot_not_live``, nothing written).

    On success the jobs are ``running`` with this pilot, their attempt rows exist, and an
    idle pilot is busy. The same start again, once its attempt runs with this pilot (its
    answer was lost on the way), answers the same job message and writes nothing: a start
    can always be retried.
    """
    try:
        return _pilot_jobs_start(pilot=pilot, starts=starts)
    except IntegrityError as exc:  # the constraints say what the locks should have said
        raise JobNotQueued("An attempt of these jobs was already started.") from exc


def clean_starts(entries: Sequence[Any]) -> list[tuple[uuid.UUID, int] | ValidationFailed]:
    """The entries of a starts call, each checked alone: ``(job uuid, attempt)``, or the
    reason it is refused (``validation_failed``); one bad entry spoils no other."""
    cleaned: list[tuple[uuid.UUID, int] | ValidationFailed] = []
    for i, entry in enumerate(entries):
        errors: dict[str, list[str]] = {}
        uid: uuid.UUID | None = None
        attempt = None
        if not isinstance(entry, dict):
            cleaned.append(ValidationFailed({f"starts[{i}]": ["Expected an object."]}))
            continue
        extra = sorted(set(entry) - {"job_uuid", "attempt"})
        if extra:
            errors["non_field_errors"] = [f"Unknown fields: {', '.join(map(str, extra))}."]
        try:
            uid = uuid.UUID(str(entry["job_uuid"]))
        except (KeyError, ValueError, TypeError, AttributeError):
            errors["job_uuid"] = ["A job uuid is required."]
        attempt = entry.get("attempt")
        if not isinstance(attempt, int) or isinstance(attempt, bool) or not 0 <= attempt <= 32767:
            errors["attempt"] = ["An integer from 0 to 32767 is required."]
        if errors or uid is None or not isinstance(attempt, int):
            cleaned.append(ValidationFailed(errors))
        else:
            cleaned.append((uid, attempt))
    return cleaned


def pilot_starts_answer(*, pilot: Pilot, entries: Sequence[Any]) -> list[dict[str, Any]]:
    """``POST /pilots/{id}/starts/``: each entry checked (:func:`clean_starts`), the valid
    ones started (:func:`pilot_jobs_start`), one result per entry in order: ``outcome:
    started`` with the job message, or ``error`` and ``detail``."""
    cleaned = clean_starts(entries)
    valid = [c for c in cleaned if isinstance(c, tuple)]
    claims = iter(pilot_jobs_start(pilot=pilot, starts=valid) if valid else [])
    results: list[dict[str, Any]] = []
    for entry, item in zip(entries, cleaned, strict=True):
        if isinstance(item, tuple):
            claim = next(claims)
            head: dict[str, Any] = {"job_uuid": str(item[0]), "attempt": item[1]}
            if claim.refusal is None:
                assert claim.message is not None
                results.append({**head, "outcome": "started", "job": claim.message.to_dict()})
                continue
            error: WMSError = claim.refusal
        else:
            raw = entry if isinstance(entry, dict) else {}
            attempt = raw.get("attempt")
            head = {
                "job_uuid": str(raw.get("job_uuid") or ""),
                "attempt": attempt if type(attempt) is int else None,
            }
            error = item
        results.append({**head, "error": error.code, "detail": error.detail})
    return results


@transaction.atomic
def _pilot_jobs_start(
    *, pilot: Pilot, starts: Sequence[tuple[uuid.UUID | str, int]]
) -> list[Claim]:
    pilot_state = (
        Pilot.objects.select_for_update()
        .filter(pk=pilot.pk)
        .values_list("state", flat=True)
        .first()
    )
    if pilot_state is None:
        raise NotFound(f"Pilot {pilot.pk} does not exist.")
    if pilot_state in (PilotState.TERMINATED, PilotState.LOST):
        raise PilotNotLive(f"Pilot {pilot.pk} is {pilot_state}; it may not start jobs.")
    claims = jobs_claim(pilot_id=pilot.pk, device_type=pilot.device_type, starts=starts)
    if pilot_state in (PilotState.REGISTERED, PilotState.IDLE) and any(c.started for c in claims):
        apply_transition(
            Pilot,
            pilot.pk,
            PilotState.BUSY,
            source=f"pilot:{pilot.pk}",
            reason="job started",
            locked_state=pilot_state,
        )
    return claims


def kill_orders_send(*, orders: list[KillOrder], **_: Any) -> None:
    """Receiver of ``jobs.signals.attempts_to_kill`` (connected in ``pilots.apps``): one
    ``kill_job`` command per order, created in the transaction that ended the attempts and
    published after it commits."""
    pilot_commands_create(
        commands=[
            CommandSpec(
                pilot_id=o.pilot_id,
                command=CommandKind.KILL_JOB,
                job_id=o.job_id,
                job_uuid=o.job_uuid,
                attempt=o.attempt,
                reason=o.reason,
            )
            for o in orders
        ]
    )
