"""The ``local`` DSM backend: the WMS's own ``Dataset`` / ``DatasetEntry`` tables are the catalogue.

Every write goes through ``files.services`` (one write path); reads are single queries. Results
are the plain dataclasses of :mod:`files.dsm`, the same the ``http`` backend returns.

The paging cursor is the entry id. ``dataset_add_files`` allocates the ids of a dataset's new
entries while it holds the dataset's row lock, until commit, so within one dataset ids become
visible in increasing order: a reader resuming with ``after=<last id seen>`` misses nothing even
while files are still being added.

``find_datasets`` is one query on PostgreSQL and SQLite alike: ``name LIKE '<literal prefix>%'``
(Django escapes ``%``, ``_`` and ``\\``; on PostgreSQL the unique name's ``varchar_pattern_ops``
index serves it) narrows the rows, and ``name ~ <regex>`` (PostgreSQL) / ``name REGEXP <regex>``
(SQLite, Python's ``re`` through Django) decides, with the regex of :func:`files.dsm.glob_regex`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from django.db import connections
from django.db.models import F, Q, QuerySet
from django.db.models.functions import Collate

from files import services
from files.dsm.base import (
    DEFAULT_PAGE_SIZE,
    ClientBase,
    DatasetInfo,
    DatasetSpec,
    FileInfo,
    FilePage,
    UIDLike,
    check_file_specs,
    check_find_args,
    check_page_args,
    glob_prefix,
    glob_regex,
)
from files.models import Dataset, DatasetEntry, DatasetRole
from files.storage import output_root, storage_roots
from wms.exceptions import NotFound, ValidationFailed


def _lookup_uid(value: UIDLike) -> uuid.UUID:
    """A uid to look up: anything that is not a UUID names no dataset (404, not a 500)."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError as exc:
        raise NotFound(f"Dataset {value} does not exist.") from exc


def _new_uid(value: UIDLike | None) -> uuid.UUID | None:
    if value is None or isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError as exc:
        raise ValidationFailed({"uid": ["Must be a UUID."]}) from exc


def _get(uid: UIDLike) -> Dataset:
    ds = Dataset.objects.filter(uid=_lookup_uid(uid)).first()
    if ds is None:
        raise NotFound(f"Dataset {uid} does not exist.")
    return ds


def name_matches(pattern: str) -> Q:
    """A filter: whole name matches a glob (``*``, ``?``; all else literal, case too).

    The pattern must be valid (:func:`files.dsm.pattern_errors`). Also the API's
    ``?name__glob=`` filter.
    """
    prefix = glob_prefix(pattern)
    if prefix == pattern:  # no wildcard: one name
        return Q(name=pattern)
    q = Q(name__regex=glob_regex(pattern))
    return q & Q(name__startswith=prefix) if prefix else q


def by_name(qs: QuerySet[Dataset]) -> QuerySet[Dataset]:
    """Ordered by name in code-point order on every database (PostgreSQL's collation may not be:
    ``en_US`` sorts ``a_b`` and ``a.c`` otherwise); SQLite's BINARY already is."""
    if connections[qs.db].vendor == "postgresql":
        return qs.order_by(Collate(F("name"), "C"))
    return qs.order_by("name")


def dataset_info(ds: Dataset) -> DatasetInfo:
    return DatasetInfo(
        uid=ds.uid,
        name=ds.name,
        role=ds.role,
        state=ds.state,
        file_count=ds.file_count,
        total_size=ds.total_size,
        location=ds.location,
    )


def file_info(entry: DatasetEntry) -> FileInfo:
    return FileInfo(
        id=entry.pk,
        name=entry.name,
        size=entry.size,
        check_sum=entry.check_sum,
        url=entry.url,
    )


class LocalDSMClient(ClientBase):
    """The catalogue in the WMS's own database (``WMS_DSM_BACKEND=local``)."""

    catalogue_is_local = True

    def catalogue_entries(
        self, info: DatasetInfo, files: Sequence[FileInfo]
    ) -> tuple[int, dict[int, int]]:
        """The files are the catalogue's own entries: the dataset's id, each file its own."""
        ds_id = Dataset.objects.filter(uid=info.uid).values_list("id", flat=True).get()
        return ds_id, {f.id: f.id for f in files}

    def register_dataset(
        self,
        name: str,
        *,
        role: str = "input",
        uid: UIDLike | None = None,
        location: str = "",
    ) -> DatasetInfo:
        ds = services.dataset_register(name=name, role=role, location=location, uid=_new_uid(uid))
        return dataset_info(ds)

    def register_datasets(
        self, specs: Sequence[DatasetSpec | Mapping[str, Any]]
    ) -> list[DatasetInfo]:
        plain = [s.as_dict() if isinstance(s, DatasetSpec) else s for s in specs]
        return [dataset_info(ds) for ds in services.datasets_register(specs=plain)]

    def register_files(
        self, dataset_uid: UIDLike, files: Sequence[Mapping[str, Any]]
    ) -> list[FileInfo]:
        ds = _get(dataset_uid)
        # an input dataset's files live under the storage roots, an output dataset's inside
        # the output root (its task's place: what a pilot's report checked already)
        roots = storage_roots() if ds.role == DatasetRole.INPUT else (output_root(),)
        entries = services.dataset_add_files(
            dataset=ds, files=check_file_specs(files), url_roots=roots
        )
        return [file_info(e) for e in entries]

    def list_files(
        self, dataset_uid: UIDLike, *, after: int | None = None, limit: int = DEFAULT_PAGE_SIZE
    ) -> FilePage:
        check_page_args(after, limit)
        ds = _get(dataset_uid)
        qs = DatasetEntry.objects.filter(dataset_id=ds.pk)
        if after is not None:
            qs = qs.filter(pk__gt=after)
        # One row more than asked tells whether another page follows (no COUNT, no empty page).
        rows = list(
            qs.order_by("pk").values_list("pk", "name", "size", "check_sum", "url")[: limit + 1]
        )
        more = len(rows) > limit
        files = [FileInfo(*row) for row in rows[:limit]]
        return FilePage(files=files, next_cursor=files[-1].id if more else None)

    def get_dataset(self, dataset_uid: UIDLike) -> DatasetInfo:
        return dataset_info(_get(dataset_uid))

    def find_datasets(
        self, pattern: str, *, role: str | None = "input", limit: int = DEFAULT_PAGE_SIZE
    ) -> list[DatasetInfo]:
        check_find_args(pattern, role, limit)
        qs = Dataset.objects.filter(name_matches(pattern))
        if role is not None:
            qs = qs.filter(role=role)
        return [dataset_info(ds) for ds in by_name(qs)[:limit]]

    def close_dataset(
        self, dataset_uid: UIDLike, *, source: str = "dsm", reason: str = ""
    ) -> DatasetInfo:
        ds = _get(dataset_uid)
        services.dataset_close(dataset=ds, source=source, reason=reason)
        ds.refresh_from_db()
        return dataset_info(ds)
