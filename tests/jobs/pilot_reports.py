"""For tests of pilots' reports: publishing status events to the real RabbitMQ as pilots (and
forgers) would, consuming them with the workers' consumer (``pilots.consumer.consume``), and a
snapshot of everything a report could change."""

from __future__ import annotations

from files.models import Dataset, DatasetEntry, File, FileType
from jobs.models import Job, JobAttempt, JobState, JobTransition
from pilots.auth import pilot_bus_key
from pilots.consumer import BatchResult, consume
from pilots.models import Pilot
from tests.factories import JobFactory
from wms import bus, checksums
from wms.contract import StatusEvent, event_headers

Message = bytes | str | tuple[bytes, dict]


def output(task, name="hist.json", *, size=1234, data=b"hist", kind="output") -> dict:
    """A file of a final report, its URL under the task's output place."""
    return {
        "name": name,
        "type": kind,
        "size": size,
        "check_sum": checksums.bytes_checksum(data),
        "url": f"{task.data_out_url.rstrip('/')}/{name}",
    }


def started(client, task):
    """A job of ``task`` started by the pilot of ``client`` over REST (attempt 0 running)."""
    job = JobFactory(task=task, state=JobState.QUEUED)
    response = client.post(f"/api/v1/jobs/{job.uuid}/start/", {"attempt": 0}, format="json")
    assert response.status_code == 200, response.json()
    job.refresh_from_db()
    return job


def signed(pilot: Pilot, body: bytes | StatusEvent) -> tuple[bytes, dict]:
    """``body`` (an event, or any bytes) as ``pilot`` publishes it: signed with its bus key."""
    raw = body.encode() if isinstance(body, StatusEvent) else body
    key = pilot_bus_key(pilot_id=pilot.pk, token_hash=str(pilot.token_hash))
    return raw, event_headers(raw, pilot_id=pilot.pk, key=key)


def publish(*messages: Message) -> None:
    """Publish each message: ``(body, headers)`` or a bare body (no headers: unsigned)."""
    conn = bus.new_connection()
    try:
        topo = bus.topology()
        topo.declare(conn, queues=[topo.events_queue()])
        producer = conn.Producer()
        for message in messages:
            body, headers = message if isinstance(message, tuple) else (message, None)
            producer.publish(
                body,
                headers=headers,
                exchange=topo.events_exchange,
                routing_key="event",
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
            )
    finally:
        conn.release()


def waiting() -> int:
    """Messages left in the events queue (ready or unacked)."""
    conn = bus.new_connection()
    try:
        queue = bus.topology().events_queue()(conn.default_channel)
        _name, ready, _consumers = queue.queue_declare(passive=True)
        return ready
    finally:
        conn.release()


def consume_now(**kw) -> BatchResult:
    conn = bus.new_connection()
    try:
        kw.setdefault("idle_timeout", 1.0)
        return consume(conn, **kw)
    finally:
        conn.release()


def snapshot():
    """Everything an event could change: jobs, attempts, transitions, FILE_DAT rows, the
    catalogue (entries and the datasets' counters)."""
    return (
        list(
            Job.objects.order_by("pk").values_list(
                "pk", "state", "cur_retry", "pilot_id", "file_out_id", "file_log_id", "time_end"
            )
        ),
        list(JobAttempt.objects.order_by("pk").values()),
        JobTransition.objects.count(),
        list(File.objects.exclude(type=FileType.INPUT).order_by("pk").values()),
        list(DatasetEntry.objects.order_by("pk").values()),
        list(Dataset.objects.order_by("pk").values_list("pk", "state", "file_count", "total_size")),
    )
