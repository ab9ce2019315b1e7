"""The task admin: pages, the jobs-by-state bar (one query per page), service-backed writes."""

import re

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from files.models import Dataset
from jobs.models import Job, JobState, JobTransition
from tasks import admin as tasks_admin
from tasks.lifecycle import task_pause, task_transition
from tasks.models import Task, TaskInput, TaskState, TaskTransition
from tests.factories import DatasetFactory, JobFactory, TaskFactory, UserFactory
from wms.exceptions import Conflict

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:tasks_task_changelist")
ADD = reverse("admin:tasks_task_add")


def change_url(task):
    return reverse("admin:tasks_task_change", args=[task.pk])


def messages_of(response):
    return [(m.level_tag, str(m)) for m in response.context["messages"]]


def run_action(client, action, objs):
    return client.post(
        CHANGELIST, {"action": action, "_selected_action": [o.pk for o in objs]}, follow=True
    )


def move(task, *states):
    """Walk a task through states with the service (test setup, source "system")."""
    for state in states:
        task_transition(task_id=task.pk, target=state, source="system")
    task.refresh_from_db()
    return task


def task_with_jobs(**counts):
    task = TaskFactory()
    for state, n in counts.items():
        for _ in range(n):
            JobFactory(task=task, state=state)
    return task


def change_form_post_data(response):
    """What the browser would post back from a change page: fields plus inline management."""
    data = {}
    form = response.context["adminform"].form
    for name, field in form.fields.items():
        value = form.initial.get(name, field.initial)
        if isinstance(value, bool):
            if value:
                data[name] = "on"
        elif value is not None:
            data[name] = value
    for inline in response.context["inline_admin_formsets"]:
        mgmt = inline.formset.management_form
        for name in mgmt.fields:
            data[f"{mgmt.prefix}-{name}"] = mgmt.initial.get(name, "")
    return data


# --- pages -------------------------------------------------------------------------------------


def test_changelist_renders_the_progress_bar_with_the_right_counts(admin_client_logged):
    task = task_with_jobs(finished=3, running=2, failed=1)
    empty = TaskFactory()

    response = admin_client_logged.get(CHANGELIST)

    assert response.status_code == 200
    html = response.content.decode()
    row = re.search(rf"<tr>(?:(?!</tr>).)*?>{task.pk}</a>.*?</tr>", html, re.S).group(0)
    assert 'title="finished: 3"' in row
    assert 'title="running: 2"' in row
    assert 'title="failed: 1"' in row
    for absent in ("queued", "defined", "cancelled"):
        assert f'class="wms-seg wms-state-{absent}"' not in row
    assert "4/6 done" in row  # finished + failed + cancelled out of all
    assert 'style="width:50.000%"' in row  # 3 of 6 finished
    assert f"?task__id__exact={task.pk}" in row
    empty_row = re.search(rf"<tr>(?:(?!</tr>).)*?>{empty.pk}</a>.*?</tr>", html, re.S).group(0)
    assert "no jobs" in empty_row
    counted = {t.pk: t._admin_job_counts for t in response.context["cl"].result_list}
    assert counted[task.pk] == {
        "defined": 0,
        "queued": 0,
        "held": 0,
        "running": 2,
        "finished": 3,
        "failed": 1,
        "cancelled": 0,
    }


def _changelist_queries(client):
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(CHANGELIST)
    assert response.status_code == 200
    return len(ctx.captured_queries), response


@pytest.mark.parametrize("n_tasks", [1, 20])
def test_changelist_query_count_does_not_grow_with_tasks(
    admin_client_logged, django_assert_max_num_queries, n_tasks
):
    for i in range(n_tasks):
        # a different owner and jobs in several states for every task
        task_with_jobs(finished=i % 3, running=1, queued=i % 2)
    with django_assert_max_num_queries(12):
        response = admin_client_logged.get(CHANGELIST)
    assert response.status_code == 200
    assert len(response.context["cl"].result_list) == n_tasks


def test_changelist_counts_jobs_with_one_query_whatever_the_page_size(admin_client_logged):
    task_with_jobs(running=1)
    one, _ = _changelist_queries(admin_client_logged)
    for i in range(19):
        task_with_jobs(finished=1 + i % 2, defined=1)
    twenty, response = _changelist_queries(admin_client_logged)
    assert len(response.context["cl"].result_list) == 20
    assert twenty == one


def test_change_page_shows_transitions_and_job_counts(admin_client_logged):
    task = task_with_jobs(finished=2, queued=1)
    task_pause(task_id=task.pk, source="api", reason="pause for the test")

    response = admin_client_logged.get(change_url(task))

    assert response.status_code == 200
    html = response.content.decode()
    assert "pause for the test" in html  # the transition inline
    # the pause put the queued job back to wait (no new starts)
    assert 'title="finished: 2"' in html and 'title="defined: 1"' in html
    assert "2/3 done" in html  # a waiting job is not done yet
    inlines = {i.formset.model: i for i in response.context["inline_admin_formsets"]}
    assert set(inlines) == {TaskInput, TaskTransition}
    for inline in inlines.values():  # both read-only
        assert not inline.has_add_permission and not inline.has_delete_permission
        assert not inline.has_change_permission
    assert "Input datasets (read in this order)" in html
    assert f">{Dataset.objects.get(uid=task.data_in_uid).name}</a>" in html  # the input, linked


def test_transition_changelist_and_change_pages_are_read_only(admin_client_logged):
    task = move(TaskFactory(), TaskState.RUNNING)
    tr = TaskTransition.objects.get(subject=task)

    assert (
        admin_client_logged.get(reverse("admin:tasks_tasktransition_changelist")).status_code == 200
    )
    filtered = admin_client_logged.get(
        reverse("admin:tasks_tasktransition_changelist"),
        {"to_state": "running", "source": "system"},
    )
    assert list(filtered.context["cl"].result_list) == [tr]
    page = admin_client_logged.get(reverse("admin:tasks_tasktransition_change", args=[tr.pk]))
    assert page.status_code == 200
    assert not page.context["has_change_permission"]
    assert admin_client_logged.get(reverse("admin:tasks_tasktransition_add")).status_code == 403


def test_search_by_id_and_by_input_dataset_uid(admin_client_logged):
    task, other = TaskFactory(), TaskFactory()
    by_id = admin_client_logged.get(CHANGELIST, {"q": str(task.pk)})
    assert task in by_id.context["cl"].result_list
    by_uid = admin_client_logged.get(CHANGELIST, {"q": str(other.data_in_uid)})
    assert list(by_uid.context["cl"].result_list) == [other]
    by_name = admin_client_logged.get(CHANGELIST, {"q": task.name})
    assert list(by_name.context["cl"].result_list) == [task]


def test_tasks_cannot_be_deleted_from_the_admin(admin_client_logged):
    task = TaskFactory()
    assert (
        admin_client_logged.get(reverse("admin:tasks_task_delete", args=[task.pk])).status_code
        == 403
    )
    response = admin_client_logged.get(CHANGELIST)
    assert "delete_selected" not in dict(response.context["action_form"].fields["action"].choices)


# --- writes through the services ---------------------------------------------------------------


def test_add_creates_the_task_through_task_create(admin_client_logged, admin_user):
    dataset = DatasetFactory()
    response = admin_client_logged.post(
        ADD,
        {
            "name": "reco-2024",
            "executable": "wms-payload-map",
            "args": "--events 10",
            "data_in_uid": str(dataset.uid),
            "device_type": "gpu",
            "mode": "map",
            "rank": "7",
            "files_per_job": "2",
            "max_retries": "1",
            "max_failed_fraction": "0.1",
            "storage_url": "",
            "data_out_url": "",
            "splitter_enabled": "on",
            "executor_enabled": "on",
        },
    )
    assert response.status_code == 302, response.context["adminform"].form.errors
    task = Task.objects.get(name="reco-2024")
    assert task.owner == admin_user
    assert task.state == TaskState.DEFINED
    assert (task.device_type, task.rank, task.files_per_job, task.max_retries) == ("gpu", 7, 2, 1)
    assert task.max_failed_fraction == 0.1
    assert task.merge_group_size == 0 and task.merge_executable == "wms-payload-merge"
    assert LogEntry.objects.filter(object_id=str(task.pk), user=admin_user).exists()


def test_add_with_merge_settings(admin_client_logged):
    dataset = DatasetFactory()
    response = admin_client_logged.post(
        ADD,
        {
            "name": "merged",
            "executable": "wms-payload-map",
            "data_in_uid": str(dataset.uid),
            "device_type": "cpu",
            "mode": "map",
            "rank": "0",
            "files_per_job": "1",
            "max_retries": "1",
            "max_failed_fraction": "0",
            "merge_group_size": "3",
            "merge_args": "--sleep 0",
            "merge_on_child_failure": "partial",
        },
    )
    assert response.status_code == 302, response.context["adminform"].form.errors
    task = Task.objects.get(name="merged")
    assert (task.merge_group_size, task.merge_args, task.merge_on_child_failure) == (
        3,
        "--sleep 0",
        "partial",
    )
    assert (task.merge_executable, task.merge_max_level) == ("wms-payload-merge", 0)


def test_add_refuses_an_input_dataset_that_does_not_exist(admin_client_logged):
    response = admin_client_logged.post(
        ADD,
        {
            "name": "orphan",
            "executable": "x",
            "data_in_uid": "00000000-0000-4000-8000-000000000000",
            "device_type": "cpu",
            "mode": "map",
            "rank": "0",
            "files_per_job": "1",
            "max_retries": "3",
            "max_failed_fraction": "0",
        },
    )
    assert response.status_code == 200
    assert "data_in_uid" in response.context["adminform"].form.errors
    assert not Task.objects.filter(name="orphan").exists()


def test_change_updates_through_task_update_and_reranks_defined_jobs(admin_client_logged):
    task = TaskFactory(rank=1)
    waiting = JobFactory(task=task, state=JobState.DEFINED)
    queued = JobFactory(task=task, state=JobState.QUEUED)
    page = admin_client_logged.get(change_url(task))
    data = change_form_post_data(page)
    data.update(rank="9", name="renamed")

    response = admin_client_logged.post(change_url(task), data)

    assert response.status_code == 302
    task.refresh_from_db()
    assert (task.rank, task.name) == (9, "renamed")
    # task_update's own effect: the new rank reaches the jobs not dispatched yet
    assert Job.objects.get(pk=waiting.pk).rank == 9
    assert Job.objects.get(pk=queued.pk).rank == 1


def test_state_and_creation_fields_are_not_editable(admin_client_logged):
    task = TaskFactory()
    page = admin_client_logged.get(change_url(task))
    form_fields = set(page.context["adminform"].form.fields)
    assert form_fields == {
        "data_in_follow",  # may be turned off (or on, for a selection) at run time
        "name",
        "rank",
        "max_retries",
        "max_failed_fraction",
        "splitter_enabled",
        "executor_enabled",
        "merge_group_size",
        "merge_executable",
        "merge_args",
        "merge_max_level",
        "merge_on_child_failure",
    }
    assert 'name="state"' not in page.content.decode()

    data = change_form_post_data(page)
    data.update(state="cancelled", executable="rm -rf /", created_at="2000-01-01 00:00:00")
    response = admin_client_logged.post(change_url(task), data)

    assert response.status_code == 302
    task.refresh_from_db()
    assert task.state == TaskState.DEFINED
    assert task.executable == "wms-payload-map"
    assert not TaskTransition.objects.filter(subject=task).exists()


# --- actions -----------------------------------------------------------------------------------


def _admin_transition(task, to_state):
    return TaskTransition.objects.get(subject=task, to_state=to_state, source="admin")


def test_pause_and_resume_actions(admin_client_logged, admin_user):
    running = move(TaskFactory(), TaskState.RUNNING)
    defined = TaskFactory()

    response = run_action(admin_client_logged, "pause_tasks", [running, defined])

    assert ("success", "2 tasks paused.") in messages_of(response)
    for task in (running, defined):
        task.refresh_from_db()
        assert task.state == TaskState.PAUSED
        tr = _admin_transition(task, TaskState.PAUSED)
        assert admin_user.username in tr.reason

    response = run_action(admin_client_logged, "resume_tasks", [running])

    assert ("success", "1 task resumed.") in messages_of(response)
    running.refresh_from_db()
    assert running.state == TaskState.RUNNING
    assert admin_user.username in _admin_transition(running, TaskState.RUNNING).reason


def test_pausing_a_paused_task_is_reported_and_writes_nothing(admin_client_logged):
    task = move(TaskFactory(), TaskState.PAUSED)
    response = run_action(admin_client_logged, "pause_tasks", [task])
    assert ("warning", "1 task already paused.") in messages_of(response)
    assert TaskTransition.objects.filter(subject=task).count() == 1


def test_resume_refuses_a_defined_task(admin_client_logged):
    task = TaskFactory()
    response = run_action(admin_client_logged, "resume_tasks", [task])
    levels = [level for level, _ in messages_of(response)]
    assert "error" in levels
    task.refresh_from_db()
    assert task.state == TaskState.DEFINED


def test_cancel_action_cancels_the_task_and_its_jobs(admin_client_logged, admin_user):
    task = move(TaskFactory(), TaskState.RUNNING)
    job = JobFactory(task=task, state=JobState.QUEUED)
    done = JobFactory(task=task, state=JobState.FINISHED)

    response = run_action(admin_client_logged, "cancel_tasks", [task])

    assert response.status_code == 200
    assert ("success", "1 task cancelled.") in messages_of(response)
    task.refresh_from_db()
    assert task.state == TaskState.CANCELLED
    assert admin_user.username in _admin_transition(task, TaskState.CANCELLED).reason
    job.refresh_from_db()
    assert job.state == JobState.CANCELLED
    assert JobTransition.objects.get(subject=job, to_state="cancelled").source == "admin"
    assert Job.objects.get(pk=done.pk).state == JobState.FINISHED
    assert LogEntry.objects.filter(object_id=str(task.pk), user=admin_user).exists()


def test_cancel_of_a_finished_task_shows_an_error_and_changes_nothing(admin_client_logged):
    task = move(TaskFactory(), TaskState.RUNNING, TaskState.FINISHED)
    job = JobFactory(task=task, state=JobState.FINISHED)
    before = TaskTransition.objects.filter(subject=task).count()

    response = run_action(admin_client_logged, "cancel_tasks", [task])

    assert response.status_code == 200
    msgs = messages_of(response)
    errors = [text for level, text in msgs if level == "error"]
    assert len(errors) == 1 and "finished" in errors[0] and "cancelled" in errors[0]
    assert not any(level == "success" for level, _ in msgs)
    task.refresh_from_db()
    assert task.state == TaskState.FINISHED
    assert TaskTransition.objects.filter(subject=task).count() == before
    assert Job.objects.get(pk=job.pk).state == JobState.FINISHED


def test_one_bad_task_does_not_stop_the_others(admin_client_logged):
    finished = move(TaskFactory(), TaskState.RUNNING, TaskState.FINISHED)
    ok = TaskFactory()
    response = run_action(admin_client_logged, "cancel_tasks", [finished, ok])
    msgs = messages_of(response)
    assert ("success", "1 task cancelled.") in msgs
    assert any(level == "error" for level, _ in msgs)
    assert Task.objects.get(pk=ok.pk).state == TaskState.CANCELLED
    assert Task.objects.get(pk=finished.pk).state == TaskState.FINISHED


def test_staff_with_view_permission_only_cannot_run_actions(client):
    viewer = UserFactory(is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_task"))
    client.force_login(viewer)
    task = TaskFactory()

    page = client.get(CHANGELIST)
    assert page.status_code == 200
    assert page.context["action_form"] is None or "cancel_tasks" not in dict(
        page.context["action_form"].fields["action"].choices
    )
    client.post(CHANGELIST, {"action": "cancel_tasks", "_selected_action": [task.pk]})
    assert Task.objects.get(pk=task.pk).state == TaskState.DEFINED
    view = client.get(change_url(task))
    assert view.status_code == 200
    assert view.context["adminform"].form.fields == {}


def test_a_domain_error_while_saving_is_a_message_not_a_500(admin_client_logged, monkeypatch):
    """A service may still refuse what the form accepted (a race): nothing is saved."""

    def refuse(**kwargs):
        raise Conflict("The input dataset was deleted meanwhile.")

    monkeypatch.setattr(tasks_admin, "task_create", refuse)
    dataset = DatasetFactory()
    response = admin_client_logged.post(
        ADD,
        {
            "name": "raced",
            "executable": "x",
            "data_in_uid": str(dataset.uid),
            "device_type": "cpu",
            "mode": "map",
            "rank": "0",
            "files_per_job": "1",
            "max_retries": "3",
            "max_failed_fraction": "0",
        },
        follow=True,
    )
    assert response.status_code == 200
    assert (
        "error",
        "Not saved: The input dataset was deleted meanwhile.",
    ) in messages_of(response)
    assert not Task.objects.filter(name="raced").exists()
