"""The files of pilots' final reports (``jobs.reports``): registered in their tasks' output
datasets through the DSM before the report's transaction (:func:`outputs_register`), then,
in it, FILE_DAT rows and the jobs' ``file_out`` / ``file_log`` (:func:`store_files`)."""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import structlog

from files.build import NewFile, files_build
from files.dsm import get_dsm
from files.models import Dataset, DatasetEntry, FileStatus, FileType
from jobs.models import Job
from wms import db
from wms.contract import StatusEvent
from wms.exceptions import Conflict, DatasetClosed, NotFound, ValidationFailed, WMSError

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
                dataset_uid=job["task__data_out_uid"],
            )
        )
    return rows


@dataclass
class Registered:
    """What the DSM holds of a batch's files, asked before the batch's transaction
    (:func:`outputs_register`): (dataset uid, name) → local catalogue entry id (None with an
    external DSM, whose ids are not the local catalogue's), and the files it refused."""

    entries: dict[tuple[uuid.UUID, str], int | None] = field(default_factory=dict)
    failed: set[tuple[uuid.UUID, str]] = field(default_factory=set)
    # output dataset uid → its row in the local catalogue (None if it has none, as the
    # ``http`` DSM's datasets may not)
    dataset_ids: dict[uuid.UUID, int | None] = field(default_factory=dict)

    def holds(self, key: tuple[uuid.UUID, str]) -> bool:
        return key in self.entries or key in self.failed


class RegistrationStale(WMSError):
    """A report's files must be registered where the registration made before the
    transaction did not put them (the task's output dataset changed, or the attempt started
    meanwhile): the transaction is rolled back and the batch is prepared again."""

    code = "try_again"
    status = 503
    default_detail = "The report's outputs changed place while it was applied; send it again."


def outputs_register(files: list[FileRow]) -> Registered:
    """Register the files to be registered in their tasks' output datasets through the DSM,
    one call per dataset; called OUTSIDE any transaction, before the one that writes the
    reports (a DSM is another service: its answer must not be waited for under row locks,
    and a rollback of ours cannot undo its write). Idempotent: a name already there (a report
    sent again after its transaction failed, or a write whose answer was lost) is taken as
    registered, with its entry id read from the local catalogue. A closed or missing dataset,
    or files it refuses, are recorded as failed: their FILE_DAT rows become ``failed``."""
    done = Registered()
    by_dataset: dict[uuid.UUID, dict[str, FileRow]] = defaultdict(dict)
    for f in files:
        if f.register and f.dataset_uid is not None:
            by_dataset[f.dataset_uid].setdefault(f.name, f)
    if not by_dataset:
        return done
    done.dataset_ids = dict.fromkeys(by_dataset)
    done.dataset_ids.update(
        Dataset.objects.filter(**db.in_values("uid", by_dataset)).values_list("uid", "id")
    )
    dsm = get_dsm()
    try:
        local = dsm.catalogue_is_local
        for uid, group in by_dataset.items():
            specs = [
                {"name": f.name, "size": f.size, "check_sum": f.check_sum, "url": f.url}
                for f in group.values()
            ]
            try:
                infos: list[tuple[int | None, str]] = [
                    (info.id, info.name) for info in dsm.register_files(uid, specs)
                ]
            except (DatasetClosed, ValidationFailed, NotFound) as exc:
                log.error("outputs_not_registered", dataset_uid=str(uid), detail=str(exc.detail))
                done.failed.update((uid, name) for name in group)
                continue
            except Conflict:
                infos = _register_one_by_one(dsm, uid, specs, done, local=local)
            for entry_id, name in infos:
                done.entries[(uid, name)] = entry_id if local else None
    finally:
        dsm.close()
    return done


def _register_one_by_one(
    dsm: Any, uid: uuid.UUID, specs: list[dict[str, Any]], done: Registered, *, local: bool
) -> list[tuple[int | None, str]]:
    """A batch some of whose names the dataset already holds: each file on its own; a name
    already there is taken as registered (its local entry, if the catalogue is ours)."""
    infos: list[tuple[int | None, str]] = []
    taken: dict[str, dict[str, Any]] = {}
    for spec in specs:
        try:
            infos.extend((info.id, info.name) for info in dsm.register_files(uid, [spec]))
        except Conflict:
            taken[spec["name"]] = spec
        except (DatasetClosed, ValidationFailed, NotFound) as exc:
            log.error(
                "output_not_registered",
                dataset_uid=str(uid),
                name=spec["name"],
                detail=str(exc.detail),
            )
            done.failed.add((uid, spec["name"]))
    if not taken:
        return infos
    found: dict[str, tuple[int, int, str]] = {}
    if local:
        found = {
            name: (pk, size, check_sum)
            for pk, name, size, check_sum in DatasetEntry.objects.filter(
                dataset__uid=uid, name__in=list(taken)
            ).values_list("pk", "name", "size", "check_sum")
        }
    for name, spec in taken.items():
        pk, size, check_sum = found.get(name, (None, None, None))
        if local and (size, check_sum) != (spec["size"], spec["check_sum"]):
            log.warning(
                "output_registered_differently",
                dataset_uid=str(uid),
                name=name,
                registered={"size": size, "check_sum": check_sum},
                reported={"size": spec["size"], "check_sum": spec["check_sum"]},
            )
        else:
            log.info("output_already_registered", dataset_uid=str(uid), name=name)
        infos.append((pk, name))
    return infos


def store_files(files: list[FileRow], now: Any, registered: Registered) -> None:
    """FILE_DAT rows of reported files (one INSERT) and the jobs' ``file_out`` / ``file_log``
    (one UPDATE, two when some jobs have a log and no output), in the caller's transaction.
    The files to register in their tasks' output datasets were registered before it
    (:func:`outputs_register`, ``registered``); one the registration did not cover raises
    :class:`RegistrationStale` (the transaction is rolled back, the batch prepared again)."""
    dataset_ids = registered.dataset_ids
    for f in files:
        if f.register and f.dataset_uid is not None:
            key = (f.dataset_uid, f.name)
            if not registered.holds(key):
                raise RegistrationStale()
            if key in registered.failed:
                f.status = FileStatus.FAILED
    entries = registered.entries
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
