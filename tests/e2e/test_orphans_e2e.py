"""Issue 13, item 1, end to end: a pilot and its guardian both SIGKILLed mid-job leave the
payload running; a pilot started again on the same work directory kills it, tells the WMS at
registration, and the WMS, with the evidence (same host, the dead pilot silent for two
heartbeat intervals, the reported attempt running on it), retries the job at once instead of
after ``WMS_PILOT_LOST_AFTER`` (here an hour)."""

from __future__ import annotations

import os
import signal
from datetime import timedelta

import psutil
import pytest
from django.utils import timezone

from jobs.models import AttemptState, JobAttempt
from pilots.models import Pilot, PilotState
from tests.e2e.conftest import wait_until
from tests.e2e.test_pilots_e2e import _dataset, _payload_of, _task
from tests.factories import UserFactory

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

HEARTBEAT = 2  # the stacks' heartbeat interval (tests/e2e/conftest.py)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_a_new_pilot_kills_the_orphan_and_the_wms_retries_the_job_at_once(make_stack, tmp_path):
    owner = UserFactory()
    uid = _dataset(tmp_path, "e2e.orphan", 1)
    stack, out = make_stack(cpu=1, gpu=0, env={"WMS_PILOT_LOST_AFTER": "3600"})
    task = _task(owner, uid, tmp_path, "orphan", args="--events 100 --sleep 120", max_retries=2)
    first = wait_until(
        lambda: JobAttempt.objects.filter(job__task=task, state=AttemptState.RUNNING).first(),
        timeout=120,
        what="the job to start",
        out=out,
    )
    job = first.job
    payload = wait_until(lambda: _payload_of(str(job.uuid)), timeout=30, what="the payload")
    agent = payload.parent()
    assert agent is not None and "pilots.agent" in " ".join(agent.cmdline())
    guardian = next(c for c in agent.children() if "pilots.agent.guard" in " ".join(c.cmdline()))
    name = next(c.name for c in stack.children if c.proc.pid == agent.pid)

    guardian.kill()  # the guardian first: nothing is left to clean up after the pilot
    wait_until(lambda: not _alive(guardian), timeout=10, what="the guardian to die")
    os.kill(agent.pid, signal.SIGKILL)
    wait_until(lambda: not _alive(agent), timeout=10, what="the pilot to die")
    assert _alive(payload)  # orphaned, the job's attempt still running in the WMS
    # the evidence the WMS wants: the dead pilot silent for more than two heartbeat intervals
    dead = Pilot.objects.get(pk=first.pilot_id)
    wait_until(
        lambda: (
            timezone.now() - Pilot.objects.get(pk=dead.pk).last_heartbeat
            > timedelta(seconds=2 * HEARTBEAT + 0.5)
        ),
        timeout=30,
        what="the dead pilot's silence",
    )

    stack.spawn(
        name,
        stack.pilot_argv("cpu", 0),  # the same work directory
        whole_env=stack.pilot_child_env(),
        stdin_text=stack.pilot_secrets(),
    )

    wait_until(lambda: not _alive(payload), timeout=60, what="the orphan killed", out=out)
    second = wait_until(
        lambda: JobAttempt.objects.filter(job=job, number=1, state=AttemptState.RUNNING).first(),
        timeout=60,
        what="the job retried at once on the new pilot",
        out=out,
    )
    first.refresh_from_db()
    assert (first.state, first.error_code) == (AttemptState.LOST, "pilot_died")
    new = second.pilot
    assert new is not None and new.pk != dead.pk and new.hostname == dead.hostname
    assert f"pilot {new.pk} started on {new.hostname}" in first.error_message
    dead.refresh_from_db()
    assert dead.state == PilotState.LOST
    last = dead.transitions.order_by("at", "id").last()
    assert last is not None and (last.to_state, last.source) == ("lost", f"pilot:{new.pk}")
    text = out.text()
    assert f"orphan_payload_killed job_uuid={job.uuid} attempt=0" in text
    assert f"previous_pilot_id={dead.pk}" in text
    assert str(payload.pid) in text
