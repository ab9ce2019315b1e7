"""The one place Job rows are built: :func:`jobs_build`, in bulk, with their input FILE_DAT rows.

Its callers are the splitter (map jobs, 10^5 at a time) and the merger (merge jobs): they say
what the jobs are (:class:`JobSpec`, values they read from their task) and which files each one
reads (``files.build.NewFile`` rows without a job: this module gives them theirs); the input
rows themselves are built by ``files.build.files_build``.

On PostgreSQL the job ids are taken from the table's sequence in one query, the input rows
written first (they name their jobs; the foreign keys are checked at commit), then the jobs
streamed with ``COPY`` carrying their first input (``file_in_id``). Elsewhere the jobs are
inserted with ``bulk_create``, then their inputs, then every job's ``file_in`` is set by ONE
UPDATE. The caller runs this in its own transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from django.conf import settings
from django.db.models import OuterRef, Subquery
from django.utils import timezone

from files.build import NewFile, files_build
from files.models import File, FileType
from jobs.models import Job, JobState
from wms import db
from wms.choices import DeviceType, Mode


@dataclass(frozen=True)
class JobSpec:
    """What the jobs of one :func:`jobs_build` call are (the same for all of them)."""

    task_id: int
    executable: str
    args: str = ""
    rank: int = 0
    retries: int = 3
    device_type: str = DeviceType.CPU
    mode: str = Mode.MAP
    level: int = 0  # 0: a map job; 1, 2, ...: a merge job of that level
    parent_job_id: int | None = None


_JOB_COLUMNS = (
    "id",
    "uuid",
    "task_id",
    "parent_job_id",
    "file_in_id",
    "executable",
    "args",
    "rank",
    "state",
    "retries",
    "cur_retry",
    "device_type",
    "mode",
    "level",
    "created_at",
    "updated_at",
    "state_changed_at",
)


def jobs_build(
    *,
    spec: JobSpec,
    inputs: Sequence[Sequence[NewFile]],
    children: Sequence[Sequence[int]] | None = None,
) -> list[int]:
    """One ``defined`` job per item of ``inputs`` (its input files, maybe none), in bulk; the
    new jobs' ids in that order. Each input row's ``job_id`` is its new job's (the rows name
    their task themselves).

    ``children`` (merge jobs): for each new job, the jobs whose outputs it reads; they get it
    as their ``parent_job`` (one UPDATE per job, guarded by ``parent_job IS NULL``: a child
    merged already is an error, and nothing of the call stays)."""
    if not inputs:
        return []
    if children is not None and len(children) != len(inputs):
        raise ValueError("children must have one item per job")
    now = timezone.now()
    build = _copy_jobs if db.copy_supported() else _insert_jobs
    ids = build(spec, inputs, now)
    if children is not None:
        for job_id, kids in zip(ids, children, strict=True):
            if not kids:
                continue
            moved = Job.objects.filter(pk__in=kids, parent_job__isnull=True).update(
                parent_job_id=job_id, updated_at=now
            )
            if moved != len(kids):
                raise RuntimeError(f"a child of merge job {job_id} already has a parent")
    return ids


def _copy_jobs(spec: JobSpec, inputs: Sequence[Sequence[NewFile]], now) -> list[int]:
    ids = db.allocate_ids(Job, len(inputs))
    files: list[NewFile] = []
    owners: list[int] = []  # each row's job
    starts: list[int] = []  # index of each job's first input in ``files``
    for job_id, rows in zip(ids, inputs, strict=True):
        starts.append(len(files))
        files.extend(rows)
        owners.extend([job_id] * len(rows))
    file_ids = files_build(files, job_ids=owners, now=now)
    s = spec
    db.copy_rows(
        Job,
        _JOB_COLUMNS,
        (
            (
                job_id,
                uuid.uuid4(),
                s.task_id,
                s.parent_job_id,
                file_ids[start] if rows else None,
                s.executable,
                s.args,
                s.rank,
                JobState.DEFINED,
                s.retries,
                0,
                s.device_type,
                s.mode,
                s.level,
                now,
                now,
                now,
            )
            for job_id, start, rows in zip(ids, starts, inputs, strict=True)
        ),
    )
    return ids


def _insert_jobs(spec: JobSpec, inputs: Sequence[Sequence[NewFile]], now) -> list[int]:
    s = spec
    jobs = Job.objects.bulk_create(
        [
            Job(
                uuid=uuid.uuid4(),
                task_id=s.task_id,
                parent_job_id=s.parent_job_id,
                executable=s.executable,
                args=s.args,
                rank=s.rank,
                retries=s.retries,
                device_type=s.device_type,
                mode=s.mode,
                level=s.level,
                state=JobState.DEFINED,
                created_at=now,
                updated_at=now,
                state_changed_at=now,
            )
            for _ in inputs
        ],
        batch_size=settings.WMS_SPLIT_BATCH,
    )
    ids = [j.pk for j in jobs]
    files = [r for rows in inputs for r in rows]
    if files:
        owners = [job_id for job_id, rows in zip(ids, inputs, strict=True) for _ in rows]
        files_build(files, job_ids=owners, now=now, batch_size=settings.WMS_SPLIT_BATCH)
        # JOB_DAT.file_in_id: each new job's first input, set by ONE UPDATE.
        first_input = (
            File.objects.filter(job_id=OuterRef("pk"), type=FileType.INPUT)
            .order_by("id")
            .values("id")
        )
        Job.objects.filter(pk__in=ids).update(file_in=Subquery(first_input[:1]))
    return ids
