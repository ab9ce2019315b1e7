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
``<control>``           Celery's task queue (``WMS_CONTROL_QUEUE``), declared by Celery from
                        :meth:`Topology.control_queue`
======================  ======================================================================

With ``queue_type="quorum"`` every one of these queues is a quorum queue (``x-queue-type:
quorum``, replicated over the RabbitMQ cluster) and none has ``x-max-priority``: RabbitMQ 3.x
refuses priorities on quorum queues (docs/deployment.md says how rank orders the work then).

A broker URL may be a failover list, ``amqp://h1//;amqp://h2//;amqp://h3//`` (kombu's and
Celery's syntax): a client connects to the first that answers (:func:`broker_urls`).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

from kombu import Connection, Exchange, Queue

from wms.contract import DEVICE_TYPES

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

    def control_queue(self, name: str) -> Queue:
        """Celery's task queue ``name`` (its exchange and routing key are its name, as Celery
        makes its default queue), of this topology's type: Celery declares it from
        ``CELERY_TASK_QUEUES``."""
        return Queue(
            name,
            exchange=Exchange(name, type="direct", durable=True),
            routing_key=name,
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


# --- broker URLs: failover lists; the password apart (it goes to a pilot in a file or on stdin,
# never argv) ---


def broker_urls(url: str) -> list[str]:
    """The URLs of a failover list (``amqp://h1//;amqp://h2//``), in order; one URL is a list
    of one. Blanks around the separators are dropped."""
    return [u.strip() for u in url.split(";") if u.strip()]


def _one_password(url: str) -> str:
    _, sep, rest = url.partition("://")
    creds, at, _ = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return ""
    return unquote(creds.split(":", 1)[1])


def url_password(url: str) -> str:
    """The password inside a URL (``amqp://user:PASSWORD@host/``), or ""; of a failover list,
    the first one found."""
    for one in broker_urls(url):
        password = _one_password(one)
        if password:
            return password
    return ""


def _without_password(url: str) -> str:
    if not _one_password(url):
        return url
    scheme, _, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    return f"{scheme}://{creds.split(':', 1)[0]}@{host}"


def split_password(url: str) -> tuple[str, str]:
    """``amqp://u:pw@h//`` -> (``amqp://u@h//``, ``pw``): the URL a command line may show and
    the password to hand over in a file or on standard input (the pilot reads it so and
    quotes it back into the URL it connects with). A failover list gives the list without
    its passwords, and its one password: ValueError if its URLs hold different ones (a
    pilot takes one broker password)."""
    urls = broker_urls(url)
    passwords = {p for p in map(_one_password, urls) if p}
    if len(passwords) > 1:
        raise ValueError("the broker URLs of a failover list hold different passwords")
    if not passwords:
        return url, ""
    return ";".join(map(_without_password, urls)), passwords.pop()


def with_password(url: str, password: str) -> str:
    """The reverse of :func:`split_password`: ``password`` put (quoted) into every URL of
    ``url`` that names a user."""
    if not password:
        return url
    out = []
    for one in broker_urls(url):
        scheme, sep, rest = one.partition("://")
        user, at, host = rest.rpartition("@")
        out.append(f"{scheme}{sep}{user}:{quote(password, safe='')}@{host}" if at else one)
    return ";".join(out)


def hide_password(url: str) -> str:
    """The URL(s) with every password shown as ``***`` (for logs and ``--print-config``)."""
    out = []
    for one in broker_urls(url) or [url]:
        scheme, sep, rest = one.partition("://")
        creds, at, host = rest.rpartition("@")
        if sep and at and ":" in creds:
            one = f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
        out.append(one)
    return ";".join(out)
