"""API v1: cancel, hold and release a SET of jobs in one call (``POST /api/v1/jobs/cancel/``,
``/hold/``, ``/release/`` with ``{"ids": [...], "reason"?: ...}``)."""

import pytest
from django.urls import resolve
from rest_framework.test import APIClient

from jobs.models import AttemptState, Job, JobAttempt, JobState, JobTransition
from pilots.models import CommandKind, PilotCommand
from tests.factories import JobAttemptFactory, JobFactory, PilotFactory, TaskFactory

pytestmark = pytest.mark.django_db

URL = "/api/v1/jobs/"
CANCEL, HOLD, RELEASE = f"{URL}cancel/", f"{URL}hold/", f"{URL}release/"


def _states(jobs):
    by_id = dict(Job.objects.filter(pk__in=[j.pk for j in jobs]).values_list("pk", "state"))
    return [by_id[j.pk] for j in jobs]


def _post(client, url, body):
    return client.post(url, body, format="json")


def test_bulk_cancel_of_jobs_in_every_state(api_client, user):
    task = TaskFactory(owner=user)
    defined = JobFactory(task=task)
    queued = JobFactory(task=task, state=JobState.QUEUED)
    held = JobFactory(task=task, state=JobState.HELD)
    running = JobFactory(task=task, state=JobState.RUNNING)
    attempt = JobAttemptFactory(job=running)
    finished = JobFactory(task=task, state=JobState.FINISHED)
    failed = JobFactory(task=task, state=JobState.FAILED)
    jobs = [defined, queued, held, running, finished, failed]

    response = _post(api_client, CANCEL, {"ids": [j.pk for j in jobs], "reason": "bad input"})

    assert response.status_code == 200, response.json()
    assert response.json() == {
        "requested": 6,
        "changed": 4,
        "unchanged": sorted([finished.pk, failed.pk]),
    }
    assert _states(jobs) == ["cancelled"] * 4 + ["finished", "failed"]
    # One transition per job moved, from its own state, source api, with the reason and who.
    rows = JobTransition.objects.filter(to_state=JobState.CANCELLED).order_by("subject_id")
    assert [(t.subject_id, t.from_state, t.source) for t in rows] == [
        (defined.pk, "defined", "api"),
        (queued.pk, "queued", "api"),
        (held.pk, "held", "api"),
        (running.pk, "running", "api"),
    ]
    assert {t.reason for t in rows} == {f"bad input (by {user.get_username()})"}
    assert not JobTransition.objects.filter(subject__in=[finished, failed]).exists()
    # The running attempt is cancelled with its kill asked, and its pilot gets a kill command.
    attempt.refresh_from_db()
    assert attempt.state == AttemptState.CANCELLED and attempt.kill_requested_at is not None
    command = PilotCommand.objects.get()
    assert (command.pilot_id, command.command, command.job_id, command.attempt) == (
        attempt.pilot_id,
        CommandKind.KILL_JOB,
        running.pk,
        attempt.number,
    )

    # Idempotent: nothing more to do, no new transition, no second kill.
    again = _post(api_client, CANCEL, {"ids": [j.pk for j in jobs]})
    assert again.json() == {
        "requested": 6,
        "changed": 0,
        "unchanged": sorted([finished.pk, failed.pk]),
    }
    assert JobTransition.objects.filter(to_state=JobState.CANCELLED).count() == 4
    assert PilotCommand.objects.count() == 1


def test_the_default_reason_names_who_asked(api_client, user):
    job = JobFactory(task=TaskFactory(owner=user))
    assert _post(api_client, HOLD, {"ids": [job.pk]}).status_code == 200
    transition = JobTransition.objects.get(subject=job)
    assert transition.reason == f"hold requested by {user.get_username()}"


def test_another_users_job_in_the_set_answers_400_and_nothing_changes(api_client, user, other_user):
    mine = JobFactory(task=TaskFactory(owner=user), state=JobState.QUEUED)
    theirs = JobFactory(task=TaskFactory(owner=other_user), state=JobState.QUEUED)
    missing = theirs.pk + 1000

    response = _post(api_client, CANCEL, {"ids": [mine.pk, missing, theirs.pk]})

    assert response.status_code == 400
    # Another user's job and a job that does not exist look the same.
    assert response.json() == {
        "error": "validation_failed",
        "detail": {"ids": [f"Unknown job ids: {theirs.pk}, {missing}."]},
    }
    assert _states([mine, theirs]) == ["queued", "queued"]
    assert not JobTransition.objects.exists()


def test_many_unknown_ids_are_listed_up_to_20(api_client, user):
    mine = JobFactory(task=TaskFactory(owner=user))
    unknown = list(range(mine.pk + 1, mine.pk + 26))

    response = _post(api_client, HOLD, {"ids": [mine.pk, *unknown]})

    assert response.status_code == 400
    listed = ", ".join(str(i) for i in unknown[:20])
    assert response.json()["detail"] == {"ids": [f"Unknown job ids: {listed} and 5 more."]}
    assert _states([mine]) == ["defined"]


def test_staff_act_on_any_job(admin_user, user, other_user):
    jobs = [JobFactory(task=TaskFactory(owner=u), state="queued") for u in (user, other_user)]
    client = APIClient()
    client.force_authenticate(admin_user)

    response = _post(client, CANCEL, {"ids": [j.pk for j in jobs]})

    assert response.json() == {"requested": 2, "changed": 2, "unchanged": []}
    assert _states(jobs) == ["cancelled", "cancelled"]


def test_hold_then_release_a_set(api_client, user):
    task = TaskFactory(owner=user)
    defined = JobFactory(task=task)
    queued = JobFactory(task=task, state=JobState.QUEUED)
    running = JobFactory(task=task, state=JobState.RUNNING)
    finished = JobFactory(task=task, state=JobState.FINISHED)
    jobs = [defined, queued, running, finished]
    ids = [j.pk for j in jobs]

    held = _post(api_client, HOLD, {"ids": ids})
    assert held.json() == {
        "requested": 4,
        "changed": 2,
        "unchanged": sorted([running.pk, finished.pk]),
    }
    assert _states(jobs) == ["held", "held", "running", "finished"]
    # Holding held jobs is a no-op: not changed, and not listed as refused either.
    assert _post(api_client, HOLD, {"ids": ids}).json()["changed"] == 0

    released = _post(api_client, RELEASE, {"ids": ids})
    assert released.json() == {
        "requested": 4,
        "changed": 2,
        "unchanged": sorted([running.pk, finished.pk]),
    }
    # held → defined, whichever state the job was held from.
    assert _states(jobs) == ["defined", "defined", "running", "finished"]
    assert [
        (t.subject_id, t.from_state, t.to_state)
        for t in JobTransition.objects.filter(source="api").order_by("id")
    ] == [
        (defined.pk, "defined", "held"),
        (queued.pk, "queued", "held"),
        (defined.pk, "held", "defined"),
        (queued.pk, "held", "defined"),
    ]
    # Releasing jobs that are not held: a defined one is a no-op, a queued one is refused.
    other = JobFactory(task=task, state=JobState.QUEUED)
    again = _post(api_client, RELEASE, {"ids": [defined.pk, other.pk]})
    assert again.json() == {"requested": 2, "changed": 0, "unchanged": [other.pk]}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"ids": []}, "ids"),
        ({"ids": 5}, "ids"),
        ({"ids": "1,2"}, "ids"),
        ({"ids": ["x"]}, "ids"),
        ({"ids": [1.5]}, "ids"),
        ({"ids": [None]}, "ids"),
        ({"ids": [True]}, "ids"),
        ({"ids": [-3]}, "ids"),
        ({"ids": [0]}, "ids"),
        ({"ids": [2**63]}, "ids"),
        ({"ids": list(range(1, 10_002))}, "ids"),
        ({}, "ids"),
        ({"ids": "mine", "state": "cancelled"}, "state"),
        ({"ids": "mine", "reason": "x" * 1001}, "reason"),
    ],
)
def test_bad_bodies_answer_400(api_client, user, body, field):
    job = JobFactory(task=TaskFactory(owner=user))
    if body.get("ids") == "mine":  # a good list: the other field is what is wrong
        body = {**body, "ids": [job.pk]}

    response = _post(api_client, CANCEL, body)

    assert response.status_code == 400, response.json()
    assert response.json()["error"] == "validation_failed"
    assert field in response.json()["detail"]
    assert _states([job]) == ["defined"]


def test_repeated_ids_answer_400(api_client, user):
    jobs = JobFactory.create_batch(2, task=TaskFactory(owner=user))
    ids = [jobs[0].pk, jobs[1].pk, jobs[0].pk]

    response = _post(api_client, CANCEL, {"ids": ids})

    assert response.status_code == 400
    assert response.json()["detail"] == {"ids": [f"Repeated job ids: {jobs[0].pk}."]}
    assert _states(jobs) == ["defined", "defined"]


def test_anonymous_answers_401(anon_client):
    job = JobFactory()
    for url in (CANCEL, HOLD, RELEASE):
        response = _post(anon_client, url, {"ids": [job.pk]})
        assert response.status_code == 401
        assert response.json()["error"] == "not_authenticated"
    assert _states([job]) == ["defined"]


def test_the_set_routes_and_the_job_routes_live_side_by_side(api_client, user):
    job = JobFactory(task=TaskFactory(owner=user), state=JobState.QUEUED)
    for verb in ("cancel", "hold", "release"):
        assert resolve(f"{URL}{verb}/").url_name == f"job-bulk-{verb}"
        assert resolve(f"{URL}{job.pk}/{verb}/").url_name == f"job-{verb}"
        # A verb is not taken for a job id: only POST is allowed on the set's route.
        response = api_client.get(f"{URL}{verb}/")
        assert response.status_code == 405
        assert response.json()["error"] == "method_not_allowed"

    # The one-job routes still answer with the job.
    response = api_client.post(f"{URL}{job.pk}/hold/")
    assert response.status_code == 200 and response.json()["state"] == "held"


def test_a_set_of_500_jobs_costs_a_bounded_number_of_queries(
    api_client, user, django_assert_max_num_queries
):
    task = TaskFactory(owner=user)
    pilot = PilotFactory()
    running = JobFactory.create_batch(100, task=task, state=JobState.RUNNING)
    for job in running:
        JobAttemptFactory(job=job, pilot=pilot)
    jobs = [
        *running,
        *JobFactory.create_batch(200, task=task, state=JobState.QUEUED),
        *JobFactory.create_batch(100, task=task, state=JobState.HELD),
        *JobFactory.create_batch(50, task=task),
        *JobFactory.create_batch(50, task=task, state=JobState.FINISHED),
    ]
    ids = [j.pk for j in jobs]

    # Per source state one UPDATE (with its transition rows); the kills; the ids' checks; and
    # the savepoints of the nested transactions. None of it grows with the number of jobs.
    with django_assert_max_num_queries(25):
        response = _post(api_client, CANCEL, {"ids": ids})

    assert response.json()["changed"] == 450
    assert len(response.json()["unchanged"]) == 50
    assert JobTransition.objects.filter(to_state=JobState.CANCELLED).count() == 450
    assert JobAttempt.objects.filter(state=AttemptState.CANCELLED).count() == 100
    assert PilotCommand.objects.filter(command=CommandKind.KILL_JOB).count() == 100
