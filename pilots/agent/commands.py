"""Commands to the pilot (kill_job, drain, shutdown), from both paths: the pilot's command queue
``<prefix>.pilot.<id>`` (a kombu consumer on its own connection, in its own thread) and the
answers to heartbeats. The same command may come by both: it is executed once, by its ``id``, and
its id is acknowledged in the next heartbeat (``acked_commands``).
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from kombu import Connection, Consumer, Queue
from kombu.message import Message

from pilots.agent.client import Backoff
from pilots.agent.logs import kv, log
from wms.contract import VERSION, Command, ContractError, decode_command
from wms.topology import broker_urls

REMEMBERED_IDS = 10_000


def command_from_heartbeat(item: Any, pilot_id: int) -> Command:
    """A command of a heartbeat answer (which may omit ``v`` and ``pilot_id``), validated."""
    if not isinstance(item, dict):
        raise ContractError("a command must be a JSON object")
    data = {"v": VERSION, "pilot_id": pilot_id, **item}
    return decode_command(data)


class CommandDispatcher:
    """Executes each command once (by id) and remembers which ids to acknowledge."""

    def __init__(self, pilot_id: int, handler: Callable[[Command, str], None]) -> None:
        self.pilot_id = pilot_id
        self.handler = handler
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._to_ack: list[str] = []

    def handle(self, command: Command, source: str) -> bool:
        """Execute ``command`` unless its id was seen already; True if it was executed."""
        if command.pilot_id != self.pilot_id:
            log.warning(
                kv(
                    "command_for_another_pilot",
                    id=command.id,
                    command=command.command,
                    pilot_id=command.pilot_id,
                    source=source,
                )
            )
            return False
        with self._lock:
            if command.id:
                if command.id in self._seen:
                    log.info(kv("command_duplicate_ignored", id=command.id, source=source))
                    return False
                self._seen[command.id] = None
                while len(self._seen) > REMEMBERED_IDS:
                    self._seen.popitem(last=False)
                self._to_ack.append(command.id)
        log.info(
            kv(
                "command_received",
                id=command.id,
                command=command.command,
                job_uuid=command.job_uuid,
                attempt=command.attempt,
                reason=command.reason,
                source=source,
            )
        )
        try:
            self.handler(command, source)
        except Exception as exc:  # one bad command must not stop the pilot
            log.exception(kv("command_failed", id=command.id, command=command.command, error=exc))
        return True

    def handle_raw(self, body: Any, source: str) -> bool:
        try:
            command = (
                command_from_heartbeat(body, self.pilot_id)
                if isinstance(body, dict)
                else decode_command(body)
            )
        except ContractError as exc:
            log.error(kv("command_malformed_dropped", source=source, error=exc))
            return False
        return self.handle(command, source)

    def pending_acks(self) -> list[str]:
        with self._lock:
            return list(self._to_ack)

    def confirm_acks(self, ids: list[str]) -> None:
        """The server has the ids (a heartbeat carrying them answered 200): forget them."""
        with self._lock:
            done = set(ids)
            self._to_ack = [i for i in self._to_ack if i not in done]


class CommandConsumer:
    """Consumes the pilot's command queue in a thread, on a connection of its own; reconnects
    with backoff when the broker goes away."""

    def __init__(
        self,
        broker_url: str,
        queue: Queue,
        on_body: Callable[[Any, str], Any],
        *,
        transport_options: dict[str, Any] | None = None,
    ) -> None:
        self.broker_url = broker_url
        self.queue = queue
        self.on_body = on_body
        self.transport_options = transport_options or {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()  # set once consuming (tests wait on it)

    def _on_message(self, message: Message) -> None:
        try:
            self.on_body(message.body, "bus")
        finally:
            message.ack()

    def _run(self) -> None:
        backoff = Backoff(1.0, 30.0)
        while not self._stop.is_set():
            conn = Connection(
                self.broker_url,
                transport_options=self.transport_options,
                connect_timeout=10,
                heartbeat=60,
            )
            try:
                # every URL of a failover list once (one URL: tried twice)
                conn.ensure_connection(max_retries=max(1, len(broker_urls(self.broker_url)) - 1))
                with Consumer(conn, queues=[self.queue], on_message=self._on_message) as consumer:
                    consumer.qos(prefetch_count=10)
                    self.ready.set()
                    backoff.reset()
                    log.info(kv("command_consumer_ready", queue=self.queue.name))
                    while not self._stop.is_set():
                        with contextlib.suppress(TimeoutError):  # socket.timeout is one
                            conn.drain_events(timeout=0.2)
                        conn.heartbeat_check()
            except Exception as exc:  # any broker trouble: reconnect (this thread must live on)
                if self._stop.is_set():
                    break
                delay = backoff.next()
                log.warning(
                    kv(
                        "command_consumer_reconnect",
                        error=f"{type(exc).__name__}: {exc}",
                        wait=f"{delay:.1f}",
                    )
                )
                self._stop.wait(delay)
            finally:
                try:
                    conn.release()
                except Exception as exc:
                    log.debug(kv("command_connection_close_failed", error=exc))

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pilot-commands", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
