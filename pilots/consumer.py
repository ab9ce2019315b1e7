"""The consumer of pilots' status events on the bus (``<prefix>.events``, DESIGN.md section 5).

Pilots may publish ``wms.contract.StatusEvent`` bodies to the events exchange instead of calling
the REST ``report``. This consumer takes them in batches (``WMS_EVENTS_BATCH`` events, or
whatever came within ``WMS_EVENTS_MAX_WAIT`` seconds of a batch's first event) and applies
each batch with ``jobs.reports.job_events_apply``, the same function as the REST endpoints,
in one transaction. Messages are acknowledged only after that transaction committed:

- a message that does not prove it comes from the pilot it names: unsigned (no
  ``wms-pilot-id`` / ``wms-signature`` header), signed by an unknown pilot or one whose token
  was revoked, badly signed (another key, a changed body), or naming another pilot than its
  signer: logged with the pilot it claims, counted (``unauthenticated``), acked and dropped;
  it changes nothing. The broker's credentials alone never speak for a pilot. The signature
  is an HMAC-SHA256 of the exact body bytes with the signer's bus key
  (``wms.contract.event_signature_valid``); the keys of a batch's pilots are read with one
  query (``pilots.auth.pilot_bus_keys``);
- applied, duplicate, ignored, or refused (invalid, unknown job, another pilot's attempt, a
  final report that contradicts the one applied): acked; a refused event is logged and dropped
  (sending it again would not help);
- a body that is not a JSON object: logged, acked (dropped), never a crash;
- a transient failure (the database or the DSM is down): the batch is requeued and the
  consumer waits a little; the events come back and are applied later;
- an unexpected error (a bug): the batch is retried event by event, so that only the event
  that triggers it is dropped (logged with its traceback).

It runs in a thread of every Celery worker (``EventsConsumerStep``, registered in
``config/celery.py``; ``WMS_EVENTS_IN_WORKER=false`` turns that off) or apart with
``manage.py consume_events``. Either way it has its own broker connection, so a slow batch
never stalls the worker's own event loop. Several consumers share the queue (competing
consumers); since a batch locks its jobs in id order, concurrent batches do not deadlock.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection
from kombu import Connection, Consumer
from kombu.message import Message
from kombu.transport.virtual import Channel as VirtualChannel

from jobs.reports import job_events_apply
from pilots.auth import pilot_bus_keys
from wms import bus
from wms.contract import EVENT_PILOT_HEADER, EVENT_SIGNATURE_HEADER, event_signed_by_any
from wms.exceptions import BrokerError, DSMError, ReportConflict

log = structlog.get_logger(__name__)

TRANSIENT = (DatabaseError, DSMError, BrokerError)
RETRY_PAUSE = 2.0  # seconds to wait after a transient failure before taking more


class StopSignal(Protocol):
    """What :func:`consume` needs of ``stop``: a ``threading.Event`` or anything shaped like it."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float, /) -> bool: ...


@dataclass
class BatchResult:
    received: int = 0
    applied: int = 0  # applied, duplicate or ignored
    refused: int = 0  # invalid, unknown job, another pilot's attempt: logged and dropped
    conflicts: int = 0  # a final report unlike the one applied: logged and dropped
    unauthenticated: int = 0  # not signed by the pilot it names: logged and dropped
    malformed: int = 0  # not a JSON object: logged and dropped
    requeued: int = 0  # a transient failure: back to the queue

    def __add__(self, other: BatchResult) -> BatchResult:
        return BatchResult(*(a + b for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[int, ...]:
        return (
            self.received,
            self.applied,
            self.refused,
            self.conflicts,
            self.unauthenticated,
            self.malformed,
            self.requeued,
        )

    def describe(self) -> str:
        """The counts as one log line's ``key=value`` words."""
        return " ".join(f"{k}={v}" for k, v in zip(_RESULT_FIELDS, self.astuple(), strict=True))


_RESULT_FIELDS = (
    "received",
    "applied",
    "refused",
    "conflicts",
    "unauthenticated",
    "malformed",
    "requeued",
)


def _body(message: Message) -> bytes:
    body = message.body
    return body if isinstance(body, bytes) else str(body).encode()


def _decode(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (TypeError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _header_pilot(headers: Any) -> int | None:
    """The signer's pilot id from the message's headers (an integer, or its digits)."""
    value = headers.get(EVENT_PILOT_HEADER) if isinstance(headers, dict) else None
    if type(value) is int:  # what pilots send: the common case first
        return value if value > 0 else None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str) and value.isdigit() and len(value) < 19:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _refuse_unauthenticated(
    message: Message, body: bytes, signer: int | None, reason: str, result: BatchResult
) -> None:
    """Log (with the pilot the message claims to come from), count, ack and drop."""
    data = _decode(body)
    named = data.get("pilot_id") if data is not None else None
    log.warning(
        "event_unauthenticated",
        reason=reason,
        claimed_pilot_id=signer if signer is not None else named,
        event_pilot_id=named,
        job_uuid=str(data.get("job_uuid", ""))[:64] if data is not None else "",
        state=str(data.get("state", ""))[:20] if data is not None else "",
    )
    result.unauthenticated += 1
    message.ack()


def _authenticated(
    messages: list[Message], result: BatchResult
) -> list[tuple[Message, dict[str, Any]]] | None:
    """The messages that prove they come from the pilot they name, decoded; the others are
    refused (acked, dropped) or malformed. None when the pilots' keys could not be read (the
    batch was requeued)."""
    signed: list[tuple[Message, bytes, int, Any]] = []
    for message in messages:
        headers = message.headers
        signer = _header_pilot(headers)
        signature = headers.get(EVENT_SIGNATURE_HEADER) if isinstance(headers, dict) else None
        if signer is None or signature is None:
            _refuse_unauthenticated(message, _body(message), signer, "unsigned", result)
            continue
        signed.append((message, _body(message), signer, signature))
    if not signed:
        return []
    if not connection.in_atomic_block:
        close_old_connections()  # a connection the database dropped is replaced, not reused
    try:
        keys = {  # as bytes, once per batch
            pilot: tuple(key.encode() for key in pilot_keys)
            for pilot, pilot_keys in pilot_bus_keys({s for _, _, s, _ in signed}).items()
        }
    except TRANSIENT as exc:
        _requeue([m for m, _, _, _ in signed], result, exc)
        return None
    out: list[tuple[Message, dict[str, Any]]] = []
    for message, body, signer, signature in signed:
        pilot_keys = keys.get(signer)
        if not pilot_keys:
            _refuse_unauthenticated(message, body, signer, "unknown_or_revoked_pilot", result)
            continue
        if not event_signed_by_any(body, signature, pilot_keys):
            _refuse_unauthenticated(message, body, signer, "bad_signature", result)
            continue
        data = _decode(body)
        if data is None:
            result.malformed += 1
            log.warning("event_malformed", pilot_id=signer, body=repr(body[:200]))
            message.ack()
            continue
        named = data.get("pilot_id")
        if named != signer or isinstance(named, bool):
            _refuse_unauthenticated(message, body, signer, "pilot_mismatch", result)
            continue
        out.append((message, data))
    return out


def _settle(messages: list[Message], outcomes: list[Any], result: BatchResult) -> None:
    for outcome in outcomes:
        if outcome.ok:
            result.applied += 1
        else:
            if outcome.error == ReportConflict.code:
                result.conflicts += 1
            else:
                result.refused += 1
            log.warning(
                "event_refused",
                job_uuid=outcome.job_uuid,
                attempt=outcome.attempt,
                error=outcome.error,
                detail=outcome.detail,
            )
    _ack(messages)


def _ack(messages: list[Message]) -> None:
    """Ack settled messages. On AMQP with ONE ``basic.ack`` (``multiple``) of the last delivery
    tag: every earlier delivery on the channel was either in this batch or already acked or
    requeued (batches are settled in order, malformed messages at once), and later ones
    (prefetched) are not covered. kombu's virtual transports ignore ``multiple``: one each."""
    if not messages:
        return
    if isinstance(messages[-1].channel, VirtualChannel):
        for message in messages:
            message.ack()
        return
    messages[-1].ack(multiple=True)


def apply_messages(messages: list[Message]) -> BatchResult:
    """Apply one batch of event messages (the consumer's batch function); ack after commit."""
    result = BatchResult(received=len(messages))
    accepted = _authenticated(messages, result)
    if not accepted:
        return result
    carriers = [message for message, _ in accepted]
    events = [data for _, data in accepted]
    try:
        outcomes = job_events_apply(events=events)
    except TRANSIENT as exc:
        _requeue(carriers, result, exc)
        return result
    except Exception:
        log.exception("event_batch_failed", events=len(events))
        _one_by_one(events, carriers, result)
        return result
    _settle(carriers, outcomes, result)
    return result


def _requeue(messages: list[Message], result: BatchResult, exc: BaseException) -> None:
    log.warning("event_batch_requeued", events=len(messages), error=f"{type(exc).__name__}: {exc}")
    if isinstance(exc, DatabaseError) and not connection.in_atomic_block:
        connection.close()
    for message in messages:
        message.requeue()
    result.requeued += len(messages)


def _one_by_one(events: list[dict[str, Any]], messages: list[Message], result: BatchResult) -> None:
    for event, message in zip(events, messages, strict=True):
        try:
            outcomes = job_events_apply(events=[event])
        except TRANSIENT as exc:
            _requeue([message], result, exc)
            continue
        except Exception:
            log.exception("event_dropped", job_uuid=str(event.get("job_uuid", "")))
            result.refused += 1
            message.ack()
            continue
        _settle([message], outcomes, result)


class EventBatcher:
    """Collects messages until a batch is full or its first message waited long enough."""

    def __init__(self, *, batch_size: int | None = None, max_wait: float | None = None) -> None:
        self.batch_size = batch_size or settings.WMS_EVENTS_BATCH
        self.max_wait = settings.WMS_EVENTS_MAX_WAIT if max_wait is None else max_wait
        self.messages: list[Message] = []
        self.first_at: float | None = None
        self.total = BatchResult()
        self.paused_until = 0.0

    def add(self, message: Message) -> None:
        if not self.messages:
            self.first_at = time.monotonic()
        self.messages.append(message)

    def time_left(self) -> float:
        """Seconds until the current batch is due (``max_wait`` when it is empty)."""
        if self.first_at is None:
            return self.max_wait
        return max(0.0, self.first_at + self.max_wait - time.monotonic())

    def due(self) -> bool:
        return bool(self.messages) and (
            len(self.messages) >= self.batch_size or self.time_left() <= 0
        )

    def flush(self) -> BatchResult:
        messages, self.messages, self.first_at = self.messages, [], None
        if not messages:
            return BatchResult()
        result = apply_messages(messages)
        self.total = self.total + result
        if result.requeued:
            self.paused_until = time.monotonic() + RETRY_PAUSE
        return result

    def drop(self) -> None:
        """Forget the buffered messages (their connection is gone: the broker redelivers)."""
        self.messages, self.first_at = [], None


def consume(
    conn: Connection,
    *,
    stop: StopSignal | None = None,
    batch_size: int | None = None,
    max_wait: float | None = None,
    max_batches: int | None = None,
    idle_timeout: float | None = None,
) -> BatchResult:
    """Consume ``<prefix>.events`` on ``conn`` and apply it batch by batch.

    Runs until ``stop`` is set, ``max_batches`` batches were applied, or nothing arrived for
    ``idle_timeout`` seconds (the two last for tests and one-shot runs). Connection errors are
    raised to the caller (:func:`run` reconnects).
    """
    batcher = EventBatcher(batch_size=batch_size, max_wait=max_wait)
    queue = bus.topology().events_queue()
    batches = 0
    last_seen = time.monotonic()
    consumer = Consumer(
        conn.default_channel,
        queues=[queue],
        on_message=batcher.add,
        prefetch_count=min(65535, batcher.batch_size * 2),
    )
    try:
        with consumer:
            while not (stop is not None and stop.is_set()):
                pause = batcher.paused_until - time.monotonic()
                if pause > 0:
                    if stop is not None:
                        stop.wait(pause)
                    else:
                        time.sleep(pause)
                    continue
                before = len(batcher.messages)
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=min(batcher.time_left() or 0.05, 1.0))
                if len(batcher.messages) > before:
                    last_seen = time.monotonic()
                if batcher.due():
                    batcher.flush()
                    batches += 1
                    if max_batches is not None and batches >= max_batches:
                        break
                elif (
                    idle_timeout is not None
                    and not batcher.messages
                    and time.monotonic() - last_seen > idle_timeout
                ):
                    break
    except BaseException:
        batcher.drop()
        raise
    return batcher.total


def run(*, stop: threading.Event, batch_size: int | None = None) -> None:
    """The long-running consumer: consume, and reconnect (with backoff) when the broker goes."""
    delay = 1.0
    log.info("events_consumer_started", queue=bus.topology().events_queue().name)
    while not stop.is_set():
        conn = bus.new_connection()
        try:
            bus.ensure_connected(conn, rounds=2)
            bus.topology().declare(conn, queues=[bus.topology().events_queue()])
            delay = 1.0
            consume(conn, stop=stop, batch_size=batch_size)
        except conn.connection_errors + conn.channel_errors + (OSError,) as exc:
            log.warning("events_consumer_reconnecting", error=str(exc), wait=delay)
            stop.wait(delay)
            delay = min(delay * 2, 30.0)
        finally:
            with contextlib.suppress(Exception):  # a broken connection is dropped anyway
                conn.release()
    log.info("events_consumer_stopped")


class ConsumerThread(threading.Thread):
    """:func:`run` in a daemon thread (the Celery worker's bootstep starts one)."""

    def __init__(self) -> None:
        super().__init__(name="wms-events-consumer", daemon=True)
        self.stop_event = threading.Event()

    def run(self) -> None:
        try:
            run(stop=self.stop_event)
        finally:
            connection.close()

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.join(timeout)
