"""Every write to datasets, the catalogue and FILE_DAT goes through here."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import structlog
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone

from files.build import NewFile, files_build
from files.models import (
    Dataset,
    DatasetEntry,
    DatasetRole,
    DatasetState,
    File,
    FileStatus,
    FileType,
)
from files.storage import check_url_under, storage_roots
from wms import checksums, db
from wms.exceptions import Conflict, DatasetClosed, NotFound, ValidationFailed
from wms.kicks import kick_split_dataset
from wms.statemachine import TransitionResult, apply_transition

log = structlog.get_logger(__name__)


# The WMS names each task's output dataset "<task name>.<task id>.out" (".out.r<n>" when a
# retried task needs a new one): users may not register such names (docs/dsm.md, "Reserved
# names"), so nobody can claim the output dataset of a task to come.
_RESERVED_NAME = re.compile(r"\.out(\.r\d+)?\Z", re.IGNORECASE)


def is_reserved_name(name: str) -> bool:
    """Whether a dataset name is in the WMS's own namespace (its output datasets')."""
    return bool(_RESERVED_NAME.search(name))


@transaction.atomic
def dataset_register(
    *,
    name: str,
    role: str = DatasetRole.INPUT,
    location: str = "",
    uid: uuid.UUID | None = None,
    owner: AbstractBaseUser | None = None,
) -> Dataset:
    """Create an open dataset; a name or uid already taken is a 409.

    ``owner``: the user registering it (the API's caller); ``None`` for a dataset the system
    makes (a task's output dataset, internal code).
    """
    if not name or not name.strip():
        raise ValidationFailed({"name": ["This field may not be blank."]})
    if role not in DatasetRole.values:
        raise ValidationFailed({"role": [f"Must be one of {DatasetRole.values}."]})
    if (owner is not None or role != DatasetRole.OUTPUT) and is_reserved_name(name.strip()):
        raise ValidationFailed(
            {
                "name": [
                    "Names ending in '.out' (or '.out.r<n>') are reserved for the output "
                    "datasets the WMS makes for tasks: choose another name."
                ]
            }
        )
    fields: dict[str, Any] = {
        "name": name.strip(),
        "role": role,
        "location": location,
        "owner": owner,
    }
    if uid is not None:
        fields["uid"] = uid
    try:
        with transaction.atomic():
            ds = Dataset.objects.create(**fields)
    except IntegrityError as exc:
        raise Conflict(f"A dataset named {name!r} (or with this uid) already exists.") from exc
    log.info(
        "dataset_registered",
        dataset_uid=str(ds.uid),
        dataset=ds.name,
        role=role,
        owner=owner.get_username() if owner is not None else None,
    )
    return ds


_DATASET_SPEC_KEYS = frozenset({"name", "role", "location", "uid"})


@transaction.atomic
def datasets_register(
    *, specs: Iterable[Mapping[str, Any]], owner: AbstractBaseUser | None = None
) -> list[Dataset]:
    """Create several open datasets at once, all or none (e.g. a task's inputs and output).

    Each spec is ``{"name", "role"?, "location"?, "uid"?}``; names and uids may not repeat within
    the request (400) nor clash with an existing dataset (409). One INSERT per dataset. Every
    one of them gets ``owner`` (see ``dataset_register``).
    """
    specs = list(specs)
    if not specs:
        raise ValidationFailed({"datasets": ["At least one dataset is required."]})
    cleaned: list[dict[str, Any]] = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, Mapping):
            raise ValidationFailed({f"datasets[{i}]": ["Must be an object."]})
        unknown = set(spec) - _DATASET_SPEC_KEYS
        if unknown:
            raise ValidationFailed({f"datasets[{i}]": {k: ["Unknown field."] for k in unknown}})
        uid = spec.get("uid")
        if uid is not None and not isinstance(uid, uuid.UUID):
            try:
                uid = uuid.UUID(str(uid))
            except ValueError as exc:
                raise ValidationFailed({f"datasets[{i}]": {"uid": ["Must be a UUID."]}}) from exc
        cleaned.append(
            {
                "name": str(spec.get("name") or "").strip(),
                "role": spec.get("role") or DatasetRole.INPUT,
                "location": str(spec.get("location") or ""),
                "uid": uid,
            }
        )
    names = [c["name"] for c in cleaned]
    if len(set(names)) != len(names):
        raise ValidationFailed({"datasets": ["Dataset names repeat within the request."]})
    uids = [c["uid"] for c in cleaned if c["uid"] is not None]
    if len(set(uids)) != len(uids):
        raise ValidationFailed({"datasets": ["Dataset uids repeat within the request."]})
    created = []
    for i, fields in enumerate(cleaned):
        try:
            created.append(dataset_register(**fields, owner=owner))
        except ValidationFailed as exc:
            raise ValidationFailed({f"datasets[{i}]": exc.detail}) from exc
    return created


def _kick_splitter(dataset: Dataset) -> None:
    """After commit, ask the splitter to look at the tasks reading this dataset: a kick by
    name (``wms.split_dataset``, in the tasks app), which finds them itself. Only input
    datasets are read by tasks (``tasks.inputs`` refuses the others): an output dataset's
    files (every final report's) kick nothing."""
    if dataset.role == DatasetRole.INPUT:
        kick_split_dataset(dataset_uid=str(dataset.uid))


def _clean_entry(raw: Mapping[str, Any], index: int, roots: Sequence[str]) -> dict[str, Any]:
    errors: dict[str, Any] = {}
    name = str(raw.get("name") or "").strip()
    if not name:
        errors["name"] = ["This field is required."]
    size = raw.get("size", 0)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        errors["size"] = ["Must be a non-negative integer."]
    check_sum = str(raw.get("check_sum") or "")
    if check_sum and not checksums.is_valid(check_sum):
        errors["check_sum"] = ["Must be '<adler32|sha256|md5>:<hex>' in lower case."]
    url = raw.get("url") or ""
    if url:
        try:
            check_url_under(url, roots, field="url", what="an allowed storage root")
        except ValidationFailed as exc:
            errors.update(exc.detail)
    if errors:
        raise ValidationFailed({f"files[{index}]": errors})
    return {"name": name, "size": size, "check_sum": check_sum, "url": str(url)}


@transaction.atomic
def dataset_add_files(
    *,
    dataset: Dataset,
    files: Iterable[Mapping[str, Any]],
    url_roots: Sequence[str] | None = None,
) -> list[DatasetEntry]:
    """Register files in an open dataset's catalogue, all or none.

    A closed dataset refuses (409 ``dataset_closed``); a name already in the dataset is a 409.
    A file's ``url`` (when given) must lie under one of ``url_roots`` (canonical URLs; by
    default the storage roots, ``WMS_STORAGE_ROOTS``): else 400 naming ``files[i].url``, and
    nothing is registered. A pilot's report passes the output URL of its task.

    Only ``dataset.pk``, ``dataset.uid`` and ``dataset.role`` are used.
    On PostgreSQL this is two statements: the counters' UPDATE, which takes the dataset's row
    lock and checks it is open, then one ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` of the
    entries (a name that comes back missing was already there: 409, and the savepoint undoes
    the counters); an input dataset then kicks the splitter by name after commit.
    """
    roots = storage_roots() if url_roots is None else tuple(url_roots)
    cleaned = [_clean_entry(f, i, roots) for i, f in enumerate(files)]
    if not cleaned:
        raise ValidationFailed({"files": ["At least one file is required."]})
    names = [c["name"] for c in cleaned]
    if len(set(names)) != len(names):
        raise ValidationFailed({"files": ["File names repeat within the request."]})
    if db.array_inserts_supported():
        entries = _add_entries_postgres(dataset, cleaned)
    else:
        entries = _add_entries_portable(dataset, cleaned)
    log.info("dataset_files_added", dataset_uid=str(dataset.uid), count=len(entries))
    _kick_splitter(dataset)
    return entries


def _dataset_refusal(dataset: Dataset) -> Exception:
    """Why the counters' UPDATE of an open dataset matched no row: gone, or closed."""
    row = Dataset.objects.filter(pk=dataset.pk).values_list("name", "state").first()
    if row is None:
        return NotFound(f"Dataset {dataset.uid} does not exist.")
    return DatasetClosed(f"Dataset {row[0]} is closed and takes no more files.")


def _add_entries_postgres(dataset: Dataset, cleaned: list[dict[str, Any]]) -> list[DatasetEntry]:
    # The UPDATE's row lock orders this against dataset_close (no file slips in after a
    # close) and against other additions: ids are allocated under it (see files.dsm.local).
    if not Dataset.objects.filter(pk=dataset.pk, state=DatasetState.OPEN).update(
        file_count=F("file_count") + len(cleaned),
        total_size=F("total_size") + sum(c["size"] for c in cleaned),
        updated_at=timezone.now(),
    ):
        raise _dataset_refusal(dataset)
    entries = [DatasetEntry(dataset=dataset, **c) for c in cleaned]
    table = DatasetEntry._meta.db_table
    with connection.cursor() as cur:
        cur.execute(
            f'INSERT INTO "{table}" (dataset_id, name, size, check_sum, url, created_at) '  # noqa: S608
            "SELECT %s, v.name, v.size, v.check_sum, v.url, %s FROM unnest("
            "%s::varchar[], %s::bigint[], %s::varchar[], %s::varchar[]) AS v(name, size, "
            "check_sum, url) ON CONFLICT (dataset_id, name) DO NOTHING RETURNING id, name",
            [
                dataset.pk,
                entries[0].created_at,
                [e.name for e in entries],
                [e.size for e in entries],
                [e.check_sum for e in entries],
                [e.url for e in entries],
            ],
        )
        ids = {name: pk for pk, name in cur.fetchall()}
    if len(ids) != len(entries):
        clash = [e.name for e in entries if e.name not in ids][:5]
        name = Dataset.objects.filter(pk=dataset.pk).values_list("name", flat=True).first()
        raise Conflict(f"Files already in dataset {name}: {', '.join(clash)}")
    created_at = entries[0].created_at
    for e in entries:
        e.pk = ids[e.name]
        e.created_at = created_at
        e._state.adding = False
        e._state.db = connection.alias
    return entries


def _add_entries_portable(dataset: Dataset, cleaned: list[dict[str, Any]]) -> list[DatasetEntry]:
    # The row lock orders this against dataset_close: no file slips in after a close.
    locked = Dataset.objects.select_for_update().filter(pk=dataset.pk).first()
    if locked is None:
        raise NotFound(f"Dataset {dataset.uid} does not exist.")
    if locked.state != DatasetState.OPEN:
        raise DatasetClosed(f"Dataset {locked.name} is closed and takes no more files.")
    names = [c["name"] for c in cleaned]
    clash = list(
        DatasetEntry.objects.filter(dataset=locked, name__in=names).values_list("name", flat=True)[
            :5
        ]
    )
    if clash:
        raise Conflict(f"Files already in dataset {locked.name}: {', '.join(clash)}")
    entries = DatasetEntry.objects.bulk_create(
        [DatasetEntry(dataset=locked, **c) for c in cleaned], batch_size=5000
    )
    Dataset.objects.filter(pk=locked.pk).update(
        file_count=F("file_count") + len(entries),
        total_size=F("total_size") + sum(c["size"] for c in cleaned),
        updated_at=timezone.now(),
    )
    return entries


@transaction.atomic
def dataset_close(*, dataset: Dataset, source: str, reason: str = "") -> TransitionResult:
    """Close a dataset (open → closed); closing a closed dataset again is a no-op."""
    Dataset.objects.select_for_update().filter(pk=dataset.pk).first()
    result = apply_transition(
        Dataset,
        dataset.pk,
        DatasetState.CLOSED,
        source=source,
        reason=reason,
        updates={"closed_at": timezone.now()},
    )
    if result.won:
        log.info("dataset_closed", dataset_uid=str(dataset.uid), source=source)
        _kick_splitter(dataset)  # a short trailing group may now become a job
    return result


def file_create(
    *,
    file_name: str,
    type: str,
    job_id: int | None = None,
    task_id: int | None = None,
    dataset: Dataset | None = None,
    entry: DatasetEntry | None = None,
    size: int = 0,
    check_sum: str = "",
    status: str = FileStatus.PENDING,
    url: str = "",
) -> File:
    """Create one FILE_DAT row (a job's input, output or log file), checked; built by
    ``files.build.files_build`` as every FILE_DAT row."""
    if type not in FileType.values:
        raise ValidationFailed({"type": [f"Must be one of {FileType.values}."]})
    if check_sum and not checksums.is_valid(check_sum):
        raise ValidationFailed({"check_sum": ["Must be '<adler32|sha256|md5>:<hex>'."]})
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValidationFailed({"size": ["Must be a non-negative integer."]})
    if status not in FileStatus.values:
        raise ValidationFailed({"status": [f"Must be one of {FileStatus.values}."]})
    row = NewFile(
        file_name=file_name,
        type=type,
        size=size,
        status=status,
        check_sum=check_sum,
        url=url,
        job_id=job_id,
        task_id=task_id,
        dataset_id=dataset.pk if dataset is not None else None,
        entry_id=entry.pk if entry is not None else None,
    )
    try:
        with transaction.atomic():
            [pk] = files_build([row])
    except IntegrityError as exc:
        raise Conflict(f"File {file_name!r} already has a job in this task.") from exc
    return File.objects.get(pk=pk)


def files_mark_intermediate(*, job_ids: Sequence[int]) -> int:
    """The outputs of these jobs are read by a merge job: not final outputs of their task."""
    return File.objects.filter(job_id__in=job_ids, type=FileType.OUTPUT).update(
        intermediate=True, updated_at=timezone.now()
    )


def files_mark_partial(*, task_id: int) -> int:
    """A cancelled task's outputs and logs registered before its cancel stay in its dataset,
    marked ``partial`` (docs/lifecycle.md, "Cancelled tasks"). One UPDATE."""
    return File.objects.filter(
        task_id=task_id, type__in=(FileType.OUTPUT, FileType.LOG), status=FileStatus.READY
    ).update(status=FileStatus.PARTIAL, updated_at=timezone.now())


@transaction.atomic
def catalogue_mirror(*, info: Any, files: list[Any]) -> tuple[Dataset, dict[int, int]]:
    """Mirror an external DSM's dataset and files into the local catalogue tables.

    With the ``http`` DSM backend the WMS still needs local rows for its FILE_DAT inputs to point
    at (and for the "one job per input file within a task" constraint). Returns the local
    dataset and a map DSM file id → local entry id. Idempotent.
    """
    ds = Dataset.objects.filter(uid=info.uid).first()
    if ds is None:
        try:
            with transaction.atomic():
                ds = Dataset.objects.create(
                    uid=info.uid, name=info.name, role=info.role, location=info.location
                )
        except IntegrityError:
            ds = Dataset.objects.get(uid=info.uid)
    if files:
        DatasetEntry.objects.bulk_create(
            [
                DatasetEntry(dataset=ds, name=f.name, size=f.size, check_sum=f.check_sum, url=f.url)
                for f in files
            ],
            ignore_conflicts=True,
            batch_size=5000,
        )
    by_name = dict(
        DatasetEntry.objects.filter(dataset=ds, name__in=[f.name for f in files]).values_list(
            "name", "id"
        )
    )
    return ds, {f.id: by_name[f.name] for f in files}
