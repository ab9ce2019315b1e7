"""A pilot's attempts, as it names them in its heartbeat, reconciled with the server's.

Called by ``pilots.services.pilot_heartbeat`` (docs/lifecycle.md, "Reconciliation"). The pilot
names the attempts it runs (``jobs``) and those whose final report sits in its spool, not yet
accepted (``reporting``). For each one:

- the job's current attempt, running with this pilot: it carries on;
- an attempt of this pilot that the reaper ended as ``lost``, whose job has not started a newer
  attempt (``defined`` or ``queued`` with ``cur_retry = attempt + 1``): **reclaimed**, the job
  goes back to ``running`` with this pilot and ``cur_retry = attempt``, the attempt row back to
  ``running`` (a queued message of the newer attempt is then refused at start as stale);
- anything else the pilot still runs (a newer attempt started elsewhere, the job held, final or
  cancelled, an attempt that is not this pilot's): a ``kill_job`` command, returned by this
  very heartbeat. Its final report, if any, is refused or ignored: only one attempt's outputs
  are ever registered (``jobs.reports.job_events_apply`` takes final reports of the running
  attempt only).

And the attempts the server has running on this pilot that it names in neither list, started
more than ``WMS_NOT_ON_PILOT_GRACE`` seconds ago, were lost by the pilot (a start answer that
never reached it, say): they fail with error code ``not_on_pilot`` and their jobs are retried.
Only a heartbeat that sends ``reporting`` (even empty) is trusted for that.

A final report of a lost attempt that reaches the server before its pilot's heartbeat does is
reclaimed the same way first (``jobs.reclaim.attempts_reclaim_reported``, from
``job_events_apply``).

A constant number of queries, whatever the number of attempts.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from jobs.control import attempts_interrupt
from jobs.models import AttemptState, Job, JobAttempt, JobState
from jobs.reclaim import RECLAIMABLE_JOB_STATES, attempts_reclaim
from pilots.commands import CommandSpec, pilot_commands_create
from pilots.models import CommandKind, PilotCommand
from wms.exceptions import ValidationFailed

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ReconcileResult:
    carried_on: int = 0  # the pilot's current attempts
    reclaimed: int = 0  # lost attempts given back to the pilot
    killed: int = 0  # kill_job commands created
    not_on_pilot: int = 0  # attempts the pilot no longer has, failed


def _named(items: Sequence[Mapping[str, Any]], field: str) -> list[tuple[str, int]]:
    named = []
    for item in items:
        try:
            uid = str(uuid.UUID(str(item["job_uuid"])))
            attempt = int(item["attempt"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationFailed(
                {field: ["Each item needs a job_uuid (a UUID) and an attempt (an integer)."]}
            ) from exc
        named.append((uid, attempt))
    return named


@transaction.atomic
def pilot_attempts_reconcile(
    *,
    pilot_id: int,
    running: Sequence[Mapping[str, Any]] = (),
    reporting: Sequence[Mapping[str, Any]] | None = None,
    now: datetime | None = None,
    previous_heartbeat: datetime | None = None,
) -> ReconcileResult:
    """Reconcile the attempts a pilot names with the server's; see the module docstring.

    ``previous_heartbeat``: when the pilot was heard from before this heartbeat. An attempt
    counts as not on the pilot only if it started before that too (the pilot builds a
    heartbeat after the previous one's answer), besides the grace: a heartbeat that lingered
    on its way cannot fail an attempt started after it was written.

    The caller (the heartbeat) holds the pilot's row; jobs are locked after it
    (``FOR UPDATE``, in id order), the order every start and terminate uses.
    """
    return pilot_attempts_reconcile_locked(
        pilot_id=pilot_id,
        running=running,
        reporting=reporting,
        now=now,
        previous_heartbeat=previous_heartbeat,
    )


def pilot_attempts_reconcile_locked(
    *,
    pilot_id: int,
    running: Sequence[Mapping[str, Any]] = (),
    reporting: Sequence[Mapping[str, Any]] | None = None,
    now: datetime | None = None,
    previous_heartbeat: datetime | None = None,
    running_here: bool = True,
) -> ReconcileResult:
    """:func:`pilot_attempts_reconcile` inside the caller's transaction, which holds the
    pilot's row (the heartbeat's): no savepoint of its own, so an error spoils the caller's
    transaction (the heartbeat's is then rolled back whole). ``running_here=False``: the
    caller read, under that lock, that no attempt runs on this pilot (no query for the
    attempts it does not name)."""
    now = now or timezone.now()
    runs = _named(running, "jobs")
    reports = _named(reporting or (), "reporting")
    named = set(runs) | set(reports)
    run_set = set(runs)
    carried_on = 0
    reclaim: list[tuple[int, int, int]] = []  # (job id, attempt number, attempt pk)
    kills: list[tuple[int, str, int, str]] = []  # (job id, job uuid, attempt, reason)
    jobs: dict[str, dict[str, Any]] = {}
    if named:
        for job_row in Job.objects.filter(uuid__in={u for u, _ in named}).values(
            "id", "uuid", "state", "cur_retry", "pilot_id"
        ):
            jobs[str(job_row["uuid"])] = dict(job_row)
        attempts: dict[tuple[int, int], dict[str, Any]] = {}
        newest: dict[int, int] = {}
        for row in JobAttempt.objects.filter(job_id__in=[j["id"] for j in jobs.values()]).values(
            "pk", "job_id", "number", "state", "pilot_id"
        ):
            attempts[(row["job_id"], row["number"])] = dict(row)
            newest[row["job_id"]] = max(newest.get(row["job_id"], -1), row["number"])
        for uid, number in sorted(named):
            job = jobs.get(uid)
            if job is None:
                log.warning("reconcile_unknown_job", pilot_id=pilot_id, job_uuid=uid)
                continue
            att = attempts.get((job["id"], number))
            mine = att is not None and att["pilot_id"] == pilot_id
            if mine and att is not None and att["state"] == AttemptState.RUNNING:
                carried_on += 1
                continue
            if (
                mine
                and att is not None
                and att["state"] == AttemptState.LOST
                and job["state"] in RECLAIMABLE_JOB_STATES
                and job["cur_retry"] == number + 1
                and newest.get(job["id"]) == number
            ):
                reclaim.append((job["id"], number, att["pk"]))
                continue
            if (uid, number) in run_set:
                kills.append((job["id"], uid, number, _kill_reason(job, att, number, pilot_id)))
    reclaimed, refused = attempts_reclaim(pilot_id, reclaim, now)
    for job_id, number in refused:  # lost the race to a start or a hold: kill it after all
        uid = next(u for u, j in jobs.items() if j["id"] == job_id)
        if (uid, number) in run_set:
            kills.append((job_id, uid, number, "the job moved on while it was reclaimed"))
    killed = _kill(pilot_id, kills)
    failed = 0
    if reporting is not None and running_here:
        failed = _fail_not_on_pilot(pilot_id, named, now, previous_heartbeat)
    result = ReconcileResult(
        carried_on=carried_on, reclaimed=reclaimed, killed=killed, not_on_pilot=failed
    )
    if reclaimed or killed or failed:
        log.info(
            "pilot_attempts_reconciled",
            pilot_id=pilot_id,
            carried_on=carried_on,
            reclaimed=reclaimed,
            killed=killed,
            not_on_pilot=failed,
        )
    return result


def _kill_reason(
    job: Mapping[str, Any], att: Mapping[str, Any] | None, number: int, pilot_id: int
) -> str:
    if att is None:
        return f"attempt {number} of this job was never started"
    if att["pilot_id"] != pilot_id:
        return f"attempt {number} of this job is another pilot's"
    if job["state"] in (JobState.FINISHED, JobState.FAILED, JobState.CANCELLED, JobState.HELD):
        return f"attempt {number} is {att['state']} and the job is {job['state']}"
    return (
        f"attempt {number} is {att['state']}; the job is at attempt {job['cur_retry']} "
        f"({job['state']})"
    )


def _kill(pilot_id: int, kills: list[tuple[int, str, int, str]]) -> int:
    """A kill_job command for each attempt, unless this pilot already has one for it."""
    if not kills:
        return 0
    sent = set(
        PilotCommand.objects.filter(
            pilot_id=pilot_id,
            command=CommandKind.KILL_JOB,
            job_id__in={job_id for job_id, _, _, _ in kills},
        ).values_list("job_id", "attempt")
    )
    specs = [
        CommandSpec(
            pilot_id=pilot_id,
            command=CommandKind.KILL_JOB,
            job_id=job_id,
            job_uuid=uid,
            attempt=number,
            reason=f"not this pilot's any more: {reason}",
        )
        for job_id, uid, number, reason in kills
        if (job_id, number) not in sent
    ]
    pilot_commands_create(commands=specs)
    if specs:
        log.warning("stale_attempts_killed", pilot_id=pilot_id, attempts=len(specs))
    return len(specs)


def _fail_not_on_pilot(
    pilot_id: int,
    named: set[tuple[str, int]],
    now: datetime,
    previous_heartbeat: datetime | None,
) -> int:
    """The attempts running on this pilot as the server has it that the pilot did not name,
    started more than the grace ago (and before its previous heartbeat): failed
    (``not_on_pilot``), their jobs retried."""
    before = now - timedelta(seconds=settings.WMS_NOT_ON_PILOT_GRACE)
    if previous_heartbeat is not None:
        before = min(before, previous_heartbeat)
    missing = [
        pk
        for pk, uid, number in JobAttempt.objects.filter(
            pilot_id=pilot_id, state=AttemptState.RUNNING, started_at__lt=before
        ).values_list("pk", "job__uuid", "number")
        if (str(uid), number) not in named
    ]
    if not missing:
        return 0
    result = attempts_interrupt(
        pilot_ids=[pilot_id],
        attempt_ids=missing,
        attempt_state=AttemptState.FAILED,
        error_code="not_on_pilot",
        error_message="the pilot's heartbeat names this attempt neither as running nor as "
        "reporting: the pilot does not have it",
        source=f"pilot:{pilot_id}",
    )
    if result.attempts:
        log.warning("attempts_not_on_pilot_failed", pilot_id=pilot_id, attempts=result.attempts)
    return result.attempts
