"""A task's state by hand (docs/lifecycle.md): transition, pause, resume, cancel (with its
jobs), and the retry of its failed jobs. Its end is decided by ``tasks.finalizer``."""

from __future__ import annotations

from typing import Any

import structlog
from django.db import transaction

from files.dsm import get_dsm
from jobs.control import jobs_cancel, jobs_retry_failed
from jobs.executor import unqueue_task
from jobs.models import OPEN_JOB_STATES, Job, JobState
from tasks.create import output_dataset_uid, register_output_dataset
from tasks.models import Task, TaskState, TaskTransition
from tasks.selectors import task_get
from wms.exceptions import Conflict, InvalidTransition, NotFound
from wms.kicks import kick_dispatch, kick_finalize, kick_split
from wms.statemachine import TransitionResult, apply_transition

log = structlog.get_logger(__name__)


def task_transition(
    *,
    task_id: int,
    target: str,
    source: str,
    reason: str = "",
    only_from: tuple[str, ...] | None = None,
) -> TransitionResult:
    """Apply one transition of the task state machine (409 if the map forbids it)."""
    result = apply_transition(
        Task, task_id, target, source=source, reason=reason, only_from=only_from
    )
    if result.won:
        log.info(
            "task_state_changed",
            task_id=task_id,
            from_state=result.from_state,
            to_state=target,
            source=source,
        )
    return result


@transaction.atomic
def task_pause(*, task_id: int, source: str, reason: str = "") -> TransitionResult:
    """→ paused: no new starts. The executor dispatches nothing more of the task, its
    ``queued`` jobs go back to ``defined`` and a start whose message was already on the
    broker is refused (``task_paused``); running jobs run to their end."""
    result = task_transition(task_id=task_id, target=TaskState.PAUSED, source=source, reason=reason)
    if result.won:
        unqueue_task(task_id, source=source, reason=f"task paused{': ' + reason if reason else ''}")
    return result


@transaction.atomic
def task_resume(*, task_id: int, source: str, reason: str = "") -> TransitionResult:
    """paused → running, and the splitter and executor are kicked. Only a paused task resumes:
    a defined task is started by the splitter, not by a resume."""
    result = task_transition(
        task_id=task_id,
        target=TaskState.RUNNING,
        source=source,
        reason=reason,
        only_from=(TaskState.PAUSED,),
    )
    if result.won:
        kick_split(task_id=task_id)
        kick_dispatch()
    return result


@transaction.atomic
def task_cancel(*, task_id: int, source: str, reason: str = "") -> TransitionResult:
    """Cancel a task and every job of it that is not final yet (idempotent; a finished or
    failed task answers 409). Its splitter stops (it only splits defined/running tasks); the
    output dataset is closed by :func:`tasks.finalizer.task_finalize` once no killed attempt
    may still write."""
    task_get(task_id=task_id)
    result = task_transition(
        task_id=task_id, target=TaskState.CANCELLED, source=source, reason=reason
    )
    jobs_cancel(
        job_ids=list(
            Job.objects.filter(
                task_id=task_id,
                state__in=OPEN_JOB_STATES,
            ).values_list("pk", flat=True)
        ),
        source=source,
        reason=reason or f"task {task_id} cancelled",
    )
    kick_finalize(task_id=task_id)
    return result


# --- retry of a task's failed jobs ---------------------------------------------------------------


def task_retry_failed(*, task_id: int, source: str, reason: str = "") -> int:
    """Every failed job of the task goes back to ``defined`` with one more retry allowed.

    Each job keeps its attempts; its next attempt is ``cur_retry + 1`` and ``retries`` grows so
    that it is allowed. A finished or failed task goes back to ``running`` (its end is decided
    again when the retried jobs end); a cancelled task answers 409. When the output dataset of
    an ended task is already closed in the DSM (a closed dataset takes no more files), a new
    output dataset is registered for the task and the retried jobs write there. Returns how
    many jobs were retried (0: nothing failed, nothing changes).

    The DSM first, outside any transaction: is the output dataset closed, and if so the new
    one (``<name>.<id>.out.r<n>``, n the task's runs so far; its uid made from the task and n,
    :func:`tasks.create.output_dataset_uid`) registered idempotently: a retry that failed after
    it, or one running at the same time, registers the same dataset again and finds it. Then ONE
    short transaction holding the task row; should the task's output have changed between the
    two (another retry, a close by the finalizer), the DSM is asked again (a few times).
    """
    for _ in range(3):
        task = task_get(task_id=task_id)
        if task.state == TaskState.CANCELLED:
            raise InvalidTransition(
                entity="task", pk=task_id, current=task.state, target=TaskState.RUNNING
            )
        new_output = None
        ended = task.state in (TaskState.FINISHED, TaskState.FAILED)
        if ended and task.data_out_uid is not None:
            if not Job.objects.filter(task_id=task_id, state=JobState.FAILED).exists():
                return 0
            new_output = _next_output_dataset(task)
        done = _retry_failed_locked(
            task_id,
            source=source,
            reason=reason,
            seen_output=(ended, task.data_out_uid, task.output_closed_at),
            new_output=new_output,
        )
        if done is not None:
            return done
    raise Conflict(f"Task {task_id} keeps changing: try its retry again.")


def _next_output_dataset(task: Task) -> Any:
    """The DSM's part of a retry: None while the task's output dataset is open, else the new
    output dataset (registered, or found registered by an earlier try)."""
    with get_dsm() as dsm:
        assert task.data_out_uid is not None
        if task.output_closed_at is None and dsm.get_dataset(task.data_out_uid).is_open:
            return None
        n = TaskTransition.objects.filter(subject_id=task.pk, to_state=TaskState.RUNNING).count()
        return register_output_dataset(
            dsm,
            f"{(task.name or 'task')[:180]}.{task.pk}",
            suffix=f".out.r{n}",
            location=task.data_out_url,
            uid=output_dataset_uid(task.pk, n),
        )


@transaction.atomic
def _retry_failed_locked(
    task_id: int, *, source: str, reason: str, seen_output: tuple[Any, ...], new_output: Any
) -> int | None:
    """The retry's writes, under the task row's lock; None (nothing written) when the task's
    output is not what the DSM was asked about."""
    task = Task.objects.select_for_update().filter(pk=task_id).first()
    if task is None:
        raise NotFound(f"Task {task_id} does not exist.")
    if task.state == TaskState.CANCELLED:
        raise InvalidTransition(
            entity="task", pk=task_id, current=task.state, target=TaskState.RUNNING
        )
    ended = task.state in (TaskState.FINISHED, TaskState.FAILED)
    if (ended, task.data_out_uid, task.output_closed_at) != seen_output:
        return None  # another retry or the finalizer got there first: look again
    why = reason or f"retry of the failed jobs of task {task_id} ({source})"
    ids = jobs_retry_failed(task_id=task_id, source=source, reason=why)
    if not ids:
        return 0
    if ended:
        task_transition(task_id=task_id, target=TaskState.RUNNING, source=source, reason=why)
        if task.data_out_uid is not None:
            changes: dict[str, Any] = {"output_closed_at": None}
            if new_output is not None:
                changes["data_out_uid"] = new_output.uid
            Task.objects.filter(pk=task_id).update(**changes)
    log.info("task_failed_jobs_retried", task_id=task_id, jobs=len(ids), source=source)
    return len(ids)
