"""files.services and files.selectors on the real database: datasets, catalogue, FILE_DAT."""

from __future__ import annotations

import uuid

import pytest

from files.models import (
    Dataset,
    DatasetEntry,
    DatasetRole,
    DatasetState,
    File,
    FileStatus,
    FileType,
)
from files.selectors import dataset_get, files_of_job
from files.services import (
    dataset_add_files,
    dataset_close,
    dataset_register,
    datasets_register,
    file_create,
)
from tests.factories import DatasetEntryFactory, DatasetFactory, FileFactory, JobFactory
from wms import checksums
from wms.exceptions import Conflict, DatasetClosed, NotFound, ValidationFailed

pytestmark = pytest.mark.django_db


def _files(n: int, start: int = 0, size: int = 100) -> list[dict]:
    return [
        {
            "name": f"evt.{i:04d}.root",
            "size": size + i,
            "check_sum": checksums.bytes_checksum(f"evt{i}".encode()),
            "url": f"file:///data/evt.{i:04d}.root",
        }
        for i in range(start, start + n)
    ]


# --- dataset_register --------------------------------------------------------------------------


def test_dataset_register_creates_an_open_dataset():
    ds = dataset_register(name="  mc.run1.evgen ", role=DatasetRole.OUTPUT, location="file:///d")
    stored = Dataset.objects.get(pk=ds.pk)
    assert stored.name == "mc.run1.evgen"  # stripped
    assert (stored.role, stored.location, stored.state) == ("output", "file:///d", "open")
    assert (stored.file_count, stored.total_size, stored.closed_at) == (0, 0, None)
    assert isinstance(stored.uid, uuid.UUID)


def test_dataset_register_has_no_owner_unless_given(user):
    assert dataset_register(name="made.by.the.system").owner is None
    ds = dataset_register(name="user.alice.raw", owner=user)
    assert Dataset.objects.get(pk=ds.pk).owner == user


def test_datasets_register_gives_every_dataset_the_owner(user):
    made = datasets_register(specs=[{"name": "a"}, {"name": "b", "role": "output"}], owner=user)
    assert {ds.owner_id for ds in made} == {user.pk}
    assert set(Dataset.objects.values_list("owner", flat=True)) == {user.pk}
    assert datasets_register(specs=[{"name": "c"}])[0].owner is None


def test_dataset_register_with_a_given_uid():
    uid = uuid.uuid4()
    ds = dataset_register(name="given", uid=uid)
    assert Dataset.objects.get(uid=uid) == ds


def test_dataset_register_duplicate_name_is_a_conflict():
    dataset_register(name="dup")
    with pytest.raises(Conflict) as info:
        dataset_register(name="dup", role=DatasetRole.OUTPUT)
    assert info.value.status == 409 and info.value.code == "conflict"
    assert Dataset.objects.filter(name="dup").count() == 1


def test_dataset_register_duplicate_uid_is_a_conflict():
    uid = uuid.uuid4()
    dataset_register(name="a", uid=uid)
    with pytest.raises(Conflict):
        dataset_register(name="b", uid=uid)
    assert list(Dataset.objects.values_list("name", flat=True)) == ["a"]


def test_a_conflict_leaves_the_outer_transaction_usable():
    dataset_register(name="dup")
    with pytest.raises(Conflict):
        dataset_register(name="dup")
    # the IntegrityError was confined to a savepoint: this transaction still works
    assert dataset_register(name="after").pk


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"name": ""}, "name"), ({"name": "   "}, "name"), ({"name": "x", "role": "bogus"}, "role")],
)
def test_dataset_register_bad_input(kwargs, field):
    with pytest.raises(ValidationFailed) as info:
        dataset_register(**kwargs)
    assert set(info.value.detail) == {field}
    assert not Dataset.objects.exists()


# --- dataset_add_files -------------------------------------------------------------------------


def test_dataset_add_files_writes_entries_and_counters():
    ds = DatasetFactory()
    files = _files(3)

    entries = dataset_add_files(dataset=ds, files=files)

    assert [e.name for e in entries] == [f["name"] for f in files]
    stored = list(
        DatasetEntry.objects.filter(dataset=ds).values("name", "size", "check_sum", "url")
    )
    assert stored == files
    ds.refresh_from_db()
    assert ds.file_count == 3
    assert ds.total_size == sum(f["size"] for f in files) == 303


def test_dataset_add_files_accumulates():
    ds = DatasetFactory()
    dataset_add_files(dataset=ds, files=_files(2))
    dataset_add_files(dataset=ds, files=_files(3, start=2))
    ds.refresh_from_db()
    assert ds.file_count == 5 == DatasetEntry.objects.filter(dataset=ds).count()
    assert ds.total_size == sum(100 + i for i in range(5))


def test_dataset_add_files_defaults_and_trimming():
    ds = DatasetFactory()
    (entry,) = dataset_add_files(dataset=ds, files=[{"name": "  a.root  "}])
    entry.refresh_from_db()
    assert (entry.name, entry.size, entry.check_sum, entry.url) == ("a.root", 0, "", "")


def test_dataset_add_files_to_a_closed_dataset_is_refused():
    ds = DatasetFactory()
    dataset_add_files(dataset=ds, files=_files(1))
    dataset_close(dataset=ds, source="api")

    with pytest.raises(DatasetClosed) as info:
        dataset_add_files(dataset=ds, files=_files(2, start=1))

    assert info.value.status == 409 and info.value.code == "dataset_closed"
    ds.refresh_from_db()
    assert ds.file_count == 1 and DatasetEntry.objects.filter(dataset=ds).count() == 1


def test_dataset_closed_with_a_stale_instance_is_still_refused():
    ds = DatasetFactory()
    stale = Dataset.objects.get(pk=ds.pk)  # loaded while open
    dataset_close(dataset=ds, source="api")
    assert stale.state == DatasetState.OPEN
    with pytest.raises(DatasetClosed):
        dataset_add_files(dataset=stale, files=_files(1))
    assert not DatasetEntry.objects.filter(dataset=ds).exists()


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"check_sum": "deadbeef"}, "check_sum"),  # no algorithm
        ({"check_sum": "adler32:DEADBEEF"}, "check_sum"),  # upper case
        ({"check_sum": "adler32:dead"}, "check_sum"),  # too short
        ({"check_sum": "crc32:deadbeef"}, "check_sum"),  # unknown algorithm
        ({"check_sum": "sha256:" + "a" * 63}, "check_sum"),
        ({"size": -1}, "size"),
        ({"size": "12"}, "size"),
        ({"size": True}, "size"),
        ({"size": 1.5}, "size"),
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": None}, "name"),
    ],
)
def test_dataset_add_files_bad_file_writes_nothing(bad, field):
    ds = DatasetFactory()
    files = _files(3)
    files[1] = {**files[1], **bad}

    with pytest.raises(ValidationFailed) as info:
        dataset_add_files(dataset=ds, files=files)

    assert list(info.value.detail) == ["files[1]"]
    assert set(info.value.detail["files[1]"]) == {field}
    ds.refresh_from_db()
    assert (ds.file_count, ds.total_size) == (0, 0)
    assert not DatasetEntry.objects.filter(dataset=ds).exists()


def test_dataset_add_files_names_repeating_in_the_request():
    ds = DatasetFactory()
    files = [*_files(2), _files(1)[0]]
    with pytest.raises(ValidationFailed) as info:
        dataset_add_files(dataset=ds, files=files)
    assert set(info.value.detail) == {"files"}
    assert not DatasetEntry.objects.filter(dataset=ds).exists()


def test_dataset_add_files_name_already_in_the_dataset_is_a_conflict_all_or_none():
    ds = DatasetFactory()
    dataset_add_files(dataset=ds, files=_files(2))
    with pytest.raises(Conflict) as info:
        dataset_add_files(dataset=ds, files=_files(3, start=1))  # evt.0001 exists, 2-3 new
    assert "evt.0001.root" in str(info.value.detail)
    ds.refresh_from_db()
    assert ds.file_count == 2
    assert sorted(DatasetEntry.objects.filter(dataset=ds).values_list("name", flat=True)) == [
        "evt.0000.root",
        "evt.0001.root",
    ]


def test_dataset_add_files_needs_only_the_dataset_id_and_uid():
    """A pilot's report registers its outputs with ``Dataset(pk=..., uid=...)``, unread."""
    ds = DatasetFactory()
    files = _files(2)
    entries = dataset_add_files(dataset=Dataset(pk=ds.pk, uid=ds.uid), files=files)
    stored = dict(DatasetEntry.objects.filter(dataset=ds).values_list("name", "id"))
    assert [(e.name, e.pk) for e in entries] == sorted(stored.items())
    ds.refresh_from_db()
    assert (ds.file_count, ds.total_size) == (2, sum(f["size"] for f in files))
    dataset_close(dataset=ds, source="test")
    with pytest.raises(DatasetClosed):
        dataset_add_files(dataset=Dataset(pk=ds.pk, uid=ds.uid), files=_files(1, start=5))
    ds.refresh_from_db()
    assert ds.file_count == 2


def test_the_same_file_name_in_two_datasets_is_fine():
    a, b = DatasetFactory(), DatasetFactory()
    dataset_add_files(dataset=a, files=_files(1))
    dataset_add_files(dataset=b, files=_files(1))
    assert DatasetEntry.objects.filter(name="evt.0000.root").count() == 2


def test_dataset_add_files_needs_at_least_one_file():
    ds = DatasetFactory()
    with pytest.raises(ValidationFailed) as info:
        dataset_add_files(dataset=ds, files=[])
    assert set(info.value.detail) == {"files"}


def test_dataset_add_files_to_a_deleted_dataset():
    ds = DatasetFactory()
    Dataset.objects.filter(pk=ds.pk).delete()
    with pytest.raises(NotFound):
        dataset_add_files(dataset=ds, files=_files(1))
    assert not DatasetEntry.objects.exists()


# --- dataset_close -----------------------------------------------------------------------------


def test_dataset_close_and_again():
    ds = DatasetFactory()

    first = dataset_close(dataset=ds, source="api", reason="complete")
    ds.refresh_from_db()
    closed_at = ds.closed_at
    second = dataset_close(dataset=ds, source="api")

    assert first.won is True and second.won is False
    ds.refresh_from_db()
    assert ds.state == DatasetState.CLOSED
    assert closed_at is not None and ds.closed_at == closed_at  # the repeat changed nothing
    assert list(ds.transitions.values_list("from_state", "to_state", "source", "reason")) == [
        ("open", "closed", "api", "complete")
    ]


def test_dataset_close_missing_dataset():
    ds = DatasetFactory()
    Dataset.objects.filter(pk=ds.pk).delete()
    with pytest.raises(NotFound):
        dataset_close(dataset=ds, source="api")


# --- file_create -------------------------------------------------------------------------------


def test_file_create_an_input_file_of_a_job():
    entry = DatasetEntryFactory()
    job = JobFactory()
    f = file_create(
        file_name=entry.name,
        type=FileType.INPUT,
        job_id=job.pk,
        task_id=job.task_id,
        dataset=entry.dataset,
        entry=entry,
        size=entry.size,
        check_sum=entry.check_sum,
        status=FileStatus.READY,
        url="file:///x",
    )
    stored = File.objects.get(pk=f.pk)
    assert (stored.file_name, stored.type, stored.status) == (entry.name, "input", "ready")
    assert (stored.job_id, stored.task_id) == (job.pk, job.task_id)
    assert (stored.dataset_id, stored.entry_id) == (entry.dataset_id, entry.pk)
    assert (stored.size, stored.check_sum, stored.url) == (entry.size, entry.check_sum, "file:///x")


def test_file_create_defaults():
    f = file_create(file_name="job.log", type=FileType.LOG)
    f.refresh_from_db()
    assert (f.status, f.size, f.check_sum, f.job_id, f.task_id) == ("pending", 0, "", None, None)


def test_file_create_an_input_twice_in_one_task_is_a_conflict():
    entry = DatasetEntryFactory()
    a = JobFactory()
    b = JobFactory(task=a.task)
    file_create(file_name=entry.name, type="input", job_id=a.pk, task_id=a.task_id, entry=entry)
    with pytest.raises(Conflict):
        file_create(file_name=entry.name, type="input", job_id=b.pk, task_id=b.task_id, entry=entry)
    assert File.objects.filter(entry=entry).count() == 1
    # ... but another task may read the same file
    c = JobFactory()
    file_create(file_name=entry.name, type="input", job_id=c.pk, task_id=c.task_id, entry=entry)
    assert File.objects.filter(entry=entry).count() == 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"type": "config"}, "type"),
        ({"check_sum": "12345678"}, "check_sum"),
        ({"check_sum": "sha1:" + "a" * 40}, "check_sum"),
        ({"size": -5}, "size"),
        ({"status": "exploded"}, "status"),
    ],
)
def test_file_create_bad_input_writes_nothing(kwargs, field):
    args = {"file_name": "out.root", "type": FileType.OUTPUT, **kwargs}
    with pytest.raises(ValidationFailed) as info:
        file_create(**args)
    assert set(info.value.detail) == {field}
    assert not File.objects.exists()


# --- selectors ---------------------------------------------------------------------------------


def test_dataset_get():
    ds = DatasetFactory()
    assert dataset_get(uid=ds.uid) == ds
    assert dataset_get(uid=str(ds.uid)) == ds
    with pytest.raises(NotFound):
        dataset_get(uid=uuid.uuid4())


def test_files_of_job_sorted_by_type_then_id():
    job = JobFactory()
    log = FileFactory(job=job, type=FileType.LOG, file_name="job.log")
    out2 = FileFactory(job=job, type=FileType.OUTPUT)
    inp = FileFactory(job=job, type=FileType.INPUT)
    out1_later = FileFactory(job=job, type=FileType.OUTPUT)
    FileFactory()  # another job's file
    assert list(files_of_job(job_id=job.pk)) == [inp, log, out2, out1_later]
