"""A lost pilot comes back: its heartbeat reconciles the attempts it names (pilots.reconcile).

Each branch: carry on, reclaim (from ``defined`` and from ``queued``, by a running attempt or
by a report in the spool, or by the report itself arriving first), kill (a newer attempt
elsewhere, a held, cancelled or failed job, another pilot's attempt), ``not_on_pilot``; and
the late report of an attempt that lost its job registers nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from files.models import File, FileType
from jobs.control import job_cancel, job_hold
from jobs.models import AttemptState, Job, JobAttempt, JobState
from jobs.reclaim import RECLAIM_REASON
from pilots.models import CommandKind, Pilot, PilotCommand, PilotState
from pilots.reaper import pilots_reap_lost
from pilots.services import pilot_heartbeat
from tests.factories import JobAttemptFactory, JobFactory
from tests.jobs.pilot_reports import output, snapshot, started

pytestmark = pytest.mark.django_db


def beat(client, pilot, **body):
    body.setdefault("state", "busy")
    response = client.post(f"/api/v1/pilots/{pilot.pk}/heartbeat/", body, format="json")
    assert response.status_code == 200, response.json()
    return response.json()


def named(*jobs, attempt=0):
    return [{"job_uuid": str(j.uuid), "attempt": attempt} for j in jobs]


def report(client, job, attempt=0, **body):
    body.setdefault("state", "finished")
    body.setdefault("exit_code", 0)
    return client.post(
        f"/api/v1/jobs/{job.uuid}/report/", {"attempt": attempt, **body}, format="json"
    )


@pytest.fixture
def lost(make_pilot, output_task, settings):
    """A pilot that runs a job, then is declared lost by the reaper: attempt 0 ``lost``, the
    job back to ``defined`` at attempt 1."""
    pilot, client = make_pilot()
    job = started(client, output_task)
    settings.WMS_PILOT_LOST_AFTER = 0
    assert pilots_reap_lost().attempts == 1
    settings.WMS_PILOT_LOST_AFTER = 300
    job.refresh_from_db()
    assert (job.state, job.cur_retry) == (JobState.DEFINED, 1)
    assert Pilot.objects.get(pk=pilot.pk).state == PilotState.LOST
    return pilot, client, job


def kills(answer) -> list[tuple[str, int]]:
    return [(c["job_uuid"], c["attempt"]) for c in answer["commands"] if c["command"] == "kill_job"]


# --- reclaim -----------------------------------------------------------------------------------


@pytest.mark.parametrize("waiting", [JobState.DEFINED, JobState.QUEUED])
def test_a_lost_pilot_back_with_its_job_running_reclaims_it(lost, make_pilot, output_task, waiting):
    pilot, client, job = lost
    Job.objects.filter(pk=job.pk).update(state=waiting)  # queued: the executor published it

    answer = beat(client, pilot, jobs=named(job), reporting=[])

    assert answer["state"] == "busy" and answer["commands"] == []
    job.refresh_from_db()
    assert (job.state, job.cur_retry, job.pilot_id) == (JobState.RUNNING, 0, pilot.pk)
    row = job.transitions.order_by("at", "id").last()
    assert (row.from_state, row.to_state) == (waiting, JobState.RUNNING)
    assert (row.source, row.reason) == (f"pilot:{pilot.pk}", RECLAIM_REASON)
    attempt = JobAttempt.objects.get(job=job)
    assert (attempt.number, attempt.state, attempt.ended_at, attempt.error_code) == (
        0,
        AttemptState.RUNNING,
        None,
        "",
    )
    # the queued message of attempt 1 is refused as stale at start, by any pilot
    _, other = make_pilot(hostname="wn2.test")
    refused = other.post(f"/api/v1/jobs/{job.uuid}/start/", {"attempt": 1}, format="json")
    assert refused.status_code == 409 and refused.json()["error"] == "stale_attempt"
    # and the pilot's report is applied: outputs registered once, the job finished
    done = report(client, job, outputs=[output(output_task)])
    assert done.json() == {"job_state": "finished", "outcome": "applied"}
    assert File.objects.filter(job=job, type=FileType.OUTPUT).count() == 1


def test_a_lost_pilot_back_with_the_report_in_its_spool_reclaims_then_reports(lost, output_task):
    pilot, client, job = lost

    answer = beat(client, pilot, state="idle", jobs=[], reporting=named(job))

    assert answer["commands"] == [] and answer["state"] == "idle"
    assert Job.objects.get(pk=job.pk).state == JobState.RUNNING
    assert report(client, job, outputs=[output(output_task)]).json()["outcome"] == "applied"
    job.refresh_from_db()
    assert (job.state, job.cur_retry) == (JobState.FINISHED, 0)
    assert job.attempts.count() == 1


def test_the_report_arriving_before_the_heartbeat_reclaims_too(lost, output_task):
    """The spool's sender and the heartbeat are two threads: the report may come first."""
    pilot, client, job = lost

    answer = report(client, job, outputs=[output(output_task)])

    assert answer.json() == {"job_state": "finished", "outcome": "applied"}
    job.refresh_from_db()
    assert (job.state, job.cur_retry, job.pilot_id) == (JobState.FINISHED, 0, pilot.pk)
    assert File.objects.filter(job=job, type=FileType.OUTPUT).count() == 1
    reasons = list(job.transitions.order_by("at", "id").values_list("to_state", "reason"))
    assert reasons[-2:] == [
        (JobState.RUNNING, RECLAIM_REASON),
        (JobState.FINISHED, "attempt finished"),
    ]


# --- kill --------------------------------------------------------------------------------------


def test_a_newer_attempt_elsewhere_means_a_kill_and_the_late_report_registers_nothing(
    lost, make_pilot, output_task
):
    pilot, client, job = lost
    Job.objects.filter(pk=job.pk).update(state=JobState.QUEUED)
    other_pilot, other = make_pilot(hostname="wn2.test")
    assert other.post(f"/api/v1/jobs/{job.uuid}/start/", {"attempt": 1}).status_code == 200

    answer = beat(client, pilot, jobs=named(job), reporting=[])

    assert kills(answer) == [(str(job.uuid), 0)]
    assert beat(client, pilot, jobs=named(job), reporting=[])["commands"] == []  # not twice
    assert PilotCommand.objects.filter(pilot=pilot, command=CommandKind.KILL_JOB).count() == 1
    job.refresh_from_db()
    assert (job.state, job.cur_retry, job.pilot_id) == (JobState.RUNNING, 1, other_pilot.pk)
    before = snapshot()
    late = report(client, job, outputs=[output(output_task)])
    assert late.json() == {"job_state": "running", "outcome": "ignored"}
    assert snapshot() == before  # no output of attempt 0 registered, nothing moved
    assert not File.objects.filter(job=job, type=FileType.OUTPUT).exists()
    # the attempt that owns the job reports: its outputs are the ones registered
    assert report(other, job, attempt=1, outputs=[output(output_task, "b.json")]).json() == {
        "job_state": "finished",
        "outcome": "applied",
    }
    (registered,) = File.objects.filter(job=job, type=FileType.OUTPUT)
    assert registered.file_name.endswith("b.json")


@pytest.mark.parametrize("fate", ["held", "cancelled", "failed"])
def test_a_held_cancelled_or_failed_job_is_not_reclaimed_the_pilot_gets_a_kill(lost, fate):
    pilot, client, job = lost
    if fate == "held":
        job_hold(job_id=job.pk, source="api", reason="operator")
    elif fate == "cancelled":
        job_cancel(job_id=job.pk, source="api", reason="not needed")
    else:
        Job.objects.filter(pk=job.pk).update(state=JobState.FAILED)

    answer = beat(client, pilot, jobs=named(job), reporting=[])

    assert kills(answer) == [(str(job.uuid), 0)]
    assert Job.objects.get(pk=job.pk).state == fate
    assert JobAttempt.objects.get(job=job).state == AttemptState.LOST


def test_another_pilots_attempt_or_one_never_started_gets_a_kill(make_pilot, output_task):
    pilot, client = make_pilot()
    beat(client, pilot, state="idle")
    _, other = make_pilot(hostname="wn2.test")
    theirs = started(other, output_task)
    never = JobFactory(task=output_task, state=JobState.QUEUED)

    answer = beat(client, pilot, jobs=named(theirs, never), reporting=[])

    assert sorted(kills(answer)) == sorted([(str(theirs.uuid), 0), (str(never.uuid), 0)])
    assert Job.objects.get(pk=theirs.pk).state == JobState.RUNNING  # untouched
    assert Job.objects.get(pk=never.pk).state == JobState.QUEUED


def test_only_running_attempts_are_killed_an_ended_one_in_the_spool_is_left_to_its_report(
    lost, make_pilot
):
    pilot, client, job = lost
    Job.objects.filter(pk=job.pk).update(state=JobState.QUEUED)
    _, other = make_pilot(hostname="wn2.test")
    assert other.post(f"/api/v1/jobs/{job.uuid}/start/", {"attempt": 1}).status_code == 200

    answer = beat(client, pilot, state="idle", jobs=[], reporting=named(job))

    assert answer["commands"] == []


# --- carry on, not on pilot --------------------------------------------------------------------


def test_the_current_attempts_carry_on(make_pilot, output_task):
    pilot, client = make_pilot()
    job = started(client, output_task)
    before = snapshot()

    answer = beat(client, pilot, jobs=named(job), reporting=[])

    assert answer["commands"] == []
    assert snapshot()[:2] == before[:2]  # jobs and attempts as they were (metrics aside)


def test_an_attempt_the_pilot_does_not_name_fails_as_not_on_pilot_after_the_grace(
    make_pilot, output_task, settings
):
    settings.WMS_NOT_ON_PILOT_GRACE = 60
    pilot, client = make_pilot()
    gone, fresh, spooled, running = (started(client, output_task) for _ in range(4))
    JobAttempt.objects.filter(job__in=[gone, spooled, running]).update(
        started_at=timezone.now() - timedelta(seconds=61)
    )

    beat(client, pilot, jobs=named(running))  # no `reporting`: an older agent, not trusted
    assert JobAttempt.objects.filter(pilot=pilot, state=AttemptState.RUNNING).count() == 4

    answer = beat(client, pilot, jobs=named(running), reporting=named(spooled))

    assert answer["commands"] == []
    states = dict(JobAttempt.objects.filter(pilot=pilot).values_list("job_id", "state"))
    assert states == {
        gone.pk: AttemptState.FAILED,  # named nowhere, started long ago
        fresh.pk: AttemptState.RUNNING,  # within the grace: its start may be in flight
        spooled.pk: AttemptState.RUNNING,  # its report is on its way
        running.pk: AttemptState.RUNNING,
    }
    attempt = JobAttempt.objects.get(job=gone)
    assert attempt.error_code == "not_on_pilot" and attempt.ended_at is not None
    gone.refresh_from_db()
    assert (gone.state, gone.cur_retry) == (JobState.DEFINED, 1)
    assert gone.transitions.last().source == f"pilot:{pilot.pk}"


def test_an_attempt_started_after_the_previous_heartbeat_is_not_failed(
    make_pilot, output_task, settings
):
    """The heartbeat may have been written before the start (it lingered on its way): only an
    attempt that also predates the pilot's previous heartbeat counts as not on the pilot."""
    settings.WMS_NOT_ON_PILOT_GRACE = 60
    pilot, client = make_pilot()
    job = started(client, output_task)
    now = timezone.now()
    Pilot.objects.filter(pk=pilot.pk).update(last_heartbeat=now - timedelta(seconds=120))
    JobAttempt.objects.filter(job=job).update(started_at=now - timedelta(seconds=90))

    beat(client, pilot, state="idle", jobs=[], reporting=[])

    assert JobAttempt.objects.get(job=job).state == AttemptState.RUNNING
    beat(client, pilot, state="idle", jobs=[], reporting=[])  # named by neither, again
    assert JobAttempt.objects.get(job=job).error_code == "not_on_pilot"


def test_a_bad_reporting_list_is_400(make_pilot):
    pilot, client = make_pilot()
    url = f"/api/v1/pilots/{pilot.pk}/heartbeat/"
    for bad in ([{"job_uuid": "nope", "attempt": 0}], [{"attempt": 0}], "x"):
        response = client.post(url, {"state": "idle", "reporting": bad}, format="json")
        assert response.status_code == 400 and response.json()["error"] == "validation_failed"


def test_reconciliation_costs_the_same_queries_whatever_it_reconciles(
    make_pilot, output_task, settings
):
    """Reclaims, kills, not_on_pilot and carry-ons in one heartbeat: a constant cost."""

    def cost(n):
        pilot, client = make_pilot(hostname=f"wn{n}")
        mine = [started(client, output_task) for _ in range(3 * n)]
        settings.WMS_PILOT_LOST_AFTER = settings.WMS_PILOT_LOST_AFTER_OUTAGE = 0
        pilots_reap_lost()  # (the valve: the other test's pilot is silent too)
        settings.WMS_PILOT_LOST_AFTER = settings.WMS_PILOT_LOST_AFTER_OUTAGE = 300
        reclaim, kill, carry = mine[:n], mine[n : 2 * n], mine[2 * n :]
        Job.objects.filter(pk__in=[j.pk for j in kill]).update(state=JobState.CANCELLED)
        Job.objects.filter(pk__in=[j.pk for j in carry]).update(state=JobState.RUNNING, cur_retry=0)
        JobAttempt.objects.filter(job__in=carry).update(state=AttemptState.RUNNING, ended_at=None)
        missing = []
        for _ in range(n):
            job = JobFactory(task=output_task, state=JobState.RUNNING, pilot=pilot)
            JobAttemptFactory(
                job=job, pilot=pilot, number=0, started_at=timezone.now() - timedelta(hours=1)
            )
            missing.append(job)
        with CaptureQueriesContext(connection) as ctx:
            reply = pilot_heartbeat(
                pilot_id=pilot.pk,
                state="busy",
                jobs=named(*reclaim, *kill, *carry),
                reporting=[],
            )
        assert len(reply.commands) == n
        assert Job.objects.filter(pk__in=[j.pk for j in reclaim], state="running").count() == n
        failed = JobAttempt.objects.filter(job_id__in=[j.pk for j in missing])
        assert failed.filter(error_code="not_on_pilot").count() == n
        return len(ctx.captured_queries)

    assert cost(2) == cost(15)
