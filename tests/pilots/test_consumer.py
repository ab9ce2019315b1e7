"""The consumer of pilots' status events on the real RabbitMQ (a namespace of the test's own):
batches applied by the same service as the REST report, acked after commit. Every event here
is signed by its pilot; what the consumer does with unsigned and forged ones is in
``test_bus_auth.py``."""

from __future__ import annotations

import time

import pytest
from django.core.management import call_command

from jobs.models import AttemptState, Job, JobAttempt, JobState
from pilots.bootsteps import EventsConsumerStep
from pilots.consumer import ConsumerThread
from pilots.services import pilot_register
from tests.factories import JobAttemptFactory, JobFactory
from tests.jobs.pilot_reports import consume_now, publish, signed, waiting
from wms import checksums
from wms.contract import StatusEvent

pytestmark = pytest.mark.django_db


def running_attempt(pilot, task=None):
    job = JobFactory(state=JobState.RUNNING, pilot=pilot, **({"task": task} if task else {}))
    return JobAttemptFactory(job=job, pilot=pilot, number=0)


def test_events_from_the_bus_are_applied_in_a_batch_and_acked(bus_prefix, output_task):
    pilot, _ = pilot_register(hostname="wn-bus")
    other, _ = pilot_register(hostname="wn-other")
    metrics = [running_attempt(pilot) for _ in range(5)]
    finishing = running_attempt(pilot, output_task)
    foreign = running_attempt(other)
    out = {
        "name": "hist.json",
        "type": "output",
        "size": 10,
        "check_sum": checksums.bytes_checksum(b"h"),
        "url": "file:///out/hist.json",
    }
    publish(
        *(
            signed(
                pilot,
                StatusEvent(
                    job_uuid=str(a.job.uuid),
                    attempt=0,
                    state="running",
                    pilot_id=pilot.pk,
                    metrics={"cpu_time": float(i)},
                ),
            )
            for i, a in enumerate(metrics)
        ),
        signed(
            pilot,
            StatusEvent(
                job_uuid=str(finishing.job.uuid),
                attempt=0,
                state="finished",
                pilot_id=pilot.pk,
                exit_code=0,
                outputs=[out],
            ),
        ),
        # another pilot's attempt: refused, dropped
        signed(
            pilot,
            StatusEvent(
                job_uuid=str(foreign.job.uuid), attempt=0, state="finished", pilot_id=pilot.pk
            ),
        ),
        signed(pilot, b"this is not json"),  # malformed: dropped, never a crash
        signed(pilot, b"[1, 2, 3]"),
        # invalid event: refused
        signed(pilot, b'{"v": 1, "kind": "event", "job_uuid": "x", "pilot_id": %d}' % pilot.pk),
    )

    total = consume_now(batch_size=500)

    assert (total.received, total.applied, total.refused, total.malformed, total.requeued) == (
        10,
        6,
        2,
        2,
        0,
    )
    assert (total.unauthenticated, total.conflicts) == (0, 0)
    assert waiting() == 0  # everything acked
    for i, a in enumerate(metrics):
        a.refresh_from_db()
        assert a.metrics == {"cpu_time": float(i)} and a.metrics_updated_at is not None
    assert Job.objects.get(pk=finishing.job_id).state == JobState.FINISHED
    assert Job.objects.get(pk=foreign.job_id).state == JobState.RUNNING
    assert JobAttempt.objects.get(pk=foreign.pk).state == AttemptState.RUNNING


def test_a_full_batch_is_applied_at_once(bus_prefix):
    pilot, _ = pilot_register(hostname="wn-full")
    attempts = [running_attempt(pilot) for _ in range(7)]
    publish(
        *(
            signed(pilot, StatusEvent(str(a.job.uuid), 0, "running", pilot.pk, metrics={"n": 1}))
            for a in attempts
        )
    )
    total = consume_now(batch_size=3, max_wait=30.0, max_batches=2)
    assert (total.received, total.applied) == (6, 6)  # two full batches; one event waits
    assert waiting() == 1


def test_a_transient_failure_requeues_the_batch(bus_prefix, output_task, settings):
    pilot, _ = pilot_register(hostname="wn-dsm")
    attempt = running_attempt(pilot, output_task)
    publish(
        signed(
            pilot,
            StatusEvent(
                str(attempt.job.uuid),
                0,
                "finished",
                pilot.pk,
                exit_code=0,
                outputs=[
                    {
                        "name": "o",
                        "type": "output",
                        "size": 1,
                        "check_sum": "",
                        "url": "file:///out/o",
                    }
                ],
            ),
        )
    )
    settings.WMS_DSM_BACKEND = "http"  # a DSM that does not answer
    settings.WMS_DSM_URL = "http://127.0.0.1:1"
    settings.WMS_DSM_RETRIES = 0

    first = consume_now(max_wait=0.1, max_batches=1)

    assert (first.received, first.requeued, first.applied) == (1, 1, 0)
    assert Job.objects.get(pk=attempt.job_id).state == JobState.RUNNING
    settings.WMS_DSM_BACKEND = "local"  # the DSM is back
    second = consume_now(max_wait=0.1, max_batches=1)
    assert (second.received, second.applied) == (1, 1)
    assert Job.objects.get(pk=attempt.job_id).state == JobState.FINISHED
    assert waiting() == 0


def test_the_management_command_consumes_what_is_queued(bus_prefix, capsys):
    pilot, _ = pilot_register(hostname="wn-cmd")
    attempt = running_attempt(pilot)
    publish(
        signed(pilot, StatusEvent(str(attempt.job.uuid), 0, "running", pilot.pk, metrics={"a": 1}))
    )
    call_command("consume_events", "--once")
    assert capsys.readouterr().out.strip() == (
        "received=1 applied=1 refused=0 conflicts=0 unauthenticated=0 malformed=0 requeued=0"
    )
    attempt.refresh_from_db()
    assert attempt.metrics == {"a": 1}


@pytest.mark.django_db(transaction=True)
def test_the_worker_bootstep_runs_the_consumer_in_a_thread(bus_prefix, settings):
    settings.WMS_EVENTS_MAX_WAIT = 0.1
    pilot, _ = pilot_register(hostname="wn-step")
    attempt = running_attempt(pilot)
    step = EventsConsumerStep(parent=None)
    step.start(None)
    try:
        assert isinstance(step.thread, ConsumerThread) and step.thread.is_alive()
        publish(
            signed(
                pilot, StatusEvent(str(attempt.job.uuid), 0, "running", pilot.pk, metrics={"b": 2})
            )
        )
        deadline = time.monotonic() + 20
        while JobAttempt.objects.get(pk=attempt.pk).metrics != {"b": 2}:
            assert time.monotonic() < deadline, "the consumer thread did not apply the event"
            time.sleep(0.05)
    finally:
        thread = step.thread
        step.stop(None)
    assert not thread.is_alive()
    assert waiting() == 0


def test_the_bootstep_stays_off_when_told(settings):
    settings.WMS_EVENTS_IN_WORKER = False
    step = EventsConsumerStep(parent=None)
    step.start(None)
    assert step.thread is None
