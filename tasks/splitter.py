"""The splitter: a running task's input files become jobs, ``files_per_job`` files per job.

Run by beat every few seconds (``wms.split``) and kicked on commit when a task is created or one of
its input datasets gains files or closes. For each task it goes through the task's series of input
datasets (``TaskInput``, in order): for each input not yet done it reads the files after the
input's ``split_cursor`` from the DSM page by page, OUTSIDE any transaction (a slow external DSM
never keeps a row locked: a cancel or pause of the task does not wait for it), and writes each
page's jobs and their input FILE_DAT rows in bulk in one short transaction that holds the task row
(``FOR UPDATE SKIP LOCKED``) and moves the cursor by compare-and-set: two splitters never both
write a page, and a task paused or cancelled meanwhile gets no more jobs. A job's files come from
one dataset. The unique constraint ``file_one_job_per_input`` is the last line of defence: an input
file can never get two jobs in one task. A trailing group smaller than ``files_per_job`` waits
until its dataset is closed (more files may come to fill it); an input is done once its dataset is
closed and every file of it has a job.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from files.build import NewFile
from files.dsm import MAX_PAGE_SIZE, DSMClient, FileInfo, get_dsm
from files.models import FileStatus, FileType
from jobs.build import JobSpec, jobs_build
from tasks.inputs import task_follow_selection
from tasks.models import Task, TaskInput, TaskState
from wms.choices import TransitionSource
from wms.exceptions import WMSError
from wms.kicks import kick_dispatch, kick_split
from wms.statemachine import apply_transition
from wms.switches import service_tick, switch_enabled

log = structlog.get_logger(__name__)

SPLITTABLE_STATES = (TaskState.DEFINED, TaskState.RUNNING)


@dataclass(frozen=True)
class SplitResult:
    task_id: int
    jobs: int = 0
    files: int = 0
    more: bool = False  # stopped at the per-run bound; run again


def _entry_ids(dsm: DSMClient, info, files: list[FileInfo]) -> tuple[int, dict[int, int]]:
    """Local dataset id and DSM file id → local catalogue entry id."""
    return dsm.catalogue_entries(info, files)


def job_spec(task: Task) -> JobSpec:
    """What the task's map jobs are."""
    return JobSpec(
        task_id=task.pk,
        executable=task.executable,
        args=task.args,
        rank=task.rank,
        retries=task.max_retries,
        device_type=task.device_type,
        mode=task.mode,
    )


def _create_jobs(task: Task, groups: list[list[FileInfo]], dataset_id: int, entry_of) -> int:
    """One job per group and one input FILE_DAT row per file, in bulk (``jobs.build``)."""
    ready, input_type = FileStatus.READY, FileType.INPUT
    inputs = [
        [
            NewFile(
                f.name,
                input_type,
                f.size,
                ready,
                f.check_sum,
                f.url,
                None,
                task.pk,
                dataset_id,
                entry_of[f.id],
            )
            for f in group
        ]
        for group in groups
    ]
    return len(jobs_build(spec=job_spec(task), inputs=inputs))


def task_split(*, task_id: int, dsm: DSMClient | None = None) -> SplitResult:
    """Give jobs to the input files of one task that have none yet (idempotent)."""
    own = dsm is None
    dsm = dsm or get_dsm()
    try:
        return _split(task_id, dsm)
    finally:
        if own:
            dsm.close()


def _split(task_id: int, dsm: DSMClient) -> SplitResult:
    if not switch_enabled("splitter"):
        return SplitResult(task_id=task_id)
    task = Task.objects.filter(
        pk=task_id, state__in=SPLITTABLE_STATES, splitter_enabled=True
    ).first()
    if task is None:  # not splittable now
        return SplitResult(task_id=task_id)
    if task.data_in_follow:  # datasets that came to match the selection join the series
        try:
            task_follow_selection(task_id=task.pk, dsm=dsm)
        except WMSError as exc:  # the DSM's trouble: split what the task has, look again later
            log.warning(
                "task_follow_failed", task_id=task.pk, error=exc.code, detail=str(exc.detail)
            )
    # The series, in order: every input not yet done gets jobs for the files it has now. An
    # open dataset never holds up the ones after it; its files get jobs as they arrive.
    budget = settings.WMS_SPLIT_MAX_JOBS_PER_RUN
    jobs_made = files_used = 0
    more = False
    for task_input in TaskInput.objects.filter(task_id=task.pk, split_done_at__isnull=True):
        if jobs_made >= budget:
            more = True
            break
        made, used, input_more, lost = _split_input(task, task_input, dsm, budget - jobs_made)
        jobs_made += made
        files_used += used
        more = more or input_more
        if lost:  # another splitter moved on, or the task stopped being splittable
            break
    if task.state == TaskState.DEFINED:
        _start(task.pk)
    if jobs_made:
        log.info("task_split", task_id=task.pk, jobs=jobs_made, files=files_used, more=more)

        kick_dispatch()
        if more:
            kick_split(task_id=task.pk)
    return SplitResult(task_id=task.pk, jobs=jobs_made, files=files_used, more=more)


def _start(task_id: int) -> None:
    """defined → running, once the splitter has been through the task (even with no job yet).
    Under the task row's lock, and only from defined: a task paused or cancelled meanwhile
    stays so."""
    with transaction.atomic():
        if (
            Task.objects.select_for_update(skip_locked=True)
            .filter(pk=task_id, state=TaskState.DEFINED, splitter_enabled=True)
            .exists()
        ):
            apply_transition(
                Task,
                task_id,
                TaskState.RUNNING,
                source=TransitionSource.SPLITTER,
                reason="splitter started the task",
                only_from=(TaskState.DEFINED,),
            )


def _split_input(
    task: Task, task_input: TaskInput, dsm: DSMClient, budget: int
) -> tuple[int, int, bool, bool]:
    """Jobs for the files of one input dataset after its cursor: (jobs, files, more, lost).

    The DSM is read OUTSIDE any transaction (an external DSM may be slow: no row lock waits on
    it); each page's jobs are then written in one short transaction that holds the task row
    (``FOR UPDATE SKIP LOCKED``) and moves the input's cursor by compare-and-set
    (:func:`_commit_groups`). ``lost``: that failed, this run stops and the other writer's
    work stands.

    The dataset's state is read BEFORE its files: if it was closed then, the listing that
    follows is complete, a short trailing group may be made into a job, and once every file
    has a job the input is done (``split_done_at``).
    """
    info = dsm.get_dataset(task_input.dataset_uid)
    closed = not info.is_open
    per_job = task.files_per_job
    # Groups may span pages: what a page leaves over is carried into the next one.
    page_size = max(1, min(settings.WMS_SPLIT_PAGE, MAX_PAGE_SIZE))
    used = task_input.split_cursor  # the last file that has a job: persisted
    read = used  # the last file read in this run
    carry: list[FileInfo] = []  # read but not used: a short group waiting for more files
    jobs_made = files_used = 0
    more = False
    while True:
        page = dsm.list_files(task_input.dataset_uid, after=read, limit=page_size)
        if page.files:
            read = page.files[-1].id
        last_page = page.next_cursor is None
        batch = carry + page.files
        n_full = len(batch) // per_job * per_job
        take = batch if (last_page and closed) else batch[:n_full]
        carry = batch[len(take) :]
        done = last_page and closed  # closed when read, and every file read gets a job now
        if take or done:
            groups = [take[i : i + per_job] for i in range(0, len(take), per_job)]
            new_used = take[-1].id if take else used
            if not _commit_groups(task, task_input, dsm, info, groups, used, new_used, done):
                return jobs_made, files_used, False, True
            jobs_made += len(groups)
            files_used += len(take)
            used = new_used
        if last_page:
            break
        if jobs_made >= budget:
            more = True
            break
    return jobs_made, files_used, more, False


def _commit_groups(
    task: Task,
    task_input: TaskInput,
    dsm: DSMClient,
    info,
    groups: list[list[FileInfo]],
    expected: int | None,
    new_cursor: int | None,
    done: bool,
) -> bool:
    """Write one page's jobs and move the input's cursor, all or nothing. False (nothing
    written) when the task is not splittable any more, another splitter holds it, or the
    cursor is not where this run read it from."""
    with transaction.atomic():
        if not (
            Task.objects.select_for_update(skip_locked=True)
            .filter(pk=task.pk, state__in=SPLITTABLE_STATES, splitter_enabled=True)
            .exists()
        ):
            return False
        changes: dict = {"split_cursor": new_cursor}
        if done:
            changes["split_done_at"] = timezone.now()
        moved = TaskInput.objects.filter(
            pk=task_input.pk, split_cursor=expected, split_done_at__isnull=True
        ).update(**changes)
        if not moved:
            return False
        if groups:
            take = [f for group in groups for f in group]
            dataset_id, entry_of = _entry_ids(dsm, info, take)
            _create_jobs(task, groups, dataset_id, entry_of)
    if done:
        log.info(
            "task_input_split_done",
            task_id=task.pk,
            position=task_input.position,
            dataset_uid=str(task_input.dataset_uid),
            files=info.file_count,
        )
    return True


def split_all(*, beat: bool = False) -> list[SplitResult]:
    """One splitter cycle over every splittable task (the beat's entry point).

    ``beat=True`` first claims the cycle (``service_tick``), so two beats never double-run it.
    """
    if beat and not service_tick("splitter", min_interval=settings.WMS_SPLIT_EVERY / 2):
        return []
    if not switch_enabled("splitter"):
        return []
    ids = list(
        Task.objects.filter(state__in=SPLITTABLE_STATES, splitter_enabled=True)
        .order_by("-rank", "id")
        .values_list("id", flat=True)
    )
    results = []
    dsm = get_dsm()
    try:
        for task_id in ids:
            try:
                results.append(task_split(task_id=task_id, dsm=dsm))
            except WMSError as exc:  # one task's DSM trouble must not stop the others
                log.warning("task_split_failed", task_id=task_id, error=exc.code, detail=str(exc))
    finally:
        dsm.close()
    return results
