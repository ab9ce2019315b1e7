"""Issue 13, item 2, with real processes: silence of the server is not death of the pilots.

The web app (only it: the worker with beat and the reaper keep running) is stopped for longer
than ``WMS_PILOT_LOST_AFTER`` while a task's jobs run on two pilots, then started again on the
same port. Every pilot hears nothing for that long, so the reaper holds instead of declaring
them lost; the pilots run on, spool their reports and back off. Afterwards: the same pilot
processes still run, the task finishes, and no job ran in two attempts (let alone two that
overlapped).
"""

from __future__ import annotations

import itertools

import psutil
import pytest
from django.utils import timezone

from devtools.stack import port_is_free
from jobs.models import AttemptState, Job, JobAttempt, JobState
from pilots.models import Pilot, PilotState, PilotTransition, ReaperState
from tests.e2e.conftest import wait_until
from tests.e2e.test_pilots_e2e import _all_final, _dataset, _task
from tests.factories import UserFactory

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

LOST_AFTER = 6
JOBS = 6


def test_the_web_app_down_longer_than_lost_after_loses_no_pilot_and_runs_no_job_twice(
    make_stack, tmp_path
):
    owner = UserFactory()
    uid = _dataset(tmp_path, "e2e.outage", JOBS)
    stack, out = make_stack(
        cpu=2,
        gpu=0,
        env={
            "WMS_PILOT_LOST_AFTER": str(LOST_AFTER),
            "WMS_REAP_EVERY": "1",
            "WMS_HEARTBEAT_INTERVAL": "1",
            "WMS_NOT_ON_PILOT_GRACE": "10",
        },
    )
    pilots = {c.name: c.proc.pid for c in stack.children if c.name.startswith("pilot")}
    assert len(pilots) == 2
    task = _task(owner, uid, tmp_path, "outage", args="--events 200 --sleep 3")
    wait_until(
        lambda: JobAttempt.objects.filter(job__task=task, state=AttemptState.RUNNING).exists(),
        timeout=120,
        what="a job to start",
        out=out,
    )

    # The web app goes away (only the PIDs of this stack's web child are signalled).
    (web,) = [c for c in stack.children if c.name == "web"]
    web.expected_exit = True
    stack._stop_group([web])
    stack.children.remove(web)
    down_at = timezone.now()
    stack.say(f"web app stopped for the outage test at {down_at.isoformat()}")

    # The reaper (still running in the worker) sees every pilot silent: it holds ...
    hold = wait_until(
        lambda: ReaperState.objects.filter(hold_since__isnull=False).first(),
        timeout=60,
        what="the reaper to hold",
        out=out,
    )
    assert "all 2 live pilots" in hold.hold_reason
    # ... and keeps holding past WMS_PILOT_LOST_AFTER of silence (plus a margin).
    wait_until(
        lambda: (
            (timezone.now() - down_at).total_seconds() > LOST_AFTER + 4
            and ReaperState.objects.filter(hold_since__isnull=False).exists()
        ),
        timeout=60,
        what="the outage to outlast WMS_PILOT_LOST_AFTER",
        out=out,
    )
    assert not Pilot.objects.filter(state=PilotState.LOST).exists()

    # The web app comes back on the same address.
    wait_until(lambda: port_is_free(stack.config.host, stack.port), timeout=30, what="the port")
    stack.start_web()
    stack.wait_healthy(timeout=60)

    wait_until(
        lambda: _all_final([task.pk], JOBS),
        timeout=240,
        what="every job to end after the outage",
        out=out,
    )
    stack.check_alive()  # no pilot exited
    for name, pid in pilots.items():
        child = next(c for c in stack.children if c.name == name)
        assert child.returncode is None and child.proc.pid == pid, f"{name} exited"
        assert psutil.pid_exists(pid)
    assert not PilotTransition.objects.filter(to_state=PilotState.LOST).exists()
    state = ReaperState.objects.get()
    assert state.hold_since is None and state.last_hold_ended_at is not None
    assert state.last_hold_started_at is not None and state.last_hold_started_at >= down_at

    jobs = list(Job.objects.filter(task=task))
    assert len(jobs) == JOBS
    assert {j.state for j in jobs} == {JobState.FINISHED}, out.text()[-4000:]
    for job in jobs:
        attempts = list(job.attempts.order_by("number"))
        for a, b in itertools.combinations(attempts, 2):  # never two at once
            assert a.ended_at is not None and b.ended_at is not None
            assert a.ended_at <= b.started_at or b.ended_at <= a.started_at, (job.pk, a, b)
        # and, the hold having worked, never two at all
        assert [(a.number, a.state) for a in attempts] == [(0, AttemptState.FINISHED)]
        assert job.files.filter(type="output").count() == 1


def test_a_lone_pilot_declared_lost_comes_back_reclaims_its_job_and_never_exits(
    make_stack, tmp_path
):
    """One pilot: its silence is its own, so the outage does make the reaper declare it lost
    and its running attempt lost; the job goes back to the queue as attempt 1. When the web
    app is back, the pilot (the same process) is live again, reclaims attempt 0, and the
    message of attempt 1 is refused as stale: every job ran once."""
    owner = UserFactory()
    uid = _dataset(tmp_path, "e2e.reclaim", 3)
    stack, out = make_stack(
        cpu=1,
        gpu=0,
        env={
            "WMS_PILOT_LOST_AFTER": "4",
            "WMS_REAP_EVERY": "1",
            "WMS_HEARTBEAT_INTERVAL": "1",
            "WMS_NOT_ON_PILOT_GRACE": "10",
        },
    )
    (pilot_child,) = [c for c in stack.children if c.name.startswith("pilot")]
    task = _task(owner, uid, tmp_path, "reclaim", args="--events 200 --sleep 6")
    first = wait_until(
        lambda: JobAttempt.objects.filter(job__task=task, state=AttemptState.RUNNING).first(),
        timeout=120,
        what="a job to start",
        out=out,
    )

    (web,) = [c for c in stack.children if c.name == "web"]
    web.expected_exit = True
    stack._stop_group([web])
    stack.children.remove(web)
    wait_until(
        lambda: (
            JobAttempt.objects.filter(pk=first.pk, state=AttemptState.LOST).exists()
            and Job.objects.filter(pk=first.job_id, cur_retry=1).exists()
        ),
        timeout=60,
        what="the reaper to declare the lone pilot and its attempt lost",
        out=out,
    )
    assert Pilot.objects.get(pk=first.pilot_id).state == PilotState.LOST

    wait_until(lambda: port_is_free(stack.config.host, stack.port), timeout=30, what="the port")
    stack.start_web()
    stack.wait_healthy(timeout=60)
    wait_until(lambda: _all_final([task.pk], 3), timeout=240, what="every job to end", out=out)

    stack.check_alive()
    assert pilot_child.returncode is None and psutil.pid_exists(pilot_child.proc.pid)
    back = PilotTransition.objects.filter(subject_id=first.pilot_id, from_state=PilotState.LOST)
    assert back.get().reason == "heard from again"
    job = Job.objects.get(pk=first.job_id)
    assert job.transitions.filter(reason="reclaimed: the pilot came back").count() == 1
    for job in Job.objects.filter(task=task):
        assert job.state == JobState.FINISHED, out.text()[-4000:]
        # attempt 0 only: the lost one reclaimed and finished, attempt 1 never started
        assert [(a.number, a.state) for a in job.attempts.all()] == [(0, AttemptState.FINISHED)]
        assert job.files.filter(type="output").count() == 1
