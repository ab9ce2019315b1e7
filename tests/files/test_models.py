"""Constraints of FILE_DAT and the DSM catalogue that the database enforces."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.models import ProtectedError

from files.models import DatasetEntry, File, FileType
from tests.factories import (
    DatasetEntryFactory,
    DatasetFactory,
    FileFactory,
    JobFactory,
    TaskFactory,
)

pytestmark = pytest.mark.django_db


def _input(job, entry, **kw):
    return FileFactory(
        job=job,
        task=job.task,
        type=FileType.INPUT,
        file_name=entry.name,
        entry=entry,
        dataset=entry.dataset,
        **kw,
    )


# --- one job per input file within a task ------------------------------------------------------


def test_an_input_file_gets_one_job_per_task():
    entry = DatasetEntryFactory()
    task = TaskFactory()
    first, second = JobFactory(task=task), JobFactory(task=task)
    _input(first, entry)
    with pytest.raises(IntegrityError), transaction.atomic():
        _input(second, entry)
    assert File.objects.filter(entry=entry).count() == 1


def test_the_same_job_cannot_list_one_input_twice_either():
    entry = DatasetEntryFactory()
    job = JobFactory()
    _input(job, entry)
    with pytest.raises(IntegrityError), transaction.atomic():
        _input(job, entry)


def test_the_same_input_file_in_another_task_is_allowed():
    entry = DatasetEntryFactory()
    _input(JobFactory(), entry)
    _input(JobFactory(), entry)
    assert File.objects.filter(entry=entry, type=FileType.INPUT).count() == 2


@pytest.mark.parametrize("file_type", [FileType.OUTPUT, FileType.LOG])
def test_output_and_log_files_are_unconstrained(file_type):
    entry = DatasetEntryFactory()
    task = TaskFactory()
    job = JobFactory(task=task)
    for _ in range(2):
        FileFactory(job=job, task=task, type=file_type, entry=entry, file_name="same.root")
    # ... next to an input row of that entry
    _input(JobFactory(task=task), entry)
    assert File.objects.filter(task=task, entry=entry).count() == 3


def test_inputs_without_catalogue_entry_are_not_constrained():
    task = TaskFactory()
    for _ in range(2):
        FileFactory(job=JobFactory(task=task), type=FileType.INPUT, entry=None)
    assert File.objects.filter(task=task, type=FileType.INPUT).count() == 2


# --- checksums carry their algorithm -----------------------------------------------------------


@pytest.mark.parametrize("value", ["", "adler32:0a1b2c3d", "sha256:" + "0" * 64, "md5:" + "f" * 32])
def test_checksum_with_algorithm_or_empty_is_accepted(value):
    f = FileFactory(check_sum=value)
    f.refresh_from_db()
    assert f.check_sum == value


@pytest.mark.parametrize(
    "value", ["0a1b2c3d", "3f2504e0-4f89-11d3-9a0c-0305e82c3301", "crc32:0a1b2c3d", "ADLER32:01"]
)
def test_checksum_without_algorithm_is_refused(value):
    with pytest.raises(IntegrityError), transaction.atomic():
        FileFactory(check_sum=value)
    assert not File.objects.filter(check_sum=value).exists()


def test_checksum_constraint_holds_on_update_too():
    f = FileFactory()
    with pytest.raises(IntegrityError), transaction.atomic():
        File.objects.filter(pk=f.pk).update(check_sum="deadbeef")


# --- the catalogue -----------------------------------------------------------------------------


def test_entry_names_are_unique_per_dataset():
    ds = DatasetFactory()
    DatasetEntryFactory(dataset=ds, name="a.root")
    with pytest.raises(IntegrityError), transaction.atomic():
        DatasetEntryFactory(dataset=ds, name="a.root")
    DatasetEntryFactory(dataset=DatasetFactory(), name="a.root")  # another dataset: fine
    assert DatasetEntry.objects.filter(name="a.root").count() == 2


def test_dataset_names_and_uids_are_unique():
    ds = DatasetFactory()
    with pytest.raises(IntegrityError), transaction.atomic():
        DatasetFactory(name=ds.name)
    with pytest.raises(IntegrityError), transaction.atomic():
        DatasetFactory(uid=ds.uid)


def test_an_entry_read_by_a_job_cannot_be_deleted():
    entry = DatasetEntryFactory()
    _input(JobFactory(), entry)
    with pytest.raises(ProtectedError), transaction.atomic():
        entry.delete()
    assert DatasetEntry.objects.filter(pk=entry.pk).exists()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="pg_indexes")
def test_one_job_per_input_is_a_partial_unique_index():
    with connection.cursor() as cur:
        cur.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'file_one_job_per_input'")
        (indexdef,) = cur.fetchone()
    assert indexdef.startswith("CREATE UNIQUE INDEX")
    assert "(task_id, entry_id)" in indexdef and "WHERE" in indexdef and "'input'" in indexdef
