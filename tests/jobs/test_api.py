"""API v1 of jobs: ownership, filters, cursor pagination, detail with attempts and
transitions, the cancel action, and a list free of N+1 queries."""

import pytest
from rest_framework.test import APIClient

from jobs.control import job_transition
from jobs.models import AttemptState, Job, JobState, JobTransition
from tests.factories import JobAttemptFactory, JobFactory, PilotFactory, TaskFactory
from wms.choices import TransitionSource

pytestmark = pytest.mark.django_db

URL = "/api/v1/jobs/"


def detail_url(job, suffix=""):
    return f"{URL}{job.pk}/{suffix}"


def _ids(response):
    assert response.status_code == 200, response.json()
    return [row["id"] for row in response.json()["results"]]


def test_anonymous_answers_401(anon_client):
    job = JobFactory()
    for response in (anon_client.get(URL), anon_client.post(detail_url(job, "cancel/"))):
        assert response.status_code == 401
        assert response.json()["error"] == "not_authenticated"
    assert Job.objects.get(pk=job.pk).state == JobState.DEFINED


def test_a_user_sees_only_the_jobs_of_their_tasks(api_client, user, other_user):
    mine = JobFactory(task=TaskFactory(owner=user))
    theirs = JobFactory(task=TaskFactory(owner=other_user))

    assert _ids(api_client.get(URL)) == [mine.pk]
    response = api_client.get(detail_url(theirs))
    assert response.status_code == 404
    assert response.json() == {"error": "not_found", "detail": "Not found."}


def test_staff_see_every_job(admin_user, user, other_user):
    jobs = [JobFactory(task=TaskFactory(owner=u)) for u in (user, other_user)]
    client = APIClient()
    client.force_authenticate(admin_user)
    assert _ids(client.get(URL)) == [j.pk for j in jobs]


def test_job_fields_map_the_seed_columns(api_client, user):
    pilot = PilotFactory()
    task = TaskFactory(owner=user)
    parent = JobFactory(task=task, mode="merge")
    job = JobFactory(task=task, parent_job=parent, pilot=pilot, state="running", cur_retry=1)

    body = api_client.get(detail_url(job)).json()

    assert body["id"] == job.pk  # seed JOB_DAT.job_id
    assert body["uuid"] == str(job.uuid)  # seed JOB_DAT.id
    assert (body["task"], body["parent_job"], body["pilot"]) == (task.pk, parent.pk, pilot.pk)
    assert (body["state"], body["cur_retry"], body["retries"]) == ("running", 1, 3)
    assert body["file_in"] is None and body["file_out"] is None and body["file_log"] is None


def test_list_filters(api_client, user):
    task = TaskFactory(owner=user)
    other_task = TaskFactory(owner=user, device_type="gpu")
    pilot = PilotFactory()
    running = JobFactory(task=task, state="running", pilot=pilot)
    queued = JobFactory(task=task, state="queued")
    gpu = JobFactory(task=other_task)
    merge = JobFactory(task=task, mode="merge")

    assert _ids(api_client.get(URL, {"task": other_task.pk})) == [gpu.pk]
    assert _ids(api_client.get(URL, {"state": "running"})) == [running.pk]
    assert _ids(api_client.get(URL + "?state=running&state=queued")) == [running.pk, queued.pk]
    assert _ids(api_client.get(URL, {"device_type": "gpu"})) == [gpu.pk]
    assert _ids(api_client.get(URL, {"pilot": pilot.pk})) == [running.pk]
    assert _ids(api_client.get(URL, {"mode": "merge"})) == [merge.pk]
    assert _ids(api_client.get(URL, {"task": task.pk, "mode": "map"})) == [running.pk, queued.pk]


def test_a_bad_filter_value_answers_400(api_client):
    for params in ({"state": "sleeping"}, {"task": "abc"}, {"device_type": "tpu"}):
        response = api_client.get(URL, params)
        assert response.status_code == 400
        assert response.json()["error"] == "validation_failed"
        assert set(response.json()["detail"]) == set(params)


def test_cursor_pagination_walks_every_job_once(api_client, user):
    task = TaskFactory(owner=user)
    jobs = [JobFactory(task=task) for _ in range(7)]

    seen, url, pages = [], URL + "?page_size=3", 0
    while url:
        response = api_client.get(url)
        body = response.json()
        assert "count" not in body  # a cursor page does not COUNT the table
        assert len(body["results"]) <= 3
        seen += [row["id"] for row in body["results"]]
        url, pages = body["next"], pages + 1

    assert seen == [j.pk for j in jobs]
    assert pages == 3

    # Descending order, cursor pagination still walks it.
    first = api_client.get(URL, {"page_size": 4, "ordering": "-id"}).json()
    second = api_client.get(first["next"]).json()
    assert [r["id"] for r in first["results"] + second["results"]] == [j.pk for j in reversed(jobs)]
    assert api_client.get(second["previous"]).json()["results"] == first["results"]


def test_a_bad_cursor_answers_400_naming_it(api_client):
    response = api_client.get(URL, {"cursor": "garbage"})
    assert response.status_code == 400
    assert response.json()["error"] == "validation_failed"
    assert list(response.json()["detail"]) == ["cursor"]


def test_detail_shows_attempts_and_transitions(api_client, user):
    job = JobFactory(task=TaskFactory(owner=user))
    job_transition(job_id=job.pk, target="queued", source=TransitionSource.EXECUTOR)
    job_transition(job_id=job.pk, target="running", source="pilot:1")
    first = JobAttemptFactory(
        job=job, number=0, state=AttemptState.FAILED, exit_code=3, error_code="payload"
    )
    JobAttemptFactory(job=job, number=1, pilot=first.pilot)

    body = api_client.get(detail_url(job)).json()

    assert [(a["number"], a["state"], a["exit_code"]) for a in body["attempts"]] == [
        (0, "failed", 3),
        (1, "running", None),
    ]
    assert body["attempts"][0]["pilot"] == first.pilot_id
    assert [(t["from_state"], t["to_state"], t["source"]) for t in body["transitions"]] == [
        ("defined", "queued", "executor"),
        ("queued", "running", "pilot:1"),
    ]


def test_cancel_a_running_job(api_client, user):
    job = JobFactory(task=TaskFactory(owner=user), state="running")
    attempt = JobAttemptFactory(job=job)

    response = api_client.post(detail_url(job, "cancel/"), {"reason": "wrong input"})

    assert response.status_code == 200
    body = response.json()
    assert body["state"] == "cancelled"
    assert body["attempts"][0]["state"] == "cancelled"
    assert body["transitions"][-1]["to_state"] == "cancelled"
    attempt.refresh_from_db()
    assert attempt.state == AttemptState.CANCELLED and attempt.kill_requested_at is not None
    assert Job.objects.get(pk=job.pk).time_end is not None

    # Idempotent: 200 again, no second transition.
    assert api_client.post(detail_url(job, "cancel/")).status_code == 200
    assert JobTransition.objects.filter(subject=job, to_state="cancelled").count() == 1


@pytest.mark.parametrize("state", ["finished", "failed"])
def test_cancel_a_final_job_answers_409(api_client, user, state):
    job = JobFactory(task=TaskFactory(owner=user), state=state)

    response = api_client.post(detail_url(job, "cancel/"))

    assert response.status_code == 409
    assert response.json()["error"] == "invalid_transition"
    assert Job.objects.get(pk=job.pk).state == state
    assert not JobTransition.objects.filter(subject=job).exists()


def test_cancel_another_users_job_answers_404(api_client, other_user):
    job = JobFactory(task=TaskFactory(owner=other_user), state="queued")
    response = api_client.post(detail_url(job, "cancel/"))
    assert response.status_code == 404
    assert Job.objects.get(pk=job.pk).state == "queued"


def test_jobs_are_read_only_here(api_client, user):
    job = JobFactory(task=TaskFactory(owner=user))
    for method in ("post", "patch", "put", "delete"):
        url = URL if method == "post" else detail_url(job)
        response = getattr(api_client, method)(url, {"state": "finished"}, format="json")
        assert response.status_code == 405, method
        assert response.json()["error"] == "method_not_allowed"
    assert Job.objects.get(pk=job.pk).state == "defined"


@pytest.mark.parametrize("rows", [1, 30])
def test_job_list_costs_a_constant_number_of_queries(
    api_client, user, rows, django_assert_max_num_queries
):
    task = TaskFactory(owner=user)
    pilot = PilotFactory()
    for _ in range(rows):
        job = JobFactory(task=task, pilot=pilot, state="running")
        JobAttemptFactory(job=job, pilot=pilot)

    # One query for the page (a cursor page needs no COUNT).
    with django_assert_max_num_queries(1):
        response = api_client.get(URL)

    assert len(response.json()["results"]) == rows
