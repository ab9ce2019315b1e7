"""A task's outputs go inside the output root, in its owner's folder, in a place of its own;
and nobody can claim the name of a task's output dataset before it (docs/dsm.md)."""

from __future__ import annotations

import pytest

from files.models import Dataset, DatasetRole
from files.services import dataset_register
from tasks.create import task_create
from tasks.models import Task, TaskInput
from tests.factories import DatasetFactory, UserFactory
from wms.exceptions import ValidationFailed

pytestmark = pytest.mark.django_db

TASKS = "/api/v1/tasks/"
ROOT = "file:///out"  # the tests' WMS_OUTPUT_ROOT (tests/conftest.py)


@pytest.fixture
def dataset():
    return DatasetFactory()


def counts():
    return (Task.objects.count(), TaskInput.objects.count(), Dataset.objects.count())


def create(client, dataset, **body):
    return client.post(
        TASKS, {"executable": "run.sh", "data_in_uid": str(dataset.uid), **body}, format="json"
    )


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc",
        "file:///out",  # the whole output root
        "file:///out/{me}",  # the owner's whole folder
        "file:///out/{other}/x",  # another user's folder
        "file:///out/{me}/../{other}/x",  # ... reached with '..'
        "file:///out/{me}/%2e%2e/{other}/x",  # ... percent-encoded
        "file:///out/{me}x/y",  # a folder whose name starts like the owner's
        "file:///outside/{me}/x",  # a root-like prefix
        "file://otherhost/out/{me}/x",
        "root://eos.example.org//out/{me}/x",
        "file:///out/{me}/x?y=1",
        "relative/{me}/x",
        "file:///out/{me}/x/../../..",
    ],
)
def test_an_output_url_outside_the_owner_s_folder_is_refused(api_client, user, dataset, url):
    other = UserFactory()
    before = counts()

    response = create(
        api_client, dataset, data_out_url=url.format(me=user.username, other=other.username)
    )

    assert response.status_code == 400, response.json()
    assert response.json()["error"] == "validation_failed"
    assert list(response.json()["detail"]) == ["data_out_url"]
    assert counts() == before


def test_a_place_of_the_owner_s_own_is_kept_in_canonical_form(api_client, user, dataset):
    response = create(
        api_client, dataset, data_out_url=f"file://localhost/out//{user.username}/./reco/"
    )

    assert response.status_code == 201, response.json()
    task = Task.objects.get(pk=response.json()["id"])
    assert task.data_out_url == f"{ROOT}/{user.username}/reco"
    assert Dataset.objects.get(uid=task.data_out_uid).location == task.data_out_url


@pytest.mark.parametrize(
    "second",
    ["{me}/reco", "{me}/reco/", "{me}/reco/v2", "{me}/reco/v2/../../reco", "{me}"],
)
def test_a_place_overlapping_another_task_s_is_refused(api_client, user, dataset, second):
    assert (
        create(api_client, dataset, data_out_url=f"{ROOT}/{user.username}/reco").status_code == 201
    )
    before = counts()

    response = create(
        api_client, dataset, data_out_url=f"{ROOT}/" + second.format(me=user.username)
    )

    assert response.status_code == 400, response.json()
    assert list(response.json()["detail"]) == ["data_out_url"]
    assert counts() == before


def test_a_place_around_another_task_s_is_refused(user, dataset):
    task_create(
        owner=user,
        executable="x",
        data_in_uid=dataset.uid,
        data_out_url=f"{ROOT}/{user.username}/a/b/c",
    )
    before = counts()

    with pytest.raises(ValidationFailed) as refused:
        task_create(
            owner=user,
            executable="x",
            data_in_uid=dataset.uid,
            data_out_url=f"{ROOT}/{user.username}/a",
        )

    assert list(refused.value.detail) == ["data_out_url"]
    assert counts() == before


def test_default_places_are_the_owner_s_and_distinct(user, dataset):
    other = UserFactory()
    a = task_create(owner=user, executable="x", data_in_uid=dataset.uid)
    b = task_create(owner=user, executable="x", data_in_uid=dataset.uid)
    c = task_create(owner=other, executable="x", data_in_uid=dataset.uid)

    assert a.data_out_url == f"{ROOT}/{user.username}/task-{a.pk}"
    assert b.data_out_url == f"{ROOT}/{user.username}/task-{b.pk}"
    assert c.data_out_url == f"{ROOT}/{other.username}/task-{c.pk}"


def test_a_default_place_the_owner_gave_away_already_is_not_reused(user, dataset):
    first = task_create(owner=user, executable="x", data_in_uid=dataset.uid)
    taken = f"{ROOT}/{user.username}/task-{first.pk + 1}"
    second = task_create(owner=user, executable="x", data_in_uid=dataset.uid, data_out_url=taken)
    third = task_create(owner=user, executable="x", data_in_uid=dataset.uid)

    assert second.data_out_url == taken
    assert third.data_out_url.startswith(f"{ROOT}/{user.username}/task-{third.pk}")
    assert third.data_out_url not in (taken, first.data_out_url)


def test_a_username_that_is_no_plain_folder_name_gets_its_id(dataset):
    dots = UserFactory(username="..")
    task = task_create(owner=dots, executable="x", data_in_uid=dataset.uid)
    assert task.data_out_url == f"{ROOT}/~{dots.pk}/task-{task.pk}"


# --- output dataset names cannot be squatted ---------------------------------------------------


@pytest.mark.parametrize("name", ["task.{n}.out", "reco.{n}.out", "x.OUT", "task.{n}.out.r1"])
def test_a_user_cannot_register_an_output_dataset_name(api_client, name):
    n = 7
    before = Dataset.objects.count()

    response = api_client.post("/api/v1/datasets/", {"name": name.format(n=n)}, format="json")
    bulk = api_client.post(
        "/api/v1/datasets/bulk/",
        {"datasets": [{"name": "fine.in"}, {"name": name.format(n=n + 1)}]},
        format="json",
    )

    assert response.status_code == 400 and list(response.json()["detail"]) == ["name"]
    assert bulk.status_code == 400
    assert Dataset.objects.count() == before


def test_squatting_the_next_task_ids_does_not_block_the_owner(api_client, user, dataset):
    n = task_create(owner=user, executable="x", data_in_uid=dataset.uid).pk + 1  # the next id
    for i in range(n, n + 5):  # names the API refuses; say an external DSM holds them anyway
        dataset_register(name=f"task.{i}.out", role=DatasetRole.OUTPUT)

    response = create(api_client, dataset)

    assert response.status_code == 201, response.json()
    task = Task.objects.get(pk=response.json()["id"])
    out = Dataset.objects.get(uid=task.data_out_uid)
    assert out.name != f"task.{task.pk}.out"
    assert out.name.startswith(f"task.{task.pk}.") and out.name.endswith(".out")
    assert out.role == DatasetRole.OUTPUT and out.owner is None


def test_the_admin_refuses_a_place_outside_the_owner_s_folder(admin_client_logged):
    dataset = DatasetFactory()
    before = counts()
    response = admin_client_logged.post(
        "/admin/tasks/task/add/",
        {
            "name": "etc",
            "executable": "wms-payload-map",
            "data_in_uid": str(dataset.uid),
            "device_type": "cpu",
            "mode": "map",
            "rank": "0",
            "files_per_job": "1",
            "max_retries": "1",
            "max_failed_fraction": "0",
            "storage_url": "",
            "data_out_url": "file:///etc",
            "splitter_enabled": "on",
            "executor_enabled": "on",
        },
        follow=True,
    )

    assert "data_out_url" in response.content.decode()
    assert counts() == before
    assert not Task.objects.filter(name="etc").exists()
