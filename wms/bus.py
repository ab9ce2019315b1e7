"""The server's side of the bus: a connection from settings, the topology, batched publishing.

Job messages are plain JSON (not Celery tasks), persistent, with a priority from the job's rank,
published in batches on ONE channel. On AMQP the channel is put in confirm mode and the batch
waits until RabbitMQ has confirmed every message (a nack or a timeout raises ``BrokerError``).
kombu's virtual transports (the embedded filesystem broker) have no confirms: a write to the
queue folder that returned is the confirmation.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable

from django.conf import settings
from kombu import Connection, Producer
from kombu.exceptions import OperationalError

from wms.contract import Command, JobMessage
from wms.exceptions import BrokerError
from wms.topology import Topology, broker_urls, rank_to_priority

_local = threading.local()


def topology() -> Topology:
    return Topology(prefix=settings.WMS_BUS_PREFIX, queue_type=settings.WMS_QUEUE_TYPE)


def broker_url() -> str:
    return settings.CELERY_BROKER_URL


def new_connection(*, connect_timeout: float | None = None) -> Connection:
    """A fresh connection to the broker the Celery app uses (same URL, same folders; a
    failover list's URLs in turn, see :func:`ensure_connected`); one attempt to connect
    takes at most ``WMS_BROKER_CONNECT_TIMEOUT`` seconds by default."""
    options = dict(getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}) or {})
    # Confirms are handled per batch below, not message by message.
    options.pop("confirm_publish", None)
    if connect_timeout is None:
        connect_timeout = settings.WMS_BROKER_CONNECT_TIMEOUT
    return Connection(broker_url(), transport_options=options, connect_timeout=connect_timeout)


def ensure_connected(conn: Connection, *, rounds: int = 1, **retry: float) -> Connection:
    """Connect ``conn``, trying every URL of a failover list (``CELERY_BROKER_URL`` may name a
    cluster's nodes, ``amqp://h1//;amqp://h2//``) ``rounds`` times over: kombu switches to
    the next URL after each failure and pauses only after a full round."""
    urls = max(1, len(broker_urls(broker_url())))
    return conn.ensure_connection(max_retries=rounds * urls - 1, **retry)


def _connection() -> Connection:
    """This thread's connection, declared once; reconnected after a failure."""
    conn = getattr(_local, "conn", None)
    key = (broker_url(), settings.WMS_BUS_PREFIX, settings.WMS_QUEUE_TYPE)
    if conn is None or getattr(_local, "key", None) != key:
        reset_connection()
        conn = new_connection()
        # bounded in time too (a broker that never answers costs a web request seconds),
        # with time for one attempt on each node of a failover list
        urls = max(1, len(broker_urls(broker_url())))
        ensure_connected(
            conn,
            rounds=2,
            interval_start=0.2,
            interval_step=0.5,
            timeout=settings.WMS_BROKER_CONNECT_TIMEOUT * urls,
        )
        topology().declare(conn)
        _local.conn, _local.key = conn, key
    return conn


def reset_connection() -> None:
    conn = getattr(_local, "conn", None)
    _local.conn = None
    if conn is not None:
        with contextlib.suppress(Exception):  # it is being dropped anyway
            conn.release()


def _publish_confirmed(conn: Connection, channel, items: list[tuple[bytes, str, str, int]]) -> None:
    """AMQP: publish every item, then wait until all are confirmed."""
    if not getattr(channel, "_wms_confirm", False):
        channel.confirm_select()
        channel._wms_confirm = True
        channel._wms_tag = 0
    # Delivery tags are consecutive on a channel: those of this batch are first..last. The
    # broker confirms every tag up to one at once (``multiple``) or one tag alone.
    first = channel._wms_tag + 1
    last = channel._wms_tag + len(items)
    upto = first - 1  # every tag up to this one is confirmed
    singles: set[int] = set()  # confirmed one by one, above upto
    nacked: list[int] = []

    def on_ack(tag: int, multiple: bool) -> None:
        nonlocal upto, singles
        if tag <= upto:
            return
        if multiple:
            upto = tag
            if singles:
                singles = {t for t in singles if t > tag}
        else:
            singles.add(tag)

    def on_nack(tag: int, multiple: bool) -> None:
        # the messages this nack refuses: every unconfirmed one up to tag (multiple), or one
        if tag > upto:
            if multiple:
                nacked.extend(t for t in range(upto + 1, tag + 1) if t not in singles)
            else:
                nacked.append(tag)
        on_ack(tag, multiple)

    def outstanding() -> int:
        return last - upto - len(singles)

    channel.events["basic_ack"].add(on_ack)
    channel.events["basic_nack"].add(on_nack)
    try:
        for body, exchange, routing_key, priority in items:
            msg = channel.prepare_message(
                body,
                priority=priority,
                content_type="application/json",
                content_encoding="utf-8",
                properties={"delivery_mode": 2},
            )
            channel.basic_publish(msg, exchange=exchange, routing_key=routing_key)
            channel._wms_tag += 1
        deadline = time.monotonic() + settings.WMS_PUBLISH_CONFIRM_TIMEOUT
        while (left := outstanding()) > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(f"{left} message(s) not confirmed in time.")
            try:
                conn.drain_events(timeout=min(remaining, 1.0))
            except TimeoutError:
                continue
        if nacked:
            raise BrokerError(f"The broker refused {len(nacked)} message(s).")
    finally:
        channel.events["basic_ack"].discard(on_ack)
        channel.events["basic_nack"].discard(on_nack)


def _publish(items: list[tuple[bytes, str, str, int]]) -> None:
    if not items:
        return
    try:
        conn = _connection()
        channel = conn.default_channel
        if hasattr(channel, "confirm_select"):
            _publish_confirmed(conn, channel, items)
        else:
            producer = Producer(channel)
            for body, exchange, routing_key, priority in items:
                producer.publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    priority=priority,
                    delivery_mode=2,
                    content_type="application/json",
                    content_encoding="utf-8",
                    retry=False,
                )
    except BrokerError:
        reset_connection()
        raise
    except (OperationalError, OSError, ConnectionError) as exc:
        reset_connection()
        raise BrokerError(f"Publishing failed: {exc}") from exc
    except Exception as exc:  # amqp's own exceptions (channel/connection errors)
        reset_connection()
        raise BrokerError(f"Publishing failed: {type(exc).__name__}: {exc}") from exc


def publish_jobs(messages: Iterable[JobMessage]) -> int:
    """Publish job messages to their device queues; all confirmed or ``BrokerError``."""
    topo = topology()
    exchange = topo.jobs_exchange.name
    items = [(m.encode(), exchange, m.device_type, rank_to_priority(m.rank)) for m in messages]
    _publish(items)
    return len(items)


# (prefix, pilot id) of every command queue this process declared: tests delete them after.
_command_queues: set[tuple[str, int]] = set()


def declared_command_queues(prefix: str) -> list[int]:
    """The pilot ids whose command queue this process declared under ``prefix``."""
    return sorted(pilot_id for p, pilot_id in _command_queues if p == prefix)


def publish_commands(commands: Iterable[Command]) -> int:
    """Publish commands to their pilots' queues (declared first), all confirmed or
    ``BrokerError``. A pilot's queue is durable: a command waits there while the pilot is busy
    or away, and the heartbeat reply carries it too."""
    commands = list(commands)
    if not commands:
        return 0
    topo = topology()
    try:
        conn = _connection()
        declared: set[int] | None = getattr(conn, "_wms_command_queues", None)
        if declared is None:
            declared = set()
            setattr(conn, "_wms_command_queues", declared)  # noqa: B010 - not a kombu attribute
        new = sorted({c.pilot_id for c in commands} - declared)
        if new:
            topo.declare(conn, queues=[topo.command_queue(p) for p in new])
            declared.update(new)
            _command_queues.update((topo.prefix, p) for p in new)
    except BrokerError:
        reset_connection()
        raise
    except Exception as exc:
        reset_connection()
        raise BrokerError(f"Declaring command queues failed: {exc}") from exc
    exchange = topo.commands_exchange.name
    _publish([(c.encode(), exchange, topo.command_routing_key(c.pilot_id), 0) for c in commands])
    return len(commands)


def queue_depth(device_type: str) -> int:
    """Messages ready in a device queue (for backpressure)."""
    try:
        conn = _connection()
        queue = topology().job_queue(device_type)(conn.default_channel)
        _name, count, _consumers = queue.queue_declare(passive=True)
        return int(count)
    except Exception as exc:
        reset_connection()
        raise BrokerError(f"Cannot read the depth of {device_type} queue: {exc}") from exc
