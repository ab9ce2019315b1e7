"""End-to-end fixtures: the whole WMS as real processes on the real Postgres and RabbitMQ.

The web app (runserver on a free port), a Celery worker with beat and pilot agents run as child
processes (devtools.stack) against the test database pytest-django made, with a bus prefix and a
Celery control queue of the test's own, deleted afterwards.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from django.conf import settings as django_settings

from devtools.stack import Stack, StackConfig
from pilots.services import pilot_registrar_ensure
from tests.relay import Relay


class Lines(io.TextIOBase):
    """A thread-safe sink for the children's prefixed output (shown when a test fails)."""

    def __init__(self) -> None:
        self._buf: list[str] = []
        self._lock = threading.Lock()

    def write(self, s: str) -> int:
        with self._lock:
            self._buf.append(s)
        return len(s)

    def text(self) -> str:
        with self._lock:
            return "".join(self._buf)


def wait_until(cond: Callable[[], object], *, timeout: float, what: str, out: Lines | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = out.text()[-6000:] if out else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tail}")
        time.sleep(0.3)


def _db_url(relay: Relay | None = None) -> str:
    """The test database's URL; through ``relay`` (its port on 127.0.0.1) when given."""
    db = django_settings.DATABASES["default"]
    user = db.get("USER") or "postgres"
    auth = f"{user}:{db['PASSWORD']}@" if db.get("PASSWORD") else f"{user}@"
    host, port = db.get("HOST") or "127.0.0.1", db.get("PORT") or 5432
    if relay is not None:
        host, port = relay.host, relay.port
    return f"postgres://{auth}{host}:{port}/{db['NAME']}"


def _broker_url(relay: Relay | None = None) -> str:
    """The broker's URL (``CELERY_BROKER_URL``); through ``relay`` when given."""
    url = urlsplit(django_settings.CELERY_BROKER_URL)
    if relay is None:
        return url.geturl()
    auth = url.netloc.rpartition("@")[0]
    netloc = f"{auth}@{relay.host}:{relay.port}" if auth else f"{relay.host}:{relay.port}"
    return url._replace(netloc=netloc).geturl()


@pytest.fixture
def db_relay():
    """A :class:`tests.relay.Relay` to the test database's server (``_db_url(db_relay)``)."""
    db = django_settings.DATABASES["default"]
    with Relay(db.get("HOST") or "127.0.0.1", int(db.get("PORT") or 5432)) as relay:
        yield relay


@pytest.fixture
def broker_relay():
    """A :class:`tests.relay.Relay` to the broker (``_broker_url(broker_relay)``)."""
    url = urlsplit(django_settings.CELERY_BROKER_URL)
    if url.scheme != "amqp":
        pytest.skip("outage tests run on RabbitMQ (CELERY_BROKER_URL=amqp://...)")
    with Relay(url.hostname or "127.0.0.1", url.port or 5672) as relay:
        yield relay


@pytest.fixture
def make_stack(tmp_path, bus_prefix, settings, request):
    """Start a stack: ``make_stack(cpu=1, gpu=1, env={...})``; stopped at teardown."""
    if not settings.CELERY_BROKER_URL.startswith("amqp"):
        pytest.skip("end-to-end tests run on RabbitMQ (CELERY_BROKER_URL=amqp://...)")
    stacks: list[tuple[Stack, Lines]] = []
    control = f"{bus_prefix}.control"
    # The tests' data: inputs written under tmp_path, outputs in tmp_path/outputs/<owner>/...
    settings.WMS_OUTPUT_ROOT = (tmp_path / "outputs").resolve().as_uri()
    settings.WMS_STORAGE_ROOTS = [tmp_path.resolve().as_uri()]

    def make(
        *,
        cpu: int = 1,
        gpu: int = 1,
        slots: int = 1,
        env: dict | None = None,
        worker: bool = True,
        **cfg,
    ):
        token = pilot_registrar_ensure()
        devices = tuple(d for d, n in (("cpu", cpu), ("gpu", gpu)) if n)
        out = Lines()
        child_env = {
            "DATABASE_URL": _db_url(),
            "WMS_BUS_PREFIX": bus_prefix,
            "WMS_CONTROL_QUEUE": control,
            "WMS_SPLIT_EVERY": "1",
            "WMS_DISPATCH_EVERY": "1",
            "WMS_RECONCILE_EVERY": "5",
            "WMS_HEARTBEAT_INTERVAL": "2",
            "WMS_LOG_FORMAT": "console",
            "DJANGO_DEBUG": "true",
            "WMS_OUTPUT_ROOT": settings.WMS_OUTPUT_ROOT,
            "WMS_STORAGE_ROOTS": ",".join(settings.WMS_STORAGE_ROOTS),
            **(env or {}),
        }
        config = StackConfig(
            var_dir=tmp_path / f"var{len(stacks)}",
            broker_url=settings.CELERY_BROKER_URL,
            register_token=token,
            control_queue=control,
            devices=devices,
            pilots_per_device=max(cpu, gpu, 1),
            pilot_slots=slots,
            pilot_args=("--bus-prefix", bus_prefix, "--heartbeat-interval", "2"),
            stop_timeout=15,
            **cfg,
        )
        stack = Stack(config, env=child_env, out=out)
        stacks.append((stack, out))
        stack.start(worker=worker)
        return stack, out

    yield make
    failed = getattr(getattr(request.node, "rep_call", None), "failed", False)
    for i, (stack, out) in enumerate(stacks):
        stack.stop()
        if failed:  # the children's whole output, for the post-mortem
            log = Path(tmp_path) / f"stack{i}.log"
            log.write_text(out.text())
            print(f"children's output: {log}")
    from kombu import Exchange, Queue

    from pilots.models import Pilot
    from wms import bus

    # What the children declared under the test's names: the Celery control queue and its
    # exchange, and every pilot's command queue (a SIGKILLed pilot could not delete its own).
    conn = bus.new_connection()
    try:
        channel = conn.default_channel
        topo = bus.topology()
        names = [topo.command_queue(pk) for pk in Pilot.objects.values_list("id", flat=True)]
        for queue in [Queue(control, durable=True), *names]:
            with contextlib.suppress(Exception):
                queue(channel).delete()
        with contextlib.suppress(Exception):
            Exchange(control, type="direct")(channel).delete()
    finally:
        conn.release()
