"""A pilot's job calls (docs/pilot-api.md): the pilot's side of ``start``, and the kill
commands the jobs app asks for.

The pilots app sits above jobs (dependencies one way): it holds its own rows (the pilot's
state, its commands) and calls the jobs app's services for the job's half.
"""

from __future__ import annotations

import uuid
from typing import Any

import structlog
from django.db import IntegrityError, transaction

from jobs.signals import KillOrder
from jobs.start import job_claim
from pilots.commands import CommandSpec, pilot_commands_create
from pilots.models import CommandKind, Pilot, PilotState
from wms.contract import JobMessage
from wms.exceptions import JobNotQueued, NotFound, PilotNotLive, TaskPaused
from wms.statemachine import apply_transition

log = structlog.get_logger(__name__)


def pilot_job_start(*, pilot: Pilot, job_uuid: uuid.UUID | str, attempt: int) -> JobMessage:
    """A pilot's atomic claim of one attempt of a job; returns the job message to run.

    The pilot's row, then the job's, are locked (``FOR UPDATE``, in this order everywhere),
    so of two pilots starting the same job (a duplicated message) the second one waits and
    then finds the job ``running``: ``job_not_queued``. Refused (409): ``pilot_not_live``
    (the pilot is terminated or lost), and what ``jobs.start.job_claim`` refuses
    (``stale_attempt``, ``wrong_device``, ``job_not_queued``): nothing written; and
    ``task_paused``: the job's task is paused (its message was queued before the pause, or
    the executor's claim raced the pause); this refusal changes one thing, kept: the job goes
    back ``queued → defined``, to be dispatched again when the task is resumed.

    On success the job is ``running`` with this pilot, the attempt row exists, and an idle
    pilot is busy. The same start again, once this attempt runs with this pilot (its answer
    was lost on the way), answers the same job message and writes nothing: a start can always
    be retried.
    """
    try:
        message = _pilot_job_start(pilot=pilot, job_uuid=job_uuid, attempt=attempt)
    except IntegrityError as exc:  # the constraints say what the locks should have said
        raise JobNotQueued(f"Attempt {attempt} of job {job_uuid} was already started.") from exc
    if message is None:  # the job went back to wait (committed): the start is refused
        raise TaskPaused(
            f"The task of job {job_uuid} is paused: attempt {attempt} is not started; the job "
            "waits for the task's resume."
        )
    return message


@transaction.atomic
def _pilot_job_start(*, pilot: Pilot, job_uuid: uuid.UUID | str, attempt: int) -> JobMessage | None:
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
    claim = job_claim(
        pilot_id=pilot.pk, device_type=pilot.device_type, job_uuid=job_uuid, attempt=attempt
    )
    if claim.started and pilot_state in (PilotState.REGISTERED, PilotState.IDLE):
        apply_transition(
            Pilot,
            pilot.pk,
            PilotState.BUSY,
            source=f"pilot:{pilot.pk}",
            reason="job started",
            locked_state=pilot_state,
        )
    return claim.message


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
