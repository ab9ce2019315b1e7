"""The RabbitMQ topology of the WMS, declared the same way by the server and by the pilots.

Django-free (the pilot agent imports it). Everything is named from one ``prefix`` (``wms`` in
production; tests use a per-run prefix and delete what they declare):

======================  ======================================================================
``<p>.jobs``            durable direct exchange for job messages, routing key = device type
``<p>.jobs.cpu/gpu``    durable queues bound by ``cpu`` / ``gpu``; classic with x-max-priority
                        (priority from the job's rank) or quorum (ordering by the executor)
``<p>.commands``        durable direct exchange for commands, routing key = ``pilot.<id>``
``<p>.pilot.<id>``      a pilot's durable command queue, bound by ``pilot.<id>``
``<p>.events``          durable direct exchange for pilot status events, routing key ``event``
``<p>.events``          durable queue of those events, consumed by a WMS worker
======================  ======================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from kombu import Connection, Exchange, Queue

DEVICE_TYPES = ("cpu", "gpu")
MAX_PRIORITY = 10  # AMQP priorities are 0..255; RabbitMQ advises small ranges
QUEUE_TYPES = ("classic", "quorum")


def rank_to_priority(rank: int) -> int:
    """Map a job's rank (smallint, higher first) onto 0..MAX_PRIORITY, monotonically.

    0 is the middle (5); each step of 10 ranks moves one priority level, clamped at the ends.
    """
    return max(0, min(MAX_PRIORITY, MAX_PRIORITY // 2 + rank // 10))


@dataclass(frozen=True)
class Topology:
    prefix: str = "wms"
    queue_type: str = "classic"

    def __post_init__(self) -> None:
        if self.queue_type not in QUEUE_TYPES:
            raise ValueError(f"queue_type must be one of {QUEUE_TYPES}, not {self.queue_type!r}")

    # --- exchanges ---
    @property
    def jobs_exchange(self) -> Exchange:
        return Exchange(f"{self.prefix}.jobs", type="direct", durable=True)

    @property
    def commands_exchange(self) -> Exchange:
        return Exchange(f"{self.prefix}.commands", type="direct", durable=True)

    @property
    def events_exchange(self) -> Exchange:
        return Exchange(f"{self.prefix}.events", type="direct", durable=True)

    # --- queues ---
    def _queue_args(self, *, priority: bool) -> dict:
        if self.queue_type == "quorum":
            return {"x-queue-type": "quorum"}
        return {"x-max-priority": MAX_PRIORITY} if priority else {}

    def job_queue_name(self, device_type: str) -> str:
        return f"{self.prefix}.jobs.{device_type}"

    def job_queue(self, device_type: str) -> Queue:
        if device_type not in DEVICE_TYPES:
            raise ValueError(f"unknown device type {device_type!r}")
        return Queue(
            self.job_queue_name(device_type),
            exchange=self.jobs_exchange,
            routing_key=device_type,
            durable=True,
            queue_arguments=self._queue_args(priority=True),
        )

    def command_routing_key(self, pilot_id: int) -> str:
        return f"pilot.{pilot_id}"

    def command_queue(self, pilot_id: int) -> Queue:
        return Queue(
            f"{self.prefix}.pilot.{pilot_id}",
            exchange=self.commands_exchange,
            routing_key=self.command_routing_key(pilot_id),
            durable=True,
            queue_arguments=self._queue_args(priority=False),
        )

    def events_queue(self) -> Queue:
        return Queue(
            f"{self.prefix}.events",
            exchange=self.events_exchange,
            routing_key="event",
            durable=True,
            queue_arguments=self._queue_args(priority=False),
        )

    def server_queues(self) -> list[Queue]:
        return [*(self.job_queue(d) for d in DEVICE_TYPES), self.events_queue()]

    def declare(self, connection: Connection, queues: list[Queue] | None = None) -> None:
        """Declare exchanges and queues (idempotent: redeclaring the same thing is a no-op)."""
        channel = connection.default_channel
        for exchange in (self.jobs_exchange, self.commands_exchange, self.events_exchange):
            exchange(channel).declare()
        for queue in self.server_queues() if queues is None else queues:
            queue(channel).declare()

    def delete(self, connection: Connection, pilot_ids: list[int] | tuple = ()) -> None:
        """Delete what ``declare`` made (tests and teardown)."""
        channel = connection.default_channel
        queues = [*self.server_queues(), *(self.command_queue(p) for p in pilot_ids)]
        for queue in queues:
            try:
                queue(channel).delete()
            except Exception:  # noqa: S112 - already gone is fine
                continue
        for exchange in (self.jobs_exchange, self.commands_exchange, self.events_exchange):
            try:
                exchange(channel).delete()
            except Exception:  # noqa: S112
                continue


# --- broker URLs: the password apart (it goes to a pilot in a file or on stdin, never argv) ---


def url_password(url: str) -> str:
    """The password inside a URL (``amqp://user:PASSWORD@host/``), or ""."""
    _, sep, rest = url.partition("://")
    creds, at, _ = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return ""
    return unquote(creds.split(":", 1)[1])


def split_password(url: str) -> tuple[str, str]:
    """``amqp://u:pw@h//`` -> (``amqp://u@h//``, ``pw``): the URL a command line may show and
    the password to hand over in a file or on standard input (the pilot reads it so and
    quotes it back into the URL it connects with)."""
    password = url_password(url)
    if not password:
        return url, ""
    scheme, _, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    return f"{scheme}://{creds.split(':', 1)[0]}@{host}", password
