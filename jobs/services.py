"""Every write to jobs and their attempts goes through here."""

from __future__ import annotations

from collections.abc import Iterable

import structlog
from django.db import transaction
from django.utils import timezone

from jobs.models import AttemptState, Job, JobAttempt, JobState
from tasks.models import Task
from wms.exceptions import NotFound
from wms.statemachine import TransitionResult, apply_transition, apply_transition_bulk

log = structlog.get_logger(__name__)


@transaction.atomic
def job_create(
    *,
    task: Task,
    parent_job: Job | None = None,
    mode: str | None = None,
    args: str | None = None,
) -> Job:
    """One job of a task, inheriting the task's executable, args, rank, device and retries.

    The splitter creates jobs in bulk; this is the single path (merge jobs, admin, tests).
    """
    job = Job.objects.create(
        task=task,
        parent_job=parent_job,
        executable=task.executable,
        args=task.args if args is None else args,
        rank=task.rank,
        retries=task.max_retries,
        device_type=task.device_type,
        mode=mode or task.mode,
    )
    log.info("job_created", job_id=job.pk, task_id=task.pk)
    return job


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

    A running attempt is marked cancelled with the time the kill was asked for; the kill
    command to the pilot is sent by the pilot side (see DESIGN.md section 5).
    """
    if not Job.objects.filter(pk=job_id).exists():
        raise NotFound(f"Job {job_id} does not exist.")
    now = timezone.now()
    result = apply_transition(
        Job, job_id, JobState.CANCELLED, source=source, reason=reason, updates={"time_end": now}
    )
    if result.won and result.from_state == JobState.RUNNING:
        JobAttempt.objects.filter(job_id=job_id, state=AttemptState.RUNNING).update(
            state=AttemptState.CANCELLED, kill_requested_at=now, ended_at=now
        )
    if result.won:
        log.info("job_cancelled", job_id=job_id, from_state=result.from_state, source=source)
    return result


@transaction.atomic
def jobs_cancel(*, job_ids: Iterable[int], source: str, reason: str = "") -> int:
    """Cancel many jobs in bulk; jobs already final are skipped. Returns how many were cancelled.

    Per chunk: the rows are locked (``FOR UPDATE``, waiting for a pilot's start in flight),
    then one UPDATE + one bulk insert of transition rows per source state, and one UPDATE of
    the running attempts. A constant number of queries per 5,000 jobs.
    """
    ids = list(job_ids)
    now = timezone.now()
    cancelled = 0
    open_states = (JobState.DEFINED, JobState.QUEUED, JobState.RUNNING)
    for start in range(0, len(ids), 5000):
        rows = list(
            Job.objects.select_for_update()
            .filter(pk__in=ids[start : start + 5000], state__in=open_states)
            .order_by("pk")
            .values_list("pk", "state")
        )
        by_state: dict[str, list[int]] = {}
        for pk, state in rows:
            by_state.setdefault(state, []).append(pk)
        for state, pks in by_state.items():
            cancelled += len(
                apply_transition_bulk(
                    Job,
                    pks,
                    JobState.CANCELLED,
                    from_state=state,
                    source=source,
                    reason=reason,
                    updates={"time_end": now},
                    locked=True,
                )
            )
        running = by_state.get(JobState.RUNNING, [])
        if running:
            JobAttempt.objects.filter(job_id__in=running, state=AttemptState.RUNNING).update(
                state=AttemptState.CANCELLED, kill_requested_at=now, ended_at=now
            )
    if cancelled:
        log.info("jobs_cancelled", count=cancelled, source=source)
    return cancelled
