"""Issue 13, item 5, with real processes: pause means no new starts.

One pilot with one slot runs a task's jobs one at a time, so the executor has already put the
others' messages on RabbitMQ when the task is paused. The pilot goes on consuming those
messages: not one of them starts (each job is back to ``defined``), the job that was running
runs to its end. Resumed, the task finishes and every job ran in exactly one attempt.
"""

from __future__ import annotations

import pytest
from django.utils import timezone

from jobs.models import Job, JobAttempt, JobState
from tasks.lifecycle import task_pause, task_resume
from tasks.models import Task, TaskState
from tests.e2e.conftest import wait_until
from tests.e2e.test_pilots_e2e import _all_final, _dataset, _task
from tests.factories import UserFactory
from wms import bus

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

JOBS = 6


def test_a_paused_task_starts_none_of_its_queued_messages_and_resumes(make_stack, tmp_path):
    owner = UserFactory()
    uid = _dataset(tmp_path, "e2e.pause", JOBS)
    _stack, out = make_stack(cpu=1, gpu=0, slots=1)
    task = _task(owner, uid, tmp_path, "pause", args="--events 200 --sleep 2")

    # one job runs and the others' messages wait on the broker
    wait_until(
        lambda: (
            Job.objects.filter(task=task, state=JobState.RUNNING).exists()
            and bus.queue_depth("cpu") >= 2
        ),
        timeout=120,
        what="a running job and queued messages",
        out=out,
    )
    queued_messages = bus.queue_depth("cpu")
    paused_at = timezone.now()
    assert task_pause(task_id=task.pk, source="user:e2e").won
    started_before = set(
        JobAttempt.objects.filter(job__task=task, started_at__lte=paused_at).values_list(
            "job_id", flat=True
        )
    )

    # the pilot consumes every message that was queued; the running job ends
    wait_until(
        lambda: (
            bus.queue_depth("cpu") == 0
            and not Job.objects.filter(
                task=task, state__in=(JobState.RUNNING, JobState.QUEUED)
            ).exists()
        ),
        timeout=120,
        what="the queued messages to be consumed and the running job to end",
        out=out,
    )
    assert not JobAttempt.objects.filter(job__task=task, started_at__gt=paused_at).exists(), (
        out.text()[-4000:]
    )
    waiting = Job.objects.filter(task=task, state=JobState.DEFINED).count()
    assert waiting >= queued_messages and waiting == JOBS - len(started_before)
    assert Task.objects.get(pk=task.pk).state == TaskState.PAUSED

    task_resume(task_id=task.pk, source="user:e2e")
    wait_until(lambda: _all_final([task.pk], JOBS), timeout=180, what="every job to end", out=out)
    jobs = list(Job.objects.filter(task=task))
    assert {j.state for j in jobs} == {JobState.FINISHED}, out.text()[-4000:]
    attempts = [JobAttempt.objects.filter(job=j).count() for j in jobs]
    assert attempts == [1] * JOBS
    wait_until(
        lambda: Task.objects.get(pk=task.pk).state == TaskState.FINISHED,
        timeout=60,
        what="the task to finish",
        out=out,
    )
