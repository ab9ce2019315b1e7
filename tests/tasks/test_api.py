"""API v1 of tasks: auth, ownership, validation, filters, ordering, pagination, job counts,
PATCH and the pause/resume/cancel actions."""

import pytest
from rest_framework.test import APIClient

from jobs.models import Job, JobState
from tasks.api.serializers import JobCountsSerializer, TaskUpdateSerializer
from tasks.models import Task, TaskState, TaskTransition
from tests.factories import DatasetFactory, JobFactory, TaskFactory, UserFactory, api_token

pytestmark = pytest.mark.django_db

URL = "/api/v1/tasks/"
ZERO_COUNTS = {s: 0 for s in JobState.values}


def detail_url(task, suffix=""):
    return f"{URL}{task.pk}/{suffix}"


# --- authentication and ownership -----------------------------------------------------------------


def test_anonymous_answers_401_with_the_error_body(anon_client):
    dataset = DatasetFactory()
    task = TaskFactory()
    before = Task.objects.count()

    for method, url, body in [
        ("get", URL, None),
        ("get", detail_url(task), None),
        ("post", URL, {"executable": "x", "data_in_uid": str(dataset.uid)}),
        ("patch", detail_url(task), {"rank": 5}),
        ("post", detail_url(task, "cancel/"), {}),
    ]:
        response = getattr(anon_client, method)(url, body, format="json")
        assert response.status_code == 401, (method, url)
        assert response.json()["error"] == "not_authenticated"
        assert set(response.json()) == {"error", "detail"}
        assert response["WWW-Authenticate"] == "Token"

    task.refresh_from_db()
    assert Task.objects.count() == before
    assert task.rank == 0 and task.state == TaskState.DEFINED


def test_a_bad_token_answers_401():
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")
    response = client.get(URL)
    assert response.status_code == 401
    assert response.json() == {"error": "not_authenticated", "detail": "Invalid token."}


def test_token_authentication_works(user):
    task = TaskFactory(owner=user)
    _token, key = api_token(user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")

    response = client.get(URL)

    assert response.status_code == 200
    assert [row["id"] for row in response.json()["results"]] == [task.pk]


def test_session_authentication_works(user):
    task = TaskFactory(owner=user)
    client = APIClient()
    client.force_login(user)
    assert client.get(detail_url(task)).status_code == 200


def test_a_user_sees_only_their_own_tasks(api_client, user, other_user):
    mine = TaskFactory(owner=user)
    TaskFactory(owner=other_user)

    response = api_client.get(URL)

    assert response.status_code == 200
    assert [row["id"] for row in response.json()["results"]] == [mine.pk]
    assert response.json()["results"][0]["owner"] == user.pk
    assert response.json()["results"][0]["owner_username"] == user.username


def test_staff_see_every_task(admin_user, user, other_user):
    tasks = [TaskFactory(owner=user), TaskFactory(owner=other_user)]
    client = APIClient()
    client.force_authenticate(admin_user)

    response = client.get(URL)

    assert sorted(row["id"] for row in response.json()["results"]) == sorted(t.pk for t in tasks)


def test_another_users_task_is_404_for_every_verb(api_client, other_user):
    task = TaskFactory(owner=other_user, state=TaskState.RUNNING, rank=1)

    for method, url, body in [
        ("get", detail_url(task), None),
        ("patch", detail_url(task), {"rank": 99}),
        ("post", detail_url(task, "pause/"), {}),
        ("post", detail_url(task, "resume/"), {}),
        ("post", detail_url(task, "cancel/"), {}),
    ]:
        response = getattr(api_client, method)(url, body, format="json")
        assert response.status_code == 404, (method, url)
        assert response.json() == {"error": "not_found", "detail": "Not found."}

    task.refresh_from_db()
    assert task.state == TaskState.RUNNING and task.rank == 1
    assert not TaskTransition.objects.filter(subject=task).exists()


def test_a_missing_task_is_404(api_client):
    response = api_client.get(f"{URL}987654321/")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


# --- create ---------------------------------------------------------------------------------------


def test_create_defines_a_task_owned_by_the_caller(api_client, user):
    dataset = DatasetFactory()

    response = api_client.post(
        URL,
        {
            "executable": "wms-payload-map",
            "args": "--events 10",
            "data_in_uid": str(dataset.uid),
            "device_type": "gpu",
            "rank": 7,
            "name": "higgs",
            "files_per_job": 2,
        },
        format="json",
    )

    assert response.status_code == 201, response.json()
    body = response.json()
    task = Task.objects.get(pk=body["id"])
    assert task.owner == user
    assert (task.executable, task.device_type, task.rank, task.files_per_job) == (
        "wms-payload-map",
        "gpu",
        7,
        2,
    )
    assert str(task.data_in_uid) == str(dataset.uid)
    assert body["state"] == "defined"
    assert body["owner"] == user.pk
    assert body["job_counts"] == ZERO_COUNTS
    assert body["transitions"] == []


@pytest.mark.parametrize(
    ("changes", "fields"),
    [
        ({"executable": None, "data_in_uid": None}, {"executable", "data_in_uid"}),
        ({"executable": "", "data_in_uid": "not-a-uuid"}, {"executable", "data_in_uid"}),
        ({"device_type": "tpu", "mode": "reduce"}, {"device_type", "mode"}),
        (
            {"rank": 40000, "files_per_job": 0, "max_retries": 101},
            {"rank", "files_per_job", "max_retries"},
        ),
        ({"executable": "x" * 256, "storage_url": "s" * 1025}, {"executable", "storage_url"}),
        ({"state": "running", "owner": 1}, {"state", "owner"}),
    ],
)
def test_create_with_bad_input_answers_400_per_field_and_writes_nothing(
    api_client, changes, fields
):
    """``None`` in ``changes`` leaves the field out of the request."""
    body = {"executable": "wms-payload-map", "data_in_uid": str(DatasetFactory().uid)}
    body.update(changes)
    body = {k: v for k, v in body.items() if v is not None}
    before = Task.objects.count()

    response = api_client.post(URL, body, format="json")

    assert response.status_code == 400
    assert response.json()["error"] == "validation_failed"
    assert set(response.json()["detail"]) == fields
    assert all(isinstance(v, list) and v for v in response.json()["detail"].values())
    assert Task.objects.count() == before


def test_create_over_an_unknown_dataset_answers_400(api_client):
    response = api_client.post(
        URL,
        {"executable": "x", "data_in_uid": "6f1c1e4e-0000-4000-8000-000000000000"},
        format="json",
    )
    assert response.status_code == 400
    assert response.json()["detail"] == {"data_in_uid": ["No dataset with this uid."]}
    assert not Task.objects.exists()


def test_malformed_json_answers_400_and_writes_nothing(api_client):
    response = api_client.post(URL, data="{not json", content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"] == "parse_error"
    assert not Task.objects.exists()


# --- list: filters, ordering, pagination, job counts ----------------------------------------------


def _ids(response):
    assert response.status_code == 200, response.json()
    return [row["id"] for row in response.json()["results"]]


def test_list_filters(api_client, user, other_user):
    cpu_running = TaskFactory(owner=user, state=TaskState.RUNNING)
    gpu_paused = TaskFactory(owner=user, state=TaskState.PAUSED, device_type="gpu")
    merge = TaskFactory(owner=user, mode="merge")

    assert _ids(api_client.get(URL, {"state": "running"})) == [cpu_running.pk]
    assert sorted(_ids(api_client.get(URL + "?state=running&state=paused"))) == sorted(
        [cpu_running.pk, gpu_paused.pk]
    )
    assert _ids(api_client.get(URL, {"device_type": "gpu"})) == [gpu_paused.pk]
    assert _ids(api_client.get(URL, {"mode": "merge"})) == [merge.pk]
    assert len(_ids(api_client.get(URL, {"owner": user.pk}))) == 3
    # The owner filter cannot widen a user's view to someone else's tasks.
    TaskFactory(owner=other_user)
    assert _ids(api_client.get(URL, {"owner": other_user.pk})) == []


def test_a_bad_filter_value_answers_400(api_client):
    response = api_client.get(URL, {"state": "sleeping"})
    assert response.status_code == 400
    assert response.json()["error"] == "validation_failed"
    assert "state" in response.json()["detail"]


def test_list_ordering(api_client, user):
    low = TaskFactory(owner=user, rank=1, name="b")
    high = TaskFactory(owner=user, rank=9, name="a")
    mid = TaskFactory(owner=user, rank=5, name="c")

    assert _ids(api_client.get(URL)) == [mid.pk, high.pk, low.pk]  # newest first
    assert _ids(api_client.get(URL, {"ordering": "-rank"})) == [high.pk, mid.pk, low.pk]
    assert _ids(api_client.get(URL, {"ordering": "rank"})) == [low.pk, mid.pk, high.pk]
    assert _ids(api_client.get(URL, {"ordering": "name"})) == [high.pk, low.pk, mid.pk]


def test_list_page_number_pagination(api_client, user):
    tasks = [TaskFactory(owner=user) for _ in range(5)]
    expected = [t.pk for t in reversed(tasks)]

    first = api_client.get(URL, {"page_size": 2})
    assert first.json()["count"] == 5
    assert first.json()["previous"] is None
    assert first.json()["next"].endswith("page=2&page_size=2")
    assert _ids(first) == expected[:2]
    assert _ids(api_client.get(URL, {"page_size": 2, "page": 2})) == expected[2:4]
    last = api_client.get(URL, {"page_size": 2, "page": 3})
    assert _ids(last) == expected[4:]
    assert last.json()["next"] is None

    beyond = api_client.get(URL, {"page_size": 2, "page": 4})
    assert beyond.status_code == 404
    assert beyond.json()["error"] == "not_found"


def test_job_counts_on_detail_and_list(api_client, user):
    task = TaskFactory(owner=user, state=TaskState.RUNNING)
    other = TaskFactory(owner=user)
    for state, n in [("defined", 2), ("running", 3), ("finished", 1), ("failed", 1)]:
        for _ in range(n):
            JobFactory(task=task, state=state)
    JobFactory(task=other, state="queued")
    expected = {**ZERO_COUNTS, "defined": 2, "running": 3, "finished": 1, "failed": 1}

    response = api_client.get(detail_url(task))
    assert response.status_code == 200
    assert response.json()["job_counts"] == expected

    rows = {row["id"]: row for row in api_client.get(URL).json()["results"]}
    assert rows[task.pk]["job_counts"] == expected
    assert rows[other.pk]["job_counts"] == {**ZERO_COUNTS, "queued": 1}


def test_job_counts_serializer_has_one_field_per_job_state():
    assert set(JobCountsSerializer().fields) == set(JobState.values)


@pytest.mark.parametrize("rows", [1, 25])
def test_task_list_costs_a_constant_number_of_queries(
    api_client, user, rows, django_assert_max_num_queries
):
    for i in range(rows):
        task = TaskFactory(owner=user)
        JobFactory(task=task, state="running" if i % 2 else "defined")

    # COUNT, the page (with its owners), the job counts of the page.
    with django_assert_max_num_queries(3):
        response = api_client.get(URL)

    assert response.status_code == 200
    assert len(response.json()["results"]) == rows


# --- PATCH ----------------------------------------------------------------------------------------


def test_patch_changes_the_allowed_fields(api_client, user):
    task = TaskFactory(owner=user, rank=1)
    waiting = JobFactory(task=task, state="defined", rank=1)
    running = JobFactory(task=task, state="running", rank=1)

    response = api_client.patch(
        detail_url(task),
        {
            "rank": 50,
            "name": "renamed",
            "max_retries": 5,
            "splitter_enabled": False,
            "executor_enabled": False,
        },
        format="json",
    )

    assert response.status_code == 200, response.json()
    task.refresh_from_db()
    assert (task.rank, task.name, task.max_retries) == (50, "renamed", 5)
    assert task.splitter_enabled is False and task.executor_enabled is False
    assert response.json()["rank"] == 50 and response.json()["name"] == "renamed"
    # A new rank follows the jobs that are not dispatched yet.
    assert Job.objects.get(pk=waiting.pk).rank == 50
    assert Job.objects.get(pk=running.pk).rank == 1


def test_patch_of_one_field_leaves_the_others(api_client, user):
    task = TaskFactory(owner=user, rank=3, name="keep")
    response = api_client.patch(detail_url(task), {"executor_enabled": False}, format="json")
    assert response.status_code == 200
    task.refresh_from_db()
    assert (task.rank, task.name, task.executor_enabled) == (3, "keep", False)


@pytest.mark.parametrize(
    "payload",
    [
        {"state": "finished"},
        {"executable": "rm -rf"},
        {"owner": 1},
        {"data_in_uid": "6f1c1e4e-0000-4000-8000-000000000000"},
        {"rank": 1, "device_type": "gpu"},
    ],
)
def test_patch_of_a_forbidden_field_answers_400_and_changes_nothing(api_client, user, payload):
    task = TaskFactory(owner=user, rank=0)
    snapshot = Task.objects.filter(pk=task.pk).values().get()

    response = api_client.patch(detail_url(task), payload, format="json")

    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "validation_failed"
    forbidden = set(payload) - {"rank"}
    assert set(body["detail"]) == forbidden
    assert all(body["detail"][k] == ["This field cannot be changed."] for k in forbidden)
    assert Task.objects.filter(pk=task.pk).values().get() == snapshot


@pytest.mark.parametrize(
    "payload", [{"rank": 40000}, {"max_retries": 101}, {"max_retries": -1}, {"name": "x" * 256}]
)
def test_patch_with_a_bad_value_answers_400(api_client, user, payload):
    task = TaskFactory(owner=user)
    response = api_client.patch(detail_url(task), payload, format="json")
    assert response.status_code == 400
    assert set(response.json()["detail"]) == set(payload)
    task.refresh_from_db()
    assert task.rank == 0 and task.max_retries == 3


def test_put_is_not_allowed(api_client, user):
    task = TaskFactory(owner=user)
    response = api_client.put(detail_url(task), {"rank": 1}, format="json")
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"


# --- actions --------------------------------------------------------------------------------------


def _transitions(task):
    return list(
        TaskTransition.objects.filter(subject=task).values_list("from_state", "to_state", "source")
    )


def test_pause_and_resume(api_client, user):
    task = TaskFactory(owner=user, state=TaskState.RUNNING)

    response = api_client.post(detail_url(task, "pause/"), {"reason": "site downtime"})
    assert response.status_code == 200
    assert response.json()["state"] == "paused"
    assert _transitions(task) == [("running", "paused", "api")]
    reason = TaskTransition.objects.get(subject=task).reason
    assert "site downtime" in reason and user.username in reason

    # Asking again is harmless: 200 and no second transition.
    again = api_client.post(detail_url(task, "pause/"))
    assert again.status_code == 200 and again.json()["state"] == "paused"
    assert len(_transitions(task)) == 1

    resumed = api_client.post(detail_url(task, "resume/"))
    assert resumed.status_code == 200 and resumed.json()["state"] == "running"
    assert api_client.post(detail_url(task, "resume/")).status_code == 200
    assert _transitions(task) == [("running", "paused", "api"), ("paused", "running", "api")]
    assert [t["to_state"] for t in resumed.json()["transitions"]] == ["paused", "running"]


def test_cancel_cancels_the_task_and_its_unfinished_jobs(api_client, user):
    task = TaskFactory(owner=user, state=TaskState.RUNNING)
    defined = JobFactory(task=task, state="defined")
    queued = JobFactory(task=task, state="queued")
    finished = JobFactory(task=task, state="finished")

    response = api_client.post(detail_url(task, "cancel/"), format="json")

    assert response.status_code == 200
    assert response.json()["state"] == "cancelled"
    assert response.json()["job_counts"] == {**ZERO_COUNTS, "cancelled": 2, "finished": 1}
    assert Job.objects.get(pk=defined.pk).state == "cancelled"
    assert Job.objects.get(pk=queued.pk).state == "cancelled"
    assert Job.objects.get(pk=finished.pk).state == "finished"

    again = api_client.post(detail_url(task, "cancel/"))
    assert again.status_code == 200
    assert _transitions(task) == [("running", "cancelled", "api")]


@pytest.mark.parametrize(
    ("state", "verb"),
    [
        ("finished", "cancel"),
        ("failed", "cancel"),
        ("finished", "pause"),
        ("cancelled", "pause"),
        ("cancelled", "resume"),
        ("finished", "resume"),
    ],
)
def test_a_forbidden_transition_answers_409_and_changes_nothing(api_client, user, state, verb):
    task = TaskFactory(owner=user, state=state)
    job = JobFactory(task=task, state="finished")

    response = api_client.post(detail_url(task, f"{verb}/"))

    assert response.status_code == 409
    assert response.json()["error"] == "invalid_transition"
    assert state in response.json()["detail"]
    task.refresh_from_db()
    assert task.state == state
    assert _transitions(task) == []
    assert Job.objects.get(pk=job.pk).state == "finished"


def test_an_action_with_a_bad_body_answers_400(api_client, user):
    task = TaskFactory(owner=user, state=TaskState.RUNNING)
    response = api_client.post(
        detail_url(task, "pause/"), {"reason": "x" * 1001, "force": True}, format="json"
    )
    assert response.status_code == 400
    assert set(response.json()["detail"]) == {"reason", "force"}
    task.refresh_from_db()
    assert task.state == TaskState.RUNNING


def test_staff_may_act_on_any_task(admin_user, other_user):
    task = TaskFactory(owner=other_user, state=TaskState.RUNNING)
    client = APIClient()
    client.force_authenticate(admin_user)
    assert client.post(detail_url(task, "pause/")).status_code == 200
    task.refresh_from_db()
    assert task.state == TaskState.PAUSED


def test_a_user_token_belongs_to_one_user(other_user):
    """A second user's token sees that user's tasks, not the first one's."""
    first = UserFactory()
    TaskFactory(owner=first)
    _token, key = api_token(other_user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert _ids(client.get(URL)) == []


def test_input_serializers_refuse_to_write(user):
    """Views hand validated data to a service; an input serializer's save() is a bug."""
    task = TaskFactory(owner=user)
    serializer = TaskUpdateSerializer(task, data={"rank": 5}, partial=True)
    assert serializer.is_valid()
    with pytest.raises(NotImplementedError):
        serializer.save()
    task.refresh_from_db()
    assert task.rank == 0


def test_an_html_form_post_may_carry_its_csrf_token(user):
    """The browsable API posts ``csrfmiddlewaretoken`` with the fields: not an unknown field."""
    client = APIClient(enforce_csrf_checks=False)
    client.force_authenticate(user)
    dataset = DatasetFactory()
    response = client.post(
        URL,
        {"executable": "x", "data_in_uid": str(dataset.uid), "csrfmiddlewaretoken": "t"},
    )
    assert response.status_code == 201, response.json()


# --- merge settings ---------------------------------------------------------------------------


def test_create_and_patch_the_merge_settings(api_client, user):
    dataset = DatasetFactory()
    response = api_client.post(
        URL,
        {
            "executable": "wms-payload-map",
            "data_in_uid": str(dataset.uid),
            "merge_group_size": 3,
            "merge_args": "--sleep 0",
            "merge_max_level": 2,
            "merge_on_child_failure": "partial",
        },
        format="json",
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert (body["merge_group_size"], body["merge_executable"], body["merge_args"]) == (
        3,
        "wms-payload-merge",
        "--sleep 0",
    )
    assert (body["merge_max_level"], body["merge_on_child_failure"]) == (2, "partial")
    assert body["merge_groups_failed"] == 0
    task = Task.objects.get(pk=body["id"])

    response = api_client.patch(
        detail_url(task), {"merge_group_size": 4, "merge_on_child_failure": "fail"}, format="json"
    )
    assert response.status_code == 200, response.json()
    task.refresh_from_db()
    assert (task.merge_group_size, task.merge_on_child_failure) == (4, "fail")

    # a merge job exists: the tree's shape is fixed
    JobFactory(task=task, mode="merge", level=1)
    response = api_client.patch(detail_url(task), {"merge_group_size": 5}, format="json")
    assert response.status_code == 400
    assert "merge_group_size" in response.json()["detail"]


@pytest.mark.parametrize(
    "payload",
    [{"merge_group_size": 1}, {"merge_on_child_failure": "ignore"}, {"merge_max_level": -1}],
)
def test_bad_merge_settings_answer_400(api_client, payload):
    dataset = DatasetFactory()
    response = api_client.post(
        URL,
        {"executable": "wms-payload-map", "data_in_uid": str(dataset.uid), **payload},
        format="json",
    )
    assert response.status_code == 400, response.json()
    assert set(payload) <= set(response.json()["detail"])
    assert not Task.objects.exists()
