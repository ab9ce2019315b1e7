"""The files of pilots' final reports (``jobs.reports``): FILE_DAT rows, registered in
their tasks' output datasets through the DSM, and the jobs' ``file_out`` / ``file_log``."""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import structlog
from django.db.models import OuterRef, Subquery

from files.build import NewFile, files_build
from files.dsm import get_dsm
from files.models import Dataset, FileStatus, FileType
from jobs.models import Job, task_model
from wms import db
from wms.contract import StatusEvent
from wms.exceptions import Conflict, DatasetClosed, NotFound, ValidationFailed

log = structlog.get_logger(__name__)


@dataclass
class FileRow:
    job_id: int
    task_id: int
    name: str  # the name in FILE_DAT and, if registered, in the DSM
    type: str
    size: int
    check_sum: str
    url: str
    status: str
    register: bool  # into the task's output dataset
    started_at: Any
    dataset_uid: uuid.UUID | None = None


def event_files(
    ev: StatusEvent, job: dict[str, Any], started_at: Any, *, finished: bool
) -> list[FileRow]:
    """The FILE_DAT rows of a final report. A finished attempt's outputs and every log go to
    the task's output dataset; outputs of an attempt that did not finish are kept as
    ``partial`` rows only (a retry writes them again under the same names)."""
    rows = []
    for out in ev.outputs:
        is_log = out["type"] == FileType.LOG
        register = finished or is_log
        if is_log or not finished:
            name = f"{job['uuid']}/{ev.attempt}/{out['name']}"
        else:
            name = f"{job['uuid']}/{out['name']}"
        rows.append(
            FileRow(
                job_id=job["id"],
                task_id=job["task_id"],
                name=name,
                type=out["type"],
                size=out["size"],
                check_sum=out["check_sum"],
                url=out["url"],
                status=FileStatus.READY if register else FileStatus.PARTIAL,
                register=register,
                started_at=started_at,
            )
        )
    return rows


def _register_outputs(files: list[FileRow], now: Any) -> dict[tuple[uuid.UUID, str], int | None]:
    """Register the files in their tasks' output datasets through the DSM; one call per
    dataset. Returns (dataset uid, name) → local catalogue entry id (None with an external
    DSM, whose ids are not the local catalogue's). A closed dataset leaves its files
    ``failed``; a name already there (a write of an external DSM whose answer was lost) is
    taken as registered."""
    by_dataset: dict[uuid.UUID, list[FileRow]] = defaultdict(list)
    for f in files:
        if f.register and f.dataset_uid is not None:
            by_dataset[f.dataset_uid].append(f)
    entries: dict[tuple[uuid.UUID, str], int | None] = {}
    if not by_dataset:
        return entries
    dsm = get_dsm()
    try:
        local = dsm.catalogue_is_local

        def register(uid: uuid.UUID, specs: list[dict[str, Any]]) -> list[tuple[int, str]]:
            return [(info.id, info.name) for info in dsm.register_files(uid, specs)]

        for uid, group in by_dataset.items():
            specs = [
                {"name": f.name, "size": f.size, "check_sum": f.check_sum, "url": f.url}
                for f in group
            ]
            try:
                infos = register(uid, specs)
            except (DatasetClosed, ValidationFailed) as exc:
                log.error("outputs_not_registered", dataset_uid=str(uid), detail=str(exc.detail))
                for f in group:
                    f.status = FileStatus.FAILED
                continue
            except Conflict:
                infos = []
                for spec in specs:
                    try:
                        infos.extend(register(uid, [spec]))
                    except Conflict:
                        log.warning(
                            "output_already_registered", dataset_uid=str(uid), name=spec["name"]
                        )
            except NotFound:
                log.error("output_dataset_missing", dataset_uid=str(uid))
                for f in group:
                    f.status = FileStatus.FAILED
                continue
            for entry_id, name in infos:
                entries[(uid, name)] = entry_id if local else None
    finally:
        dsm.close()
    return entries


def store_files(files: list[FileRow], now: Any) -> None:
    """FILE_DAT rows of reported files (one INSERT), registered in the tasks' output datasets
    (one DSM call per dataset), and the jobs' ``file_out`` / ``file_log`` (one UPDATE, two
    when some jobs have a log and no output)."""
    # The task's output dataset, and its row in the local catalogue if there is one (the
    # ``http`` DSM's datasets may have none), in one query.
    local_dataset = Dataset.objects.filter(uid=OuterRef("data_out_uid")).values("id")[:1]
    dataset_ids: dict[uuid.UUID, int | None] = {}
    out_uids: dict[int, uuid.UUID | None] = {}
    for task_id, uid, dataset_id in (
        task_model()
        .objects.filter(pk__in={f.task_id for f in files})
        .annotate(out_dataset_id=Subquery(local_dataset))
        .values_list("id", "data_out_uid", "out_dataset_id")
    ):
        out_uids[task_id] = uid
        if uid is not None:
            dataset_ids[uid] = dataset_id
    for f in files:
        f.dataset_uid = out_uids.get(f.task_id)
    entries = _register_outputs(files, now)
    rows = files_build(
        [
            NewFile(
                file_name=f.name,
                type=f.type,
                size=f.size,
                status=f.status,
                check_sum=f.check_sum,
                url=f.url,
                job_id=f.job_id,
                task_id=f.task_id,
                dataset_id=dataset_ids.get(f.dataset_uid)
                if f.register and f.dataset_uid is not None
                else None,
                entry_id=entries.get((f.dataset_uid, f.name))
                if f.dataset_uid is not None
                else None,
                time_start=f.started_at,
                time_end=now,
            )
            for f in files
        ],
        now=now,
        batch_size=1000,
    )
    file_out: dict[int, int] = {}
    file_log: dict[int, int] = {}
    for f, row_id in zip(files, rows, strict=True):
        if f.type == FileType.LOG:
            file_log[f.job_id] = row_id
        elif f.status == FileStatus.READY:
            file_out.setdefault(f.job_id, row_id)
    both = [(j, out, file_log[j]) for j, out in file_out.items() if j in file_log]
    db.update_rows(Job, ("file_out", "file_log"), both)
    db.update_rows(Job, ("file_out",), [(j, o) for j, o in file_out.items() if j not in file_log])
    db.update_rows(Job, ("file_log",), [(j, lg) for j, lg in file_log.items() if j not in file_out])
