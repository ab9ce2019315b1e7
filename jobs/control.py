"""Moving jobs by hand and by rule: transitions, cancel, hold and release, the kill of
cancelled jobs' running attempts, and the end of a lost or terminated pilot's attempts
(:func:`attempts_interrupt`). Every write of a job's state outside the pilot protocol's
start and reports (``jobs.start``, ``jobs.reports``), the executor and the splitter."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from django.db import transaction
from django.db.models import F
from django.db.models.functions import Greatest
from django.utils import timezone

from jobs.models import OPEN_JOB_STATES, AttemptState, Job, JobAttempt, JobState
from jobs.signals import KillOrder, attempts_to_kill
from wms.exceptions import NotFound
from wms.kicks import kick_dispatch, kick_finalize
from wms.statemachine import (
    LOCK_CHUNK,
    TransitionResult,
    apply_transition,
    apply_transition_bulk,
    apply_transition_chunked,
)

log = structlog.get_logger(__name__)


def job_transition(*, job_id: int, target: str, source: str, reason: str = "") -> TransitionResult:
    result = apply_transition(Job, job_id, target, source=source, reason=reason)
    if result.won:
        log.info(
            "job_state_changed",
            job_id=job_id,
            from_state=result.from_state,
            to_state=target,
            source=source,
        )
    return result


@transaction.atomic
def job_cancel(*, job_id: int, source: str, reason: str = "") -> TransitionResult:
    """Cancel one job (idempotent; a finished or failed job answers 409).

    A running attempt is marked cancelled with the time the kill was asked for, and its pilot
    gets a ``kill_job`` command (published to its command queue after commit, and carried by
    its next heartbeat). The pilot's final report of the attempt records the kill's
    acknowledgement (``kill_acked_at``).
    """
    if not Job.objects.filter(pk=job_id).exists():
        raise NotFound(f"Job {job_id} does not exist.")
    now = timezone.now()
    result = apply_transition(
        Job, job_id, JobState.CANCELLED, source=source, reason=reason, updates={"time_end": now}
    )
    if result.won and result.from_state == JobState.RUNNING:
        _kill_running_attempts([job_id], now=now, reason=reason or f"job cancelled ({source})")
    if result.won:
        log.info("job_cancelled", job_id=job_id, from_state=result.from_state, source=source)
        kick_finalize_tasks(Job.objects.filter(pk=job_id).values_list("task_id", flat=True))
    return result


@transaction.atomic
def jobs_cancel(*, job_ids: Iterable[int], source: str, reason: str = "") -> int:
    """Cancel many jobs in bulk; jobs already final are skipped. Returns how many were cancelled.

    Per chunk (``wms.statemachine.apply_transition_chunked``): the rows are locked
    (``FOR UPDATE``, waiting for a pilot's start in flight), then one UPDATE + one bulk insert
    of transition rows per source state; then per chunk of the running jobs, one UPDATE of
    their attempts and one insert of their pilots' kill commands. A constant number of
    queries per 5,000 jobs.
    """
    ids = list(job_ids)
    now = timezone.now()
    moved = apply_transition_chunked(
        Job,
        ids,
        JobState.CANCELLED,
        from_states=OPEN_JOB_STATES,
        source=source,
        reason=reason,
        updates={"time_end": now},
    )
    cancelled = sum(len(pks) for pks in moved.values())
    running = moved.get(JobState.RUNNING, [])
    for start in range(0, len(running), LOCK_CHUNK):
        _kill_running_attempts(
            running[start : start + LOCK_CHUNK],
            now=now,
            reason=reason or f"job cancelled ({source})",
        )
    if cancelled:
        log.info("jobs_cancelled", count=cancelled, source=source)
        kick_finalize_tasks(
            Job.objects.filter(pk__in=ids, state=JobState.CANCELLED)
            .order_by()  # no default ordering in the DISTINCT: one row per task
            .values_list("task_id", flat=True)
            .distinct()
        )
    return cancelled


def kick_finalize_tasks(task_ids: Iterable[int]) -> None:
    """After commit, ask the finalizer to look at these tasks (a job of each became final).
    Many tasks at once: one kick for every task (the finalizer's cycle)."""
    ids = sorted(set(task_ids))
    if len(ids) > 20:
        kick_finalize()
        return
    for task_id in ids:
        kick_finalize(task_id=task_id)


FINALIZE_KICK_BELOW = 100  # open jobs left in a task under which its final reports kick


def tasks_nearly_done(task_ids: set[int]) -> list[int]:
    """Of these tasks (a job of each just became final), those with fewer than
    ``FINALIZE_KICK_BELOW`` open jobs left: only their reports kick the finalizer. Before that a
    report cannot end its task, and a kick per report cost the web app a publish with confirms
    and a worker a finalizer run, for every job. The margin covers concurrent reports of a
    task's last jobs (each still sees the others' jobs open); the finalizer's beat catches
    anything left. One small indexed count per task (``job_task_state``)."""
    if len(task_ids) > 20:  # kick_finalize sends one kick for all of them anyway
        return list(task_ids)
    return [
        task_id
        for task_id in task_ids
        if Job.objects.filter(task_id=task_id, state__in=OPEN_JOB_STATES)[
            :FINALIZE_KICK_BELOW
        ].count()
        < FINALIZE_KICK_BELOW
    ]


# --- hold / release -----------------------------------------------------------------------------


@transaction.atomic
def job_hold(*, job_id: int, source: str, reason: str = "") -> TransitionResult:
    """Hold a job not yet running (defined or queued → held): it is not dispatched, and the
    message of a queued job, still in its queue, is refused at start (409 job_not_queued).
    Holding a held job is a no-op; any other state answers 409."""
    return job_transition(job_id=job_id, target=JobState.HELD, source=source, reason=reason)


@transaction.atomic
def job_release(*, job_id: int, source: str, reason: str = "") -> TransitionResult:
    """Release a held job (held → defined): the executor dispatches it again (kicked).
    Releasing a job that is not held answers 409 (a defined job: a no-op)."""
    result = apply_transition(
        Job, job_id, JobState.DEFINED, source=source, reason=reason, only_from=(JobState.HELD,)
    )
    if result.won:
        log.info("job_released", job_id=job_id, source=source)

        kick_dispatch()
    return result


def _jobs_move(
    ids: list[int], target: str, sources: Sequence[str], *, source: str, reason: str
) -> int:
    moved = apply_transition_chunked(
        Job, ids, target, from_states=sources, source=source, reason=reason
    )
    return sum(len(pks) for pks in moved.values())


@transaction.atomic
def jobs_hold(*, job_ids: Iterable[int], source: str, reason: str = "") -> int:
    """Hold many jobs: those defined or queued become held, the others are skipped.
    Returns how many were held."""
    n = _jobs_move(
        list(job_ids),
        JobState.HELD,
        (JobState.DEFINED, JobState.QUEUED),
        source=source,
        reason=reason,
    )
    if n:
        log.info("jobs_held", count=n, source=source)
    return n


@transaction.atomic
def jobs_release(*, job_ids: Iterable[int], source: str, reason: str = "") -> int:
    """Release many jobs: those held become defined (the executor is kicked), the others are
    skipped. Returns how many were released."""
    n = _jobs_move(list(job_ids), JobState.DEFINED, (JobState.HELD,), source=source, reason=reason)
    if n:
        log.info("jobs_released", count=n, source=source)
        kick_dispatch()
    return n


def _kill_running_attempts(job_ids: list[int], *, now: Any, reason: str) -> int:
    """The running attempts of these (just cancelled) jobs: cancelled, and announced
    (``jobs.signals.attempts_to_kill``, in this transaction) so that each one's pilot gets a
    kill command. Three queries, whatever the number."""
    rows = list(
        JobAttempt.objects.filter(job_id__in=job_ids, state=AttemptState.RUNNING).values(
            "pk", "job_id", "job__uuid", "number", "pilot_id"
        )
    )
    if not rows:
        return 0
    JobAttempt.objects.filter(pk__in=[r["pk"] for r in rows]).update(
        state=AttemptState.CANCELLED, kill_requested_at=now, ended_at=now
    )
    attempts_to_kill.send(
        sender=JobAttempt,
        orders=[
            KillOrder(
                pilot_id=r["pilot_id"],
                job_id=r["job_id"],
                job_uuid=str(r["job__uuid"]),
                attempt=r["number"],
                reason=reason,
            )
            for r in rows
            if r["pilot_id"] is not None
        ],
    )
    return len(rows)


# --- the end of a pilot: its running attempts ---------------------------------------------------


@dataclass(frozen=True)
class InterruptResult:
    attempts: int = 0
    retried: int = 0
    failed: int = 0


@transaction.atomic
def attempts_interrupt(
    *,
    attempt_state: str,
    error_code: str,
    error_message: str,
    source: str,
    pilot_ids: Sequence[int] | None = None,
    pilot_states: Sequence[str] | None = None,
    attempt_ids: Sequence[int] | None = None,
    skip_locked: bool = False,
    limit: int = 10_000,
) -> InterruptResult:
    """End the running attempts of some pilots (by id, or every pilot in some states) without
    a report from them: ``attempt_state`` (``failed`` or ``lost``) with ``error_code``.
    ``attempt_ids`` narrows it to some of their attempts (``pilots.reconcile``: not on the pilot).

    Their jobs (locked ``FOR UPDATE``, ``SKIP LOCKED`` for the reaper) go back to ``defined``
    with ``cur_retry + 1`` while retries are left, else to ``failed``; the executor is kicked.
    A constant number of queries per call (at most ``limit`` jobs).
    """
    if pilot_ids is None and pilot_states is None:
        raise ValueError("attempts_interrupt needs pilot_ids or pilot_states")
    if attempt_state not in (AttemptState.FAILED, AttemptState.LOST):
        raise ValueError(f"attempt_state must be failed or lost, not {attempt_state!r}")
    # ONE filter() call: every condition on ``attempts`` applies to the same attempt row (a
    # second call would join attempts again and match a job by any of its old attempts).
    attempt_is: dict[str, Any] = {
        "attempts__state": AttemptState.RUNNING,
        "attempts__number": F("cur_retry"),
    }
    if pilot_ids is not None:
        attempt_is["attempts__pilot_id__in"] = list(pilot_ids)
    if pilot_states is not None:
        attempt_is["attempts__pilot__state__in"] = list(pilot_states)
    if attempt_ids is not None:
        attempt_is["attempts__id__in"] = list(attempt_ids)
    rows = list(
        Job.objects.filter(state=JobState.RUNNING, **attempt_is)
        .select_for_update(skip_locked=skip_locked, of=("self",))
        .order_by("id")
        .values_list("id", "cur_retry", "retries", "attempts__id")[:limit]
    )
    if not rows:
        return InterruptResult()
    now = timezone.now()
    n = JobAttempt.objects.filter(
        pk__in=[attempt for _, _, _, attempt in rows], state=AttemptState.RUNNING
    ).update(
        state=attempt_state,
        error_code=error_code,
        error_message=error_message,
        ended_at=now,
    )
    retry = [pk for pk, cur, allowed, _ in rows if cur < allowed]
    fail = [pk for pk, cur, allowed, _ in rows if cur >= allowed]
    apply_transition_bulk(
        Job,
        retry,
        JobState.DEFINED,
        from_state=JobState.RUNNING,
        source=source,
        reason=f"attempt {attempt_state} ({error_code}); retry",
        updates={"cur_retry": F("cur_retry") + 1},
        locked=True,
    )
    apply_transition_bulk(
        Job,
        fail,
        JobState.FAILED,
        from_state=JobState.RUNNING,
        source=source,
        reason=f"attempt {attempt_state} ({error_code}); no retry left",
        updates={"time_end": now},
        locked=True,
    )
    log.info(
        "attempts_interrupted",
        attempts=n,
        retried=len(retry),
        failed=len(fail),
        error_code=error_code,
        source=source,
    )
    if retry:
        kick_dispatch()
    if fail:
        kick_finalize_tasks(
            Job.objects.filter(pk__in=fail).order_by().values_list("task_id", flat=True).distinct()
        )
    return InterruptResult(attempts=n, retried=len(retry), failed=len(fail))


def jobs_set_rank(*, task_id: int, rank: int) -> int:
    """A task's new rank reaches its jobs not dispatched yet (``defined``, ``held``), so the
    change takes effect at their next dispatch. One UPDATE; returns the jobs changed."""
    return Job.objects.filter(task_id=task_id, state__in=(JobState.DEFINED, JobState.HELD)).update(
        rank=rank, updated_at=timezone.now()
    )


def jobs_retry_failed(*, task_id: int, source: str, reason: str) -> list[int]:
    """A task's failed jobs go back to ``defined`` for one more attempt each (``cur_retry``
    + 1, and ``retries`` raised to allow it), in the caller's transaction; their rows are
    locked. Returns their ids (the executor is kicked after commit when there are any)."""
    ids = list(
        Job.objects.select_for_update()
        .filter(task_id=task_id, state=JobState.FAILED)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    if not ids:
        return []
    apply_transition_bulk(
        Job,
        ids,
        JobState.DEFINED,
        from_state=JobState.FAILED,
        source=source,
        reason=reason,
        updates={
            "cur_retry": F("cur_retry") + 1,
            "retries": Greatest(F("retries"), F("cur_retry") + 1),
            "time_end": None,
        },
        locked=True,
    )
    kick_dispatch()
    return ids
