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

from jobs.models import AttemptState, Job, JobAttempt, JobState
from pilots.models import Pilot, PilotState, PilotTransition, ReaperState
from tests.e2e.conftest import wait_until
from tests.e2e.test_pilots_e2e import _all_final, _dataset, _task
from tests.factories import UserFactory
from wms.stack import port_is_free

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
