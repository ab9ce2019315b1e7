"""A task's series of input datasets through the API and the admin."""

from __future__ import annotations

import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from files.models import DatasetEntry
from tasks.finalizer import task_finalize
from tasks.models import Task, TaskInput, TaskState
from tasks.splitter import task_split
from tests.factories import TaskFactory
from tests.tasks.series import (
    ADD,
    ALREADY,
    UNKNOWN,
    URL,
    create_task,
    finish_jobs,
    input_dataset,
    nothing_written,
    series_of,
)

pytestmark = pytest.mark.django_db


# --- API ------------------------------------------------------------------------------------------


def _post(client, body, url=URL):
    return client.post(url, body, format="json")


def _inputs_of(body) -> list[tuple[int, str]]:
    assert all(
        set(row) == {"position", "dataset_uid", "split_cursor", "split_done_at"}
        for row in body["inputs"]
    )
    return [(row["position"], row["dataset_uid"]) for row in body["inputs"]]


def test_api_create_with_a_list(api_client, user):
    a, b = input_dataset("api.a", 1), input_dataset("api.b")
    response = _post(api_client, {"executable": "x", "data_in_uids": [str(b.uid), str(a.uid)]})
    assert response.status_code == 201, response.json()
    body = response.json()
    assert _inputs_of(body) == [(0, str(b.uid)), (1, str(a.uid))]
    assert body["data_in_uid"] == str(b.uid) and body["data_in_selection"] == ""
    assert series_of(Task.objects.get(pk=body["id"])) == [b.uid, a.uid]


def test_api_create_with_a_selection(api_client):
    b, a = input_dataset("sel.b.raw"), input_dataset("sel.a.raw")
    response = _post(api_client, {"executable": "x", "data_in_selection": "sel.?.raw"})
    assert response.status_code == 201, response.json()
    body = response.json()
    assert _inputs_of(body) == [(0, str(a.uid)), (1, str(b.uid))]
    assert body["data_in_selection"] == "sel.?.raw"


def test_api_create_with_two_ways_lists_both_with_the_other_errors(api_client):
    a = input_dataset("two.a")
    response = _post(
        api_client,
        {
            "executable": "x",
            "data_in_uid": str(a.uid),
            "data_in_uids": [str(a.uid)],
            "files_per_job": 0,
        },
    )
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "validation_failed"
    assert set(body["detail"]) == {"data_in_uid", "data_in_uids", "files_per_job"}
    nothing_written()


def test_api_create_with_no_input_is_a_400(api_client):
    response = _post(api_client, {"executable": "x"})
    assert response.status_code == 400
    assert set(response.json()["detail"]) == {"data_in_uid"}
    nothing_written()


def test_api_create_with_an_unknown_uid_in_the_list(api_client):
    a = input_dataset("unk.a", 1)
    response = _post(
        api_client, {"executable": "x", "data_in_uids": [str(a.uid), str(uuid.uuid4())]}
    )
    assert response.status_code == 400
    assert response.json() == {
        "error": "validation_failed",
        "detail": {"data_in_uids[1]": [UNKNOWN]},
    }
    nothing_written()


def test_api_add_inputs(api_client, user):
    a, b, c = input_dataset("ai.a", 1), input_dataset("ai.b", 1), input_dataset("ai.c", 1)
    task = create_task(user, data_in_uids=[a.uid])
    url = f"{URL}{task.pk}/inputs/"

    response = _post(api_client, {"data_in_uids": [str(c.uid), str(b.uid)]}, url)
    assert response.status_code == 201, response.json()
    assert _inputs_of(response.json()) == [(0, str(a.uid)), (1, str(c.uid)), (2, str(b.uid))]

    response = _post(api_client, {"data_in_uids": [str(b.uid)]}, url)
    assert response.status_code == 400
    assert response.json()["detail"] == {"data_in_uids[0]": [ALREADY]}

    for body, keys in [
        ({}, {"data_in_uids"}),
        (
            {"data_in_uids": [str(b.uid)], "data_in_selection": "ai.*"},
            {"data_in_uids", "data_in_selection"},
        ),
        ({"data_in_uid": str(b.uid)}, {"data_in_uid", "data_in_uids"}),
    ]:
        response = _post(api_client, body, url)
        assert response.status_code == 400, body
        assert set(response.json()["detail"]) == keys, response.json()
    assert series_of(task) == [a.uid, c.uid, b.uid]


def test_api_add_inputs_to_another_users_task_is_a_404(api_client, other_user):
    a, b = input_dataset("ou.a", 1), input_dataset("ou.b", 1)
    task = create_task(other_user, data_in_uids=[a.uid])
    response = _post(api_client, {"data_in_uids": [str(b.uid)]}, f"{URL}{task.pk}/inputs/")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    assert series_of(task) == [a.uid]


def test_api_add_inputs_to_a_finished_task_is_a_409(api_client, user):
    a, b = input_dataset("af.a", 1, close=True), input_dataset("af.b", 1)
    task = create_task(user, data_in_uids=[a.uid])
    task_split(task_id=task.pk)
    finish_jobs(task)
    assert task_finalize(task_id=task.pk).state == TaskState.FINISHED

    response = _post(api_client, {"data_in_uids": [str(b.uid)]}, f"{URL}{task.pk}/inputs/")

    assert response.status_code == 409
    assert set(response.json()) == {"error", "detail"}
    assert series_of(task) == [a.uid]


def test_api_detail_shows_how_far_each_input_is_split(api_client, user):
    a = input_dataset("det.a", 2, close=True)
    b = input_dataset("det.b", 1)
    task = create_task(user, data_in_uids=[a.uid, b.uid])
    task_split(task_id=task.pk)

    body = api_client.get(f"{URL}{task.pk}/").json()

    first, second = body["inputs"]
    last_a = DatasetEntry.objects.filter(dataset=a).order_by("-id").first()
    assert first["split_cursor"] == last_a.id and first["split_done_at"] is not None
    assert second["split_cursor"] is not None and second["split_done_at"] is None


def test_api_detail_costs_the_same_for_one_input_or_many(api_client, user):
    many = [input_dataset(f"nq.{i}") for i in range(6)]
    small = create_task(user, data_in_uids=[many[0].uid])
    big = create_task(user, data_in_uids=[d.uid for d in many])
    counts = []
    for task in (small, big):
        with CaptureQueriesContext(connection) as ctx:
            response = api_client.get(f"{URL}{task.pk}/")
        assert response.status_code == 200
        counts.append(len(ctx.captured_queries))
    assert len(response.json()["inputs"]) == 6
    assert counts[0] == counts[1]


# --- admin ----------------------------------------------------------------------------------------


def _admin_form(**inputs) -> dict:
    return {
        "name": inputs.pop("name", "adm"),
        "executable": "wms-payload-map",
        "device_type": "cpu",
        "mode": "map",
        "rank": "0",
        "files_per_job": "1",
        "max_retries": "1",
        "max_failed_fraction": "0",
        **inputs,
    }


def test_admin_add_with_more_inputs(admin_client_logged):
    a, b, c = input_dataset("adm.a"), input_dataset("adm.b", 1), input_dataset("adm.c", 1)
    response = admin_client_logged.post(
        ADD,
        _admin_form(data_in_uid=str(a.uid), more_inputs=f"{c.uid}\n\n  {b.uid}  \n"),
    )
    assert response.status_code == 302, response.context["adminform"].form.errors
    task = Task.objects.get(name="adm")
    assert series_of(task) == [a.uid, c.uid, b.uid]
    assert task.data_in_uid == a.uid and task.data_out_uid is not None


def test_admin_add_with_a_bad_uid_on_line_2(admin_client_logged):
    a, b = input_dataset("bad.a"), input_dataset("bad.b")
    response = admin_client_logged.post(
        ADD, _admin_form(data_in_uid=str(a.uid), more_inputs=f"{b.uid}\nnot-a-uuid")
    )
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert list(errors) == ["more_inputs"]
    assert errors["more_inputs"] == ["line 2: Not a valid UUID."]
    nothing_written()


def test_admin_add_with_an_unknown_first_uid_and_a_repeat(admin_client_logged):
    b = input_dataset("rp.b")
    response = admin_client_logged.post(
        ADD,
        _admin_form(data_in_uid=str(uuid.uuid4()), more_inputs=f"{b.uid}\n{b.uid}"),
    )
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert errors["data_in_uid"] == [UNKNOWN]
    assert errors["more_inputs"] == [f"line 2: {ALREADY}"]
    nothing_written()


def test_admin_add_by_selection(admin_client_logged):
    b, a = input_dataset("as.b.raw"), input_dataset("as.a.raw")
    response = admin_client_logged.post(ADD, _admin_form(data_in_selection="as.*.raw"))
    assert response.status_code == 302, response.context["adminform"].form.errors
    task = Task.objects.get(name="adm")
    assert series_of(task) == [a.uid, b.uid]
    assert task.data_in_selection == "as.*.raw"


def test_admin_add_with_two_ways_or_none(admin_client_logged):
    a = input_dataset("tw.a")
    response = admin_client_logged.post(
        ADD, _admin_form(data_in_uid=str(a.uid), data_in_selection="tw.*")
    )
    assert response.status_code == 200
    assert set(response.context["adminform"].form.errors) == {"data_in_uid", "data_in_selection"}
    response = admin_client_logged.post(ADD, _admin_form())
    assert response.status_code == 200
    assert set(response.context["adminform"].form.errors) == {"data_in_uid"}
    nothing_written()


def test_admin_change_page_shows_the_inputs_in_order(admin_client_logged):
    a = input_dataset("chg.a", 1, close=True)
    b = input_dataset("chg.b")
    task = TaskFactory(data_in_uid=b.uid, inputs=[b.uid, a.uid])

    response = admin_client_logged.get(reverse("admin:tasks_task_change", args=[task.pk]))

    assert response.status_code == 200
    inline = next(
        i for i in response.context["inline_admin_formsets"] if i.formset.model is TaskInput
    )
    assert [f.instance.dataset_uid for f in inline.formset.forms] == [b.uid, a.uid]
    html = response.content.decode()
    section = html[html.index('id="inputs-group"') :]
    assert section.index(">chg.b</a> (open)") < section.index(">chg.a</a> (closed)")


def test_admin_change_page_reads_the_inputs_datasets_once(admin_client_logged):
    few = TaskFactory(inputs=[input_dataset(f"few.{i}").uid for i in range(2)])
    many = TaskFactory(inputs=[input_dataset(f"many.{i}").uid for i in range(12)])

    def queries(task) -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert (
                admin_client_logged.get(
                    reverse("admin:tasks_task_change", args=[task.pk])
                ).status_code
                == 200
            )
        return len(ctx.captured_queries)

    assert queries(many) == queries(few)


def test_api_follow_and_unfollow(api_client, user):
    a = input_dataset("apifol.1", 1, close=True)
    response = _post(
        api_client, {"executable": "x", "data_in_selection": "apifol.*", "data_in_follow": True}
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["data_in_follow"] is True and _inputs_of(body) == [(0, str(a.uid))]

    b = input_dataset("apifol.2", 1, close=True)
    response = api_client.patch(f"{URL}{body['id']}/", {"data_in_follow": False}, format="json")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["data_in_follow"] is False
    assert _inputs_of(body) == [(0, str(a.uid)), (1, str(b.uid))]

    response = api_client.patch(f"{URL}{body['id']}/", {"data_in_follow": True}, format="json")
    assert response.status_code == 200  # a selection task may follow again

    listed = _post(api_client, {"executable": "x", "data_in_uids": [str(a.uid)]}).json()
    response = api_client.patch(f"{URL}{listed['id']}/", {"data_in_follow": True}, format="json")
    assert response.status_code == 400
    assert list(response.json()["detail"]) == ["data_in_follow"]
