"""The job admin: read-only pages with attempts, transitions and files inline; cancel action."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from files.models import FileType
from jobs.control import job_cancel, job_transition
from jobs.models import AttemptState, Job, JobAttempt, JobState, JobTransition
from tests.factories import (
    DatasetFactory,
    FileFactory,
    JobAttemptFactory,
    JobFactory,
    PilotFactory,
    TaskFactory,
)

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:jobs_job_changelist")


def messages_of(response):
    return [(m.level_tag, str(m)) for m in response.context["messages"]]


def run_action(client, action, objs):
    return client.post(
        CHANGELIST, {"action": action, "_selected_action": [o.pk for o in objs]}, follow=True
    )


def running_job():
    """A job walked to running through the service, with its attempt on a pilot."""
    job = JobFactory()
    for state in (JobState.QUEUED, JobState.RUNNING):
        job_transition(job_id=job.pk, target=state, source="executor")
    JobAttemptFactory(job=job)
    job.refresh_from_db()
    return job


def _queries(client, url):
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200
    return len(ctx.captured_queries), response


# --- pages -------------------------------------------------------------------------------------


def test_changelist_renders_without_n_plus_one(admin_client_logged):
    JobFactory(pilot=PilotFactory())
    one, _ = _queries(admin_client_logged, CHANGELIST)
    for _ in range(9):
        JobFactory(pilot=PilotFactory(), state=JobState.RUNNING)
    ten, response = _queries(admin_client_logged, CHANGELIST)
    assert len(response.context["cl"].result_list) == 10
    assert ten == one
    assert 'class="wms-badge wms-state-running"' in response.content.decode()


def test_change_page_shows_attempts_transitions_and_files_read_only(admin_client_logged):
    job = running_job()
    JobAttempt.objects.filter(job=job).update(error_code="stage_in_failed")
    FileFactory(job=job, file_name="in.000001.root", type=FileType.INPUT)
    FileFactory(job=job, file_name="out.000001.root", type=FileType.OUTPUT)

    response = admin_client_logged.get(reverse("admin:jobs_job_change", args=[job.pk]))

    assert response.status_code == 200
    html = response.content.decode()
    for text in ("stage_in_failed", "in.000001.root", "out.000001.root", "executor"):
        assert text in html
    inlines = {i.formset.model: i for i in response.context["inline_admin_formsets"]}
    assert set(inlines) == {JobAttempt, JobTransition, FileFactory._meta.model}
    for inline in inlines.values():
        assert not inline.has_add_permission
        assert not inline.has_change_permission
        assert not inline.has_delete_permission
    assert len(inlines[JobTransition].formset.forms) == 2
    assert len(inlines[JobAttempt].formset.forms) == 1
    assert len(inlines[FileFactory._meta.model].formset.forms) == 2
    # view-only: no form field at all, so no state field either
    assert not response.context["has_change_permission"]
    assert response.context["adminform"].form.fields == {}
    assert 'name="state"' not in html


def test_change_page_query_count_does_not_grow_with_attempts(admin_client_logged):
    job = running_job()
    url = reverse("admin:jobs_job_change", args=[job.pk])
    one, _ = _queries(admin_client_logged, url)
    JobAttempt.objects.filter(job=job).update(state=AttemptState.FAILED)
    for n in range(1, 5):
        JobAttemptFactory(job=job, number=n, pilot=PilotFactory(), state=AttemptState.FAILED)
        FileFactory(job=job, dataset=DatasetFactory())
    five, _ = _queries(admin_client_logged, url)
    assert five == one


def test_jobs_cannot_be_added_edited_or_deleted(admin_client_logged):
    job = JobFactory()
    assert admin_client_logged.get(reverse("admin:jobs_job_add")).status_code == 403
    assert (
        admin_client_logged.get(reverse("admin:jobs_job_delete", args=[job.pk])).status_code == 403
    )
    before = Job.objects.filter(pk=job.pk).values().get()
    admin_client_logged.post(
        reverse("admin:jobs_job_change", args=[job.pk]), {"state": "cancelled", "rank": "99"}
    )
    assert Job.objects.filter(pk=job.pk).values().get() == before


def test_attempt_and_transition_pages_render(admin_client_logged):
    job = running_job()
    attempt = job.attempts.get()
    tr = job.transitions.first()
    for url in (
        reverse("admin:jobs_jobattempt_changelist"),
        reverse("admin:jobs_jobattempt_change", args=[attempt.pk]),
        reverse("admin:jobs_jobtransition_changelist"),
        reverse("admin:jobs_jobtransition_change", args=[tr.pk]),
    ):
        assert admin_client_logged.get(url).status_code == 200, url
    assert admin_client_logged.get(reverse("admin:jobs_jobattempt_add")).status_code == 403


def test_filters_and_search(admin_client_logged):
    job = running_job()
    other = JobFactory()
    by_task = admin_client_logged.get(CHANGELIST, {"task__id__exact": job.task_id})
    assert list(by_task.context["cl"].result_list) == [job]
    by_state = admin_client_logged.get(CHANGELIST, {"state__exact": "running"})
    assert list(by_state.context["cl"].result_list) == [job]
    by_uuid = admin_client_logged.get(CHANGELIST, {"q": str(other.uuid)})
    assert list(by_uuid.context["cl"].result_list) == [other]
    by_task_id = admin_client_logged.get(CHANGELIST, {"q": str(other.task_id)})
    assert other in by_task_id.context["cl"].result_list
    by_source = admin_client_logged.get(
        reverse("admin:jobs_jobtransition_changelist"), {"to_state": "running"}
    )
    assert [t.subject_id for t in by_source.context["cl"].result_list] == [job.pk]


# --- the cancel action -------------------------------------------------------------------------


def test_cancel_action_cancels_through_the_service(admin_client_logged, admin_user):
    queued = JobFactory(state=JobState.QUEUED)
    running = running_job()

    response = run_action(admin_client_logged, "cancel_jobs", [queued, running])

    assert ("success", "2 jobs cancelled.") in messages_of(response)
    for job in (queued, running):
        job.refresh_from_db()
        assert job.state == JobState.CANCELLED
        assert job.time_end is not None
        tr = JobTransition.objects.get(subject=job, to_state=JobState.CANCELLED)
        assert tr.source == "admin"
        assert admin_user.username in tr.reason
    # job_cancel's own effect on a running job: its attempt is marked cancelled, kill asked
    attempt = running.attempts.get()
    assert attempt.state == AttemptState.CANCELLED and attempt.kill_requested_at is not None


def test_cancel_of_a_finished_job_shows_an_error_and_changes_nothing(admin_client_logged):
    job = JobFactory(state=JobState.FINISHED)

    response = run_action(admin_client_logged, "cancel_jobs", [job])

    msgs = messages_of(response)
    assert [level for level, _ in msgs] == ["error"]
    assert "finished" in msgs[0][1]
    assert Job.objects.get(pk=job.pk).state == JobState.FINISHED
    assert not JobTransition.objects.filter(subject=job).exists()


def test_cancel_of_a_cancelled_job_is_a_no_op(admin_client_logged):
    job = JobFactory(state=JobState.QUEUED)
    job_cancel(job_id=job.pk, source="api")

    response = run_action(admin_client_logged, "cancel_jobs", [job])

    assert ("warning", "1 job already cancelled.") in messages_of(response)
    assert JobTransition.objects.filter(subject=job).count() == 1


def test_task_link_on_changelist_points_to_the_task(admin_client_logged):
    task = TaskFactory(name="the-task")
    JobFactory(task=task)
    html = admin_client_logged.get(CHANGELIST).content.decode()
    assert reverse("admin:tasks_task_change", args=[task.pk]) in html
