"""Commands to pilots (``kill_job``, ``drain``, ``shutdown``): created in bulk in the caller's
transaction, published to each pilot's command queue after it commits, and carried by the
next heartbeat reply until acknowledged (docs/pilot-api.md)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from django.db import transaction
from django.utils import timezone

from pilots.models import CommandKind, Pilot, PilotCommand
from wms import bus
from wms.contract import Command
from wms.exceptions import BrokerError, NotFound, ValidationFailed

log = structlog.get_logger(__name__)


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
