"""API v1 of files and datasets: ownership of job files, filters, cursor pagination; dataset
registration (single and bulk, all or none; the caller owns them), files added to a dataset,
listing and closing, and who may add files or close (owner, staff, ``files.change_dataset``;
output datasets by the WMS only)."""

import uuid

import pytest
from django.contrib.auth.models import Permission
from rest_framework.test import APIClient

from files.models import Dataset, DatasetEntry, DatasetTransition, FileStatus, FileType
from tests.factories import (
    DatasetEntryFactory,
    DatasetFactory,
    FileFactory,
    JobFactory,
    TaskFactory,
    UserFactory,
)
from wms import checksums

pytestmark = pytest.mark.django_db

FILES = "/api/v1/files/"
DATASETS = "/api/v1/datasets/"


def ds_url(dataset, suffix=""):
    return f"{DATASETS}{dataset.uid}/{suffix}"


def _ids(response, key="id"):
    assert response.status_code == 200, response.json()
    return [row[key] for row in response.json()["results"]]


def _entry(name, size=10):
    return {"name": name, "size": size, "check_sum": checksums.bytes_checksum(name.encode())}


# --- files (FILE_DAT) -----------------------------------------------------------------------------


def test_anonymous_answers_401(anon_client):
    dataset = DatasetFactory()
    for response in (
        anon_client.get(FILES),
        anon_client.get(DATASETS),
        anon_client.post(DATASETS, {"name": "x"}, format="json"),
        anon_client.post(ds_url(dataset, "files/"), {"files": [_entry("a")]}, format="json"),
        anon_client.post(ds_url(dataset, "close/")),
    ):
        assert response.status_code == 401
        assert response.json()["error"] == "not_authenticated"
    assert Dataset.objects.count() == 1
    assert not DatasetEntry.objects.exists()
    assert Dataset.objects.get().state == "open"


def test_a_user_sees_only_the_files_of_their_tasks(api_client, user, other_user):
    mine = FileFactory(job=JobFactory(task=TaskFactory(owner=user)))
    # A file reachable only through its job (no task on the row) is the job owner's too.
    through_job = FileFactory(job=JobFactory(task=TaskFactory(owner=user)), task=None)
    theirs = FileFactory(job=JobFactory(task=TaskFactory(owner=other_user)))

    assert _ids(api_client.get(FILES)) == [mine.pk, through_job.pk]
    assert api_client.get(f"{FILES}{mine.pk}/").status_code == 200
    response = api_client.get(f"{FILES}{theirs.pk}/")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


def test_file_detail_fields(api_client, user):
    entry = DatasetEntryFactory()
    f = FileFactory(
        job=JobFactory(task=TaskFactory(owner=user)),
        type=FileType.INPUT,
        dataset=entry.dataset,
        entry=entry,
        status=FileStatus.READY,
    )

    body = api_client.get(f"{FILES}{f.pk}/").json()

    assert body["id"] == f.pk  # seed FILE_DAT.file_id
    assert (body["job"], body["task"]) == (f.job_id, f.task_id)
    assert body["dataset"] == str(entry.dataset.uid)
    assert body["entry"] == entry.pk
    assert body["check_sum"] == f.check_sum and body["check_sum"].startswith("adler32:")
    assert (body["type"], body["status"], body["size"]) == ("input", "ready", 2048)


def test_file_filters(api_client, user):
    task = TaskFactory(owner=user)
    job_a, job_b = JobFactory(task=task), JobFactory(task=task)
    other_task = TaskFactory(owner=user)
    dataset = DatasetFactory()
    out_a = FileFactory(job=job_a, type=FileType.OUTPUT, status=FileStatus.READY)
    log_a = FileFactory(job=job_a, type=FileType.LOG)
    in_b = FileFactory(job=job_b, type=FileType.INPUT, dataset=dataset)
    other = FileFactory(job=JobFactory(task=other_task))

    assert _ids(api_client.get(FILES, {"job": job_a.pk})) == [out_a.pk, log_a.pk]
    assert _ids(api_client.get(FILES, {"task": task.pk})) == [out_a.pk, log_a.pk, in_b.pk]
    assert _ids(api_client.get(FILES, {"task": other_task.pk})) == [other.pk]
    assert _ids(api_client.get(FILES, {"type": "log"})) == [log_a.pk]
    assert _ids(api_client.get(FILES, {"dataset": str(dataset.uid)})) == [in_b.pk]
    assert _ids(api_client.get(FILES, {"status": "ready"})) == [out_a.pk]
    assert _ids(api_client.get(FILES, {"job": job_a.pk, "type": "output"})) == [out_a.pk]
    bad = api_client.get(FILES, {"dataset": "nope", "type": "video"})
    assert bad.status_code == 400
    assert set(bad.json()["detail"]) == {"dataset", "type"}


def test_file_list_is_cursor_paginated(api_client, user):
    job = JobFactory(task=TaskFactory(owner=user))
    files = [FileFactory(job=job) for _ in range(5)]

    first = api_client.get(FILES, {"page_size": 2}).json()
    assert "count" not in first
    seen, url = [], FILES + "?page_size=2"
    while url:
        body = api_client.get(url).json()
        seen += [row["id"] for row in body["results"]]
        url = body["next"]
    assert seen == [f.pk for f in files]


@pytest.mark.parametrize("rows", [1, 20])
def test_file_list_costs_a_constant_number_of_queries(
    api_client, user, rows, django_assert_max_num_queries
):
    job = JobFactory(task=TaskFactory(owner=user))
    for _ in range(rows):
        FileFactory(job=job, dataset=DatasetFactory())
    with django_assert_max_num_queries(1):
        response = api_client.get(FILES)
    assert len(response.json()["results"]) == rows


# --- datasets: read -------------------------------------------------------------------------------


def test_dataset_list_detail_and_filters(api_client):
    open_in = DatasetFactory(name="mc.higgs.evgen")
    closed_out = DatasetFactory(name="mc.higgs.out", role="output", state="closed")

    assert _ids(api_client.get(DATASETS), "uid") == [str(closed_out.uid), str(open_in.uid)]
    assert _ids(api_client.get(DATASETS, {"state": "open"}), "uid") == [str(open_in.uid)]
    assert _ids(api_client.get(DATASETS, {"role": "output"}), "uid") == [str(closed_out.uid)]
    assert _ids(api_client.get(DATASETS, {"name__icontains": "EVGEN"}), "uid") == [str(open_in.uid)]
    assert _ids(api_client.get(DATASETS, {"ordering": "name"}), "uid") == [
        str(open_in.uid),
        str(closed_out.uid),
    ]

    body = api_client.get(ds_url(open_in)).json()
    assert body["uid"] == str(open_in.uid)
    assert (body["name"], body["role"], body["state"]) == ("mc.higgs.evgen", "input", "open")
    assert "id" not in body


def test_dataset_list_filters_by_name_glob(api_client):
    names = ["run2026.b.raw", "run2026.a.raw", "run2026_a_raw", "RUN2026.c.raw", "run2026.a.log"]
    ds = {name: DatasetFactory(name=name) for name in names}
    closed_out = DatasetFactory(name="run2026.z.raw", role="output", state="closed")

    def glob(pattern, **extra):
        return _ids(api_client.get(DATASETS, {"name__glob": pattern, **extra}), "name")

    assert glob("run2026.*.raw", ordering="name") == [
        "run2026.a.raw",
        "run2026.b.raw",
        "run2026.z.raw",  # the state is no filter
    ]
    assert glob("run2026.?.raw", role="input", ordering="name") == [
        "run2026.a.raw",
        "run2026.b.raw",
    ]
    assert glob("run2026_*") == ["run2026_a_raw"]  # _ is literal
    assert glob("*.c.raw") == ["RUN2026.c.raw"]
    assert glob("run2026.c.raw") == []  # case-sensitive
    assert glob("run2026.a.raw") == ["run2026.a.raw"]  # the whole name
    assert glob("run2026.a") == []
    assert glob("*.raw", state="closed") == [closed_out.name]
    assert sorted(glob("")) == sorted([*ds, closed_out.name])  # empty: no filter, as elsewhere

    for bad in ("*", "?**", " ", "x" * 256):
        response = api_client.get(DATASETS, {"name__glob": bad})
        assert response.status_code == 400, bad
        body = response.json()
        assert body["error"] == "validation_failed"
        assert list(body["detail"]) == ["name__glob"]


def test_an_unknown_or_malformed_dataset_uid_is_404(api_client):
    for url in (f"{DATASETS}{uuid.uuid4()}/", f"{DATASETS}not-a-uuid/"):
        response = api_client.get(url)
        assert response.status_code == 404, url
        assert response.json()["error"] == "not_found"


# --- datasets: register ---------------------------------------------------------------------------


def test_register_a_dataset(api_client, user):
    uid = uuid.uuid4()
    response = api_client.post(
        DATASETS,
        {"name": "data.run1.raw", "role": "input", "location": "root://eos/run1", "uid": str(uid)},
        format="json",
    )

    assert response.status_code == 201, response.json()
    dataset = Dataset.objects.get(uid=uid)
    assert (dataset.name, dataset.role, dataset.state, dataset.location) == (
        "data.run1.raw",
        "input",
        "open",
        "root://eos/run1",
    )
    assert dataset.owner == user  # the caller owns what they register
    assert (response.json()["uid"], response.json()["owner"]) == (str(uid), user.pk)
    assert response.json()["owner_username"] == user.username


@pytest.mark.parametrize(
    ("payload", "fields"),
    [
        ({}, {"name"}),
        ({"name": "   "}, {"name"}),
        ({"name": "x" * 256}, {"name"}),
        ({"name": "ok", "role": "scratch"}, {"role"}),
        ({"name": "ok", "uid": "123"}, {"uid"}),
        ({"name": "ok", "state": "closed"}, {"state"}),
    ],
)
def test_register_with_bad_input_answers_400_and_writes_nothing(api_client, payload, fields):
    response = api_client.post(DATASETS, payload, format="json")
    assert response.status_code == 400
    assert response.json()["error"] == "validation_failed"
    assert set(response.json()["detail"]) == fields
    assert not Dataset.objects.exists()


def test_register_a_taken_name_answers_409(api_client):
    DatasetFactory(name="taken")
    response = api_client.post(DATASETS, {"name": "taken"}, format="json")
    assert response.status_code == 409
    assert response.json()["error"] == "conflict"
    assert Dataset.objects.count() == 1


def test_bulk_registers_every_dataset(api_client, user):
    response = api_client.post(
        f"{DATASETS}bulk/",
        {
            "datasets": [
                {"name": "run1"},
                {"name": "run2", "location": "root://eos/run2"},
                {"name": "run3", "role": "input"},
            ]
        },
        format="json",
    )

    assert response.status_code == 201, response.json()
    assert [d["name"] for d in response.json()["datasets"]] == ["run1", "run2", "run3"]
    assert set(Dataset.objects.values_list("name", "role", "location")) == {
        ("run1", "input", ""),
        ("run2", "input", "root://eos/run2"),
        ("run3", "input", ""),
    }
    assert set(Dataset.objects.values_list("owner", flat=True)) == {user.pk}
    assert {d["owner"] for d in response.json()["datasets"]} == {user.pk}


def test_bulk_is_all_or_none_on_a_duplicate(api_client):
    DatasetFactory(name="run2")
    before = Dataset.objects.count()

    response = api_client.post(
        f"{DATASETS}bulk/",
        {"datasets": [{"name": "run1"}, {"name": "run2"}, {"name": "run3"}]},
        format="json",
    )

    assert response.status_code == 409
    assert response.json()["error"] == "conflict"
    assert "run2" in response.json()["detail"]
    assert Dataset.objects.count() == before
    assert not Dataset.objects.filter(name__in=["run1", "run3"]).exists()


@pytest.mark.parametrize(
    "payload",
    [
        {"datasets": []},
        {"datasets": [{"name": "a"}, {"name": "a"}]},
        {"datasets": [{"name": "a"}, {"name": "b", "role": "bogus"}]},
        {"datasets": "run1"},
        {},
    ],
)
def test_bulk_with_bad_input_answers_400_and_writes_nothing(api_client, payload):
    response = api_client.post(f"{DATASETS}bulk/", payload, format="json")
    assert response.status_code == 400
    assert response.json()["error"] == "validation_failed"
    assert "datasets" in response.json()["detail"]
    assert not Dataset.objects.exists()


def test_bulk_error_names_the_bad_item(api_client):
    response = api_client.post(
        f"{DATASETS}bulk/",
        {"datasets": [{"name": "a"}, {"name": "b", "role": "bogus"}]},
        format="json",
    )
    assert response.json()["detail"] == {
        "datasets": {"1": {"role": ['"bogus" is not a valid choice.']}}
    }


# --- datasets: files and close --------------------------------------------------------------------


def test_add_files_to_an_open_dataset(api_client, user):
    dataset = DatasetFactory(owner=user)

    response = api_client.post(
        ds_url(dataset, "files/"),
        {"files": [_entry("a.root", 10), _entry("b.root", 32), {"name": "c.root"}]},
        format="json",
    )

    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["dataset"] == str(dataset.uid)
    assert body["added"] == 3
    assert [f["name"] for f in body["files"]] == ["a.root", "b.root", "c.root"]
    dataset.refresh_from_db()
    assert (dataset.file_count, dataset.total_size) == (3, 42)
    assert DatasetEntry.objects.get(name="c.root").check_sum == ""


@pytest.mark.parametrize(
    ("files", "where"),
    [
        ([{"name": "a", "check_sum": "crc:123"}], "check_sum"),
        ([{"name": "a", "size": -1}], "size"),
        ([{"name": ""}], "name"),
        ([{"name": "a", "colour": "red"}], "colour"),
    ],
)
def test_add_files_with_bad_input_answers_400_per_field_and_writes_nothing(
    api_client, user, files, where
):
    dataset = DatasetFactory(owner=user)
    good = _entry("good.root")

    response = api_client.post(ds_url(dataset, "files/"), {"files": [good, *files]}, format="json")

    assert response.status_code == 400
    detail = response.json()["detail"]
    assert set(detail["files"]["1"]) == {where}  # the second file, that field
    assert not DatasetEntry.objects.exists()
    dataset.refresh_from_db()
    assert dataset.file_count == 0


def test_add_files_repeated_or_empty_answers_400(api_client, user):
    dataset = DatasetFactory(owner=user)
    for files in ([], [_entry("a"), _entry("a")]):
        response = api_client.post(ds_url(dataset, "files/"), {"files": files}, format="json")
        assert response.status_code == 400
        assert "files" in response.json()["detail"]
    assert not DatasetEntry.objects.exists()


def test_add_a_file_already_in_the_dataset_answers_409(api_client, user):
    entry = DatasetEntryFactory(name="a.root", dataset__owner=user)
    response = api_client.post(
        ds_url(entry.dataset, "files/"),
        {"files": [_entry("new.root"), _entry("a.root")]},
        format="json",
    )
    assert response.status_code == 409
    assert response.json()["error"] == "conflict"
    assert list(DatasetEntry.objects.values_list("name", flat=True)) == ["a.root"]


def test_list_a_datasets_files_by_cursor(api_client):
    dataset = DatasetFactory()
    entries = [DatasetEntryFactory(dataset=dataset) for _ in range(5)]
    DatasetEntryFactory()  # another dataset's

    seen, url = [], ds_url(dataset, "files/") + "?page_size=2"
    while url:
        body = api_client.get(url).json()
        assert "count" not in body
        seen += [row["id"] for row in body["results"]]
        url = body["next"]

    assert seen == [e.pk for e in entries]


def test_close_a_dataset_then_it_refuses_files(api_client, user):
    dataset = DatasetFactory(owner=user)

    response = api_client.post(ds_url(dataset, "close/"), {"reason": "run over"})
    assert response.status_code == 200
    assert response.json()["state"] == "closed"
    assert response.json()["closed_at"] is not None
    assert api_client.post(ds_url(dataset, "close/")).status_code == 200  # idempotent
    assert DatasetTransition.objects.filter(subject=dataset).count() == 1

    refused = api_client.post(ds_url(dataset, "files/"), {"files": [_entry("late")]}, format="json")
    assert refused.status_code == 409
    assert refused.json()["error"] == "dataset_closed"
    assert not DatasetEntry.objects.exists()
    dataset.refresh_from_db()
    assert dataset.file_count == 0


# --- datasets: who may write ---------------------------------------------------------------------


def _client(user):
    client = APIClient()
    client.force_authenticate(user)
    return client


def _with_change_dataset():
    user = UserFactory()
    user.user_permissions.add(
        Permission.objects.get(content_type__app_label="files", codename="change_dataset")
    )
    return user


def _snapshot(dataset):
    """Everything a refused write must leave as it was."""
    dataset.refresh_from_db()
    return (
        list(DatasetEntry.objects.filter(dataset=dataset).values_list("id", flat=True)),
        dataset.state,
        dataset.file_count,
        dataset.total_size,
        dataset.closed_at,
        DatasetTransition.objects.filter(subject=dataset).count(),
    )


def _add(client, dataset, name="x.root"):
    return client.post(ds_url(dataset, "files/"), {"files": [_entry(name)]}, format="json")


def _close(client, dataset):
    return client.post(ds_url(dataset, "close/"), {"reason": "done"}, format="json")


def _assert_refused(response, *words):
    assert response.status_code == 403, response.json()
    body = response.json()
    assert body["error"] == "permission_denied"
    for word in words:
        assert word in body["detail"]


def test_the_catalogue_is_read_by_every_user(user, other_user):
    dataset = DatasetFactory(owner=user)
    DatasetEntryFactory(dataset=dataset)
    client = _client(other_user)

    assert _ids(client.get(DATASETS), "uid") == [str(dataset.uid)]
    body = client.get(ds_url(dataset)).json()
    assert (body["owner"], body["owner_username"]) == (user.pk, user.username)
    assert len(client.get(ds_url(dataset, "files/")).json()["results"]) == 1
    system = DatasetFactory()
    assert client.get(ds_url(system)).json()["owner"] is None


def test_the_owner_adds_files_and_closes(api_client, user):
    dataset = DatasetFactory(owner=user)
    assert _add(api_client, dataset).status_code == 201
    assert _close(api_client, dataset).status_code == 200
    dataset.refresh_from_db()
    assert (dataset.file_count, dataset.state) == (1, "closed")


@pytest.mark.parametrize("write", [_add, _close])
def test_another_user_may_not_write_a_dataset_and_nothing_changes(user, other_user, write):
    dataset = DatasetFactory(owner=user)
    DatasetEntryFactory(dataset=dataset, name="first.root")
    before = _snapshot(dataset)

    _assert_refused(write(_client(other_user), dataset), dataset.name, "another user")

    assert _snapshot(dataset) == before


def test_the_refusal_comes_before_the_state_and_input_checks(user, other_user):
    closed = DatasetFactory(owner=user, state="closed")
    client = _client(other_user)
    _assert_refused(_add(client, closed))  # not the 409 dataset_closed
    bad = client.post(ds_url(DatasetFactory(owner=user), "files/"), {"files": []}, format="json")
    _assert_refused(bad)  # not the 400


@pytest.mark.parametrize(
    "make_writer",
    [
        pytest.param(lambda: UserFactory(is_staff=True), id="staff"),
        pytest.param(_with_change_dataset, id="files.change_dataset"),
    ],
)
@pytest.mark.parametrize("owned", [True, False], ids=["another_users", "ownerless"])
def test_staff_and_the_change_permission_write_any_input_dataset(user, make_writer, owned):
    dataset = DatasetFactory(owner=user if owned else None)
    client = _client(make_writer())

    assert _add(client, dataset).status_code == 201
    assert _close(client, dataset).status_code == 200
    dataset.refresh_from_db()
    assert (dataset.file_count, dataset.state) == (1, "closed")
    assert DatasetTransition.objects.filter(subject=dataset).count() == 1


@pytest.mark.parametrize("write", [_add, _close])
def test_an_ownerless_input_dataset_is_not_written_by_a_plain_user(api_client, write):
    dataset = DatasetFactory(owner=None)
    before = _snapshot(dataset)

    _assert_refused(write(api_client, dataset), "has no owner", "files.change_dataset")

    assert _snapshot(dataset) == before


def test_an_output_dataset_is_written_by_the_wms_only(user, admin_user):
    """Not by its task's owner, nor staff, nor the change permission; the WMS's own DSM client
    (what the pilots' reports and the finalizer use) still writes and closes it."""
    from files.dsm import get_dsm
    from tasks.create import task_create

    task = task_create(
        owner=user, executable="wms-payload-map", data_in_uid=DatasetFactory(owner=user).uid
    )
    output = Dataset.objects.get(uid=task.data_out_uid)
    assert output.role == "output"
    before = _snapshot(output)

    for who in (user, admin_user, UserFactory(is_staff=True), _with_change_dataset()):
        client = _client(who)
        _assert_refused(_add(client, output), "Output datasets are written by the WMS only")
        _assert_refused(_close(client, output), "Output datasets are written by the WMS only")
        assert client.get(ds_url(output)).status_code == 200  # reading stays open
    assert _snapshot(output) == before

    with get_dsm() as dsm:
        dsm.register_files(output.uid, [_entry("job1/out.root")])
        dsm.close_dataset(output.uid, source="system", reason="task ended")
    output.refresh_from_db()
    assert (output.file_count, output.state) == (1, "closed")


def test_a_user_registers_no_output_dataset(api_client):
    """Output datasets are made by the WMS, one per task: the API refuses the role (a dataset
    nobody could ever fill or close), alone or within a bulk registration, writing nothing."""
    response = api_client.post(DATASETS, {"name": "mine.out", "role": "output"}, format="json")
    assert response.status_code == 400
    assert response.json()["error"] == "validation_failed"
    assert "Only input datasets" in response.json()["detail"]["role"][0]
    response = api_client.post(
        f"{DATASETS}bulk/",
        {"datasets": [{"name": "ok.in"}, {"name": "mine.out", "role": "output"}]},
        format="json",
    )
    assert response.status_code == 400
    assert not Dataset.objects.filter(name__in=["mine.out", "ok.in"]).exists()
