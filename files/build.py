"""The one place FILE_DAT rows are built: :func:`files_build`, in bulk.

Its callers are the splitter's and the merger's job building (``jobs.build``: a job's input
rows) and the report path (``jobs.outputs``: a job's outputs and log). On PostgreSQL the ids
are taken from the table's sequence in one query and the rows streamed with ``COPY``
(``wms.db``); elsewhere one ``bulk_create``. Either way the caller gets the new rows' ids in
the order of its rows, which is what it needs to point its jobs at them.

A row may name a job that is being built in the same transaction (``jobs.build`` inserts the
jobs after their files on PostgreSQL): the foreign keys are checked at commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

from django.utils import timezone

from files.models import File
from wms import db


class NewFile(NamedTuple):
    """One FILE_DAT row to build (a tuple: the splitter builds 10^5 of them at a time)."""

    file_name: str
    type: str
    size: int
    status: str
    check_sum: str
    url: str
    job_id: int | None
    task_id: int | None
    dataset_id: int | None = None
    entry_id: int | None = None
    time_start: datetime | None = None
    time_end: datetime | None = None
    intermediate: bool = False


# The table's columns, in the order of NewFile's fields (all of them are plain columns).
_COLUMNS = ("id", *NewFile._fields, "created_at", "updated_at")
_JOB = NewFile._fields.index("job_id")


def files_build(
    rows: Sequence[NewFile],
    *,
    job_ids: Sequence[int | None] | None = None,
    now: datetime | None = None,
    batch_size: int = 5000,
) -> list[int]:
    """Insert ``rows`` as FILE_DAT rows; their ids, in the order of ``rows``. ``job_ids``
    (one per row) stand for the rows' ``job_id``: rows made before their jobs had ids.

    Nothing is checked here: the callers hand over what they checked already (a report's
    files passed ``jobs.events``; inputs come from the DSM's catalogue). The unique constraint
    ``file_one_job_per_input`` still stands behind every input row."""
    if not rows:
        return []
    now = now or timezone.now()
    if job_ids is None:
        job_ids = [row.job_id for row in rows]
    if db.copy_supported():
        ids = db.allocate_ids(File, len(rows))
        db.copy_rows(
            File,
            _COLUMNS,
            (
                (fid, *row[:_JOB], job_id, *row[_JOB + 1 :], now, now)
                for fid, job_id, row in zip(ids, job_ids, rows, strict=True)
            ),
        )
        return ids
    made = File.objects.bulk_create(
        [
            File(**{**row._asdict(), "job_id": job_id}, created_at=now, updated_at=now)
            for job_id, row in zip(job_ids, rows, strict=True)
        ],
        batch_size=batch_size,
    )
    return [f.pk for f in made]
