"""The end of a task (docs/lifecycle.md): a running task whose work is done ends
(finished or failed), and the output dataset of an ended task is closed; the merger
(``tasks.merger``) runs first in each look at a merging task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from files.dsm import get_dsm
from files.services import files_mark_partial
from jobs.models import OPEN_JOB_STATES, Job, JobState
from jobs.selectors import task_kills_pending
from tasks.merger import task_merge_locked
from tasks.models import ENDED_TASK_STATES, Task, TaskInput, TaskState
from tasks.selectors import task_job_counts
from wms.choices import TransitionSource
from wms.exceptions import WMSError
from wms.statemachine import apply_transition
from wms.switches import service_tick, switch_enabled

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class FinalizeResult:
    task_id: int
    state: str = ""  # the state the task was moved to ("" if it was not moved)
    output_closed: bool = False
    waiting: str = ""  # why nothing (more) was done, for logs and tests


def _kills_pending(task_id: int) -> bool:
    """Is a killed attempt of this task possibly still running? (``jobs.selectors``)"""
    return task_kills_pending(task_id=task_id)


def _input_fully_split(task: Task, dsm: Any) -> tuple[bool, str]:
    """Is every input dataset of the task closed, with every one of its files given a job?
    (Never while the task follows its selection: more datasets may come.)

    An input the splitter marked done (``split_done_at``) costs nothing. For any other, the
    dataset's state is read before its files (a closed dataset takes no more files), then ONE
    listing after the input's split cursor: nothing there means the splitter reached its end.
    """
    if task.data_in_follow:
        return False, "following its dataset selection"
    for task_input in TaskInput.objects.filter(task_id=task.pk, split_done_at__isnull=True):
        info = dsm.get_dataset(task_input.dataset_uid)
        if info.is_open:
            return False, "input dataset open"
        page = dsm.list_files(task_input.dataset_uid, after=task_input.split_cursor, limit=1)
        if page.files:
            return False, "input files without a job"
    return True, ""


def _end_counts(task_id: int) -> tuple[int, dict[str, int]]:
    counts = task_job_counts(task_id=task_id)
    return sum(counts.values()), counts


def task_finalize(*, task_id: int, dsm: Any = None) -> FinalizeResult:
    """End a running task whose work is done, and close the output dataset of an ended task.

    1. A ``running`` task ends when every one of its input datasets is closed, every input
       file has a job (each input's split cursor is at its dataset's last file), every job
       is final and no killed attempt may still run: ``failed`` when more than
       ``max_failed_fraction`` of its jobs failed (0: any), else ``finished``. The counts go
       into ``jobs_finished``, ``jobs_failed``, ``jobs_cancelled`` and the transition's reason.
    2. An ended task (finished, failed, cancelled) whose output dataset is still open: once no
       job of it is queued/running/held and no killed attempt may still write, the outputs of
       a cancelled task are marked ``partial``, and the dataset is closed in the DSM with its
       file count and size in the reason; ``output_closed_at`` records it.

    Idempotent and safe to run twice at once: the task row is held ``FOR UPDATE SKIP LOCKED``
    (a task being split, retried or finalized elsewhere is skipped; the beat comes back).
    """
    own = dsm is None
    dsm = dsm or get_dsm()
    try:
        # The DSM is asked first, outside any transaction (docs/architecture.md, "Who writes
        # what"): whether the inputs are closed and fully split is read without the task's
        # lock, which is safe because it only ever turns true (a closed dataset takes no more
        # files, a split cursor only moves on).
        task = Task.objects.filter(pk=task_id).first()
        if task is None:
            return FinalizeResult(task_id=task_id, waiting="locked or gone")
        split = (
            _input_fully_split(task, dsm)
            if task.state == TaskState.RUNNING
            else (False, "not running")
        )
        with transaction.atomic():
            result, closing = _finalize_locked(task_id, split)
        if closing is None:
            return result
        return _close_output(task_id, closing, dsm, result)
    finally:
        if own:
            dsm.close()


@dataclass(frozen=True)
class _Closing:
    """An output dataset the locked pass claimed for closing (``output_closed_at`` set)."""

    uid: Any
    state: str
    claimed_at: Any


def _close_output(
    task_id: int, closing: _Closing, dsm: Any, result: FinalizeResult
) -> FinalizeResult:
    """Close the claimed output dataset in the DSM, outside any transaction. The claim came
    first, so a retry of the task's failed jobs, meanwhile, registers a new output dataset
    instead of writing into this one. Should the DSM fail, the claim is taken back (the next
    cycle tries again) and the error goes up."""
    try:
        info = dsm.get_dataset(closing.uid)
        reason = f"task {task_id} {closing.state}: {info.file_count} files, {info.total_size} bytes"
        if info.is_open:
            info = dsm.close_dataset(closing.uid, source="system", reason=reason)
    except BaseException:
        Task.objects.filter(
            pk=task_id, data_out_uid=closing.uid, output_closed_at=closing.claimed_at
        ).update(output_closed_at=None)
        raise
    log.info(
        "task_output_closed",
        task_id=task_id,
        dataset_uid=str(closing.uid),
        files=info.file_count,
        size=info.total_size,
    )
    return FinalizeResult(task_id=task_id, state=result.state, output_closed=True)


def _finalize_locked(
    task_id: int, split: tuple[bool, str]
) -> tuple[FinalizeResult, _Closing | None]:
    if not switch_enabled("finalizer"):
        return FinalizeResult(task_id=task_id, waiting="finalizer switched off"), None
    task = Task.objects.select_for_update(skip_locked=True).filter(pk=task_id).first()
    if task is None:
        return FinalizeResult(task_id=task_id, waiting="locked or gone"), None
    moved = ""
    if task.state == TaskState.RUNNING and task.merge_group_size:
        # The merger first (tasks.merger): a merge it creates is an open job, so the task
        # never ends while a merge can still be created.
        def level0_complete() -> bool:
            return split[0]

        task_merge_locked(task=task, level0_complete=level0_complete)
    if task.state == TaskState.RUNNING:
        if Job.objects.filter(task_id=task_id, state__in=OPEN_JOB_STATES).exists():
            return FinalizeResult(task_id=task_id, waiting="jobs not final"), None
        if _kills_pending(task_id):
            return FinalizeResult(task_id=task_id, waiting="killed attempts not ended"), None
        done, why = split
        if not done:
            return FinalizeResult(task_id=task_id, waiting=why), None
        total, counts = _end_counts(task_id)
        n_fin, n_fail, n_canc = (
            counts[JobState.FINISHED],
            counts[JobState.FAILED],
            counts[JobState.CANCELLED],
        )
        failed = total > 0 and n_fail / total > task.max_failed_fraction
        if failed:
            rule = f"more than {task.max_failed_fraction:g} of the jobs failed"
        else:
            rule = f"failed jobs within {task.max_failed_fraction:g}"
        if task.merge_groups_failed:
            failed = True
            rule += (
                f"; {task.merge_groups_failed} merge group(s) not merged "
                "(a member failed, rule fail)"
            )
        target = TaskState.FAILED if failed else TaskState.FINISHED
        reason = f"{total} jobs: {n_fin} finished, {n_fail} failed, {n_canc} cancelled ({rule})"
        apply_transition(
            Task,
            task_id,
            target,
            source=TransitionSource.SYSTEM,
            reason=reason,
            updates={
                "jobs_finished": n_fin,
                "jobs_failed": n_fail,
                "jobs_cancelled": n_canc,
            },
        )
        log.info(
            "task_ended",
            task_id=task_id,
            state=target,
            jobs=total,
            finished=n_fin,
            failed=n_fail,
            cancelled=n_canc,
        )
        task.state = moved = target
    if task.state not in ENDED_TASK_STATES or task.output_closed_at is not None:
        return FinalizeResult(task_id=task_id, state=moved, waiting=""), None
    if task.data_out_uid is None:
        return FinalizeResult(task_id=task_id, state=moved, waiting="no output dataset"), None
    # Never close while a job may still write into the dataset.
    if Job.objects.filter(task_id=task_id, state__in=OPEN_JOB_STATES).exists():
        return FinalizeResult(task_id=task_id, state=moved, waiting="jobs not final"), None
    if _kills_pending(task_id):
        return FinalizeResult(
            task_id=task_id, state=moved, waiting="killed attempts not ended"
        ), None
    # Claimed for closing (output_closed_at set) in this transaction; the DSM closes it after
    # commit (_close_output).
    now = timezone.now()
    updates: dict[str, Any] = {"output_closed_at": now}
    if task.state == TaskState.CANCELLED:
        # What the task produced before its cancel is kept in the dataset, marked partial.
        files_mark_partial(task_id=task_id)
        total, counts = _end_counts(task_id)
        updates.update(
            jobs_finished=counts[JobState.FINISHED],
            jobs_failed=counts[JobState.FAILED],
            jobs_cancelled=counts[JobState.CANCELLED],
        )
    Task.objects.filter(pk=task_id).update(updated_at=now, **updates)
    closing = _Closing(uid=task.data_out_uid, state=task.state, claimed_at=now)
    return FinalizeResult(task_id=task_id, state=moved), closing


def tasks_finalize_all(*, beat: bool = False) -> list[FinalizeResult]:
    """One finalizer cycle (beat ``wms.finalize_tasks``): every running task with no open job,
    and every ended task whose output dataset is still open."""
    if beat and not service_tick("finalizer", min_interval=settings.WMS_FINALIZE_EVERY / 2):
        return []
    if not switch_enabled("finalizer"):
        return []
    open_jobs = Job.objects.filter(task_id=OuterRef("pk"), state__in=OPEN_JOB_STATES)
    ids = list(
        Task.objects.filter(
            Q(state=TaskState.RUNNING)
            | Q(
                state__in=ENDED_TASK_STATES,
                output_closed_at__isnull=True,
                data_out_uid__isnull=False,
            )
        )
        .exclude(Exists(open_jobs))
        .values_list("id", flat=True)
    )
    # A merging task is looked at while it still has open jobs: full groups merge at once.
    ids = sorted(
        {
            *ids,
            *Task.objects.filter(state=TaskState.RUNNING, merge_group_size__gt=0).values_list(
                "id", flat=True
            ),
        }
    )
    results = []
    dsm = get_dsm()
    try:
        for task_id in ids:
            try:
                results.append(task_finalize(task_id=task_id, dsm=dsm))
            except WMSError as exc:  # one task's DSM trouble must not stop the others
                log.warning(
                    "task_finalize_failed", task_id=task_id, error=exc.code, detail=str(exc)
                )
    finally:
        dsm.close()
    return results
