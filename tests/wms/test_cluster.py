"""Running on a RabbitMQ cluster (docs/deployment.md): with ``WMS_QUEUE_TYPE=quorum`` every
queue the WMS declares is a quorum queue without priority (the topology, Celery's task queue,
what a pilot declares), and such queues declare and carry messages on the real RabbitMQ;
a broker URL may be a failover list, and the server's and the pilot's connections take the
next URL when one does not answer.

The whole failover with three nodes and one killed is benchmarks/cluster.py, run by the
opt-in ``test_cluster_script_quick`` (``WMS_TEST_CLUSTER=1``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from kombu import Connection

from devtools.stack import free_port
from pilots.agent.config import ConfigError, PilotConfig, load
from wms import bus
from wms.contract import Command, JobMessage
from wms.topology import (
    DEVICE_TYPES,
    Topology,
    broker_urls,
    hide_password,
    split_password,
    url_password,
    with_password,
)

ROOT = Path(__file__).resolve().parents[2]
QUORUM = {"x-queue-type": "quorum"}


def quorum_queues(topo: Topology) -> list:
    return [*topo.server_queues(), topo.command_queue(7), topo.control_queue("x.control")]


# --- the declared queues -----------------------------------------------------------------------


def test_with_quorum_every_queue_is_a_durable_quorum_queue_without_priority():
    topo = Topology("wms", "quorum")
    queues = quorum_queues(topo)
    assert {q.name for q in queues} == {
        "wms.jobs.cpu",
        "wms.jobs.gpu",
        "wms.events",
        "wms.pilot.7",
        "x.control",
    }
    for queue in queues:
        assert queue.queue_arguments == QUORUM, queue.name  # no x-max-priority
        assert (queue.durable, queue.exclusive, queue.auto_delete) == (True, False, False)


def test_classic_job_queues_keep_their_priorities_and_nothing_else_has_one():
    topo = Topology("wms", "classic")
    for device in DEVICE_TYPES:
        assert topo.job_queue(device).queue_arguments == {"x-max-priority": 10}
    for queue in (topo.events_queue(), topo.command_queue(7), topo.control_queue("c")):
        assert not queue.queue_arguments


def test_an_unknown_queue_type_is_refused():
    with pytest.raises(ValueError, match="queue_type"):
        Topology("wms", "stream")


def _celery_queues(queue_type: str) -> dict:
    """Celery's queues and consumer as config/celery.py makes them, in a fresh process."""
    code = (
        "import django, json; django.setup()\n"
        "from config.celery import app\n"
        "from celery.utils.quorum_queues import detect_quorum_queues\n"
        "from celery.worker.consumer.delayed_delivery import DelayedDelivery\n"
        "from celery.utils.imports import symbol_by_name\n"
        "consumer = symbol_by_name(app.conf.worker_consumer)\n"
        "steps = consumer.Blueprint.default_steps\n"
        "print(json.dumps({'queues': {n: [q.queue_arguments or {}, q.durable, q.auto_delete]\n"
        "  for n, q in app.amqp.queues.items()},\n"
        " 'default': app.conf.task_default_queue,\n"
        " 'missing_type': app.conf.task_create_missing_queue_type,\n"
        " 'quorum': detect_quorum_queues(app, 'amqp')[0],\n"
        " 'delayed': any(s.endswith(':DelayedDelivery') for s in steps)}))\n"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "WMS_QUEUE_TYPE": queue_type,
        "WMS_CONTROL_QUEUE": "wmstest.ctl",
        "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
    }
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_celerys_task_queue_is_a_quorum_queue_with_quorum():
    out = _celery_queues("quorum")
    assert out["default"] == "wmstest.ctl"
    assert out["queues"] == {"wmstest.ctl": [QUORUM, True, False]}
    assert out["missing_type"] == "quorum"  # a queue Celery would make for an unknown name
    assert out["quorum"] is True  # so workers use per-consumer prefetch
    assert out["delayed"] is False  # no native delayed delivery: the WMS sends no ETA


def test_celerys_task_queue_is_classic_by_default():
    out = _celery_queues("classic")
    assert out["queues"] == {"wmstest.ctl": [{}, True, False]}
    assert out["quorum"] is False


def test_a_bad_queue_type_stops_the_settings():
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "WMS_QUEUE_TYPE": "lazy"}
    done = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert "WMS_QUEUE_TYPE" in done.stderr


# --- on the real RabbitMQ ----------------------------------------------------------------------


def is_quorum(conn: Connection, name: str) -> bool:
    """The queue exists and is a quorum queue without priority: redeclaring it with exactly
    ``x-queue-type: quorum`` is accepted (any other argument set is refused as inequivalent)."""
    channel = conn.channel()
    try:
        channel.queue_declare(name, passive=True)
    finally:
        with contextlib.suppress(Exception):
            channel.close()
    channel = conn.channel()
    try:
        channel.queue_declare(name, durable=True, auto_delete=False, arguments=QUORUM)
        return True
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            channel.close()


def message(device_type: str = "cpu", rank: int = 0) -> JobMessage:
    return JobMessage(
        job_uuid=str(uuid.uuid4()),
        attempt=0,
        task_id=1,
        executable="true",
        args="",
        device_type=device_type,
        mode="map",
        inputs=[],
        output_url="file:///tmp/out/",
        output_dataset_uid=str(uuid.uuid4()),
        server_url="http://wms.invalid",
        rank=rank,
    )


@pytest.fixture
def quorum(settings, bus_prefix):
    if not settings.CELERY_BROKER_URL.startswith("amqp"):
        pytest.skip("quorum queues need RabbitMQ (CELERY_BROKER_URL=amqp://...)")
    settings.WMS_QUEUE_TYPE = "quorum"
    bus.reset_connection()
    yield bus_prefix
    bus.reset_connection()


def test_quorum_queues_declare_and_carry_messages_on_rabbitmq(quorum, drain_queue):
    # jobs of any rank are published with confirms (a priority is ignored, not refused)
    sent = [message(rank=r) for r in (-50, 0, 90)]
    assert bus.publish_jobs(sent) == 3
    assert bus.publish_commands([Command(command="drain", pilot_id=4242, id="c1")]) == 1
    topo = bus.topology()
    conn = bus.new_connection()
    try:
        for name in (
            topo.job_queue_name("cpu"),
            topo.job_queue_name("gpu"),
            topo.events_queue().name,
            topo.command_queue(4242).name,
        ):
            assert is_quorum(conn, name), name
        assert bus.queue_depth("cpu") == 3
    finally:
        conn.release()
    got = drain_queue("cpu")
    # a quorum queue on RabbitMQ 3.x keeps publication order (no priority): rank is the
    # executor's order of claiming (docs/deployment.md)
    assert [body["job_uuid"] for body, _ in got] == [m.job_uuid for m in sent]


def test_celerys_quorum_task_queue_declares_on_rabbitmq(quorum, settings):
    name = f"{quorum}.control"
    queue = bus.topology().control_queue(name)
    conn = bus.new_connection()
    try:
        queue(conn.default_channel).declare()
        assert is_quorum(conn, name)
    finally:
        with contextlib.suppress(Exception):
            queue(conn.channel()).delete()
        with contextlib.suppress(Exception):
            queue.exchange(conn.channel()).delete()
        conn.release()


# --- failover URL lists ------------------------------------------------------------------------

A, B = "amqp://wms:pw@mq1:5672/v", "amqp://wms:pw@mq2:5672/v"


def test_a_failover_list_is_split_in_order():
    assert broker_urls(f"{A};{B}") == [A, B]
    assert broker_urls(f" {A} ; {B} ;") == [A, B]
    assert broker_urls(A) == [A]
    assert broker_urls("filesystem://") == ["filesystem://"]


def test_the_password_of_a_failover_list_is_taken_apart_and_put_back():
    shown, password = split_password(f"{A};{B}")
    assert (shown, password) == ("amqp://wms@mq1:5672/v;amqp://wms@mq2:5672/v", "pw")
    assert with_password(shown, password) == f"{A};{B}"
    assert url_password(f"amqp://wms@mq1//;{B}") == "pw"
    assert hide_password(f"{A};{B}") == "amqp://wms:***@mq1:5672/v;amqp://wms:***@mq2:5672/v"
    assert split_password("amqp://wms@mq1//;amqp://wms@mq2//") == (
        "amqp://wms@mq1//;amqp://wms@mq2//",
        "",
    )


def test_a_failover_list_with_two_passwords_is_refused():
    with pytest.raises(ValueError, match="different passwords"):
        split_password("amqp://a:x@mq1//;amqp://a:y@mq2//")


def test_the_pilot_puts_its_password_in_every_url_of_its_list(tmp_path):
    config = PilotConfig(
        broker_url="amqp://pilot@mq1//;amqp://pilot@mq2//", broker_password="s3:cr/t"
    )
    assert config.broker_connect_url == (
        "amqp://pilot:s3%3Acr%2Ft@mq1//;amqp://pilot:s3%3Acr%2Ft@mq2//"
    )
    assert "s3" not in json.dumps(config.redacted())


def test_the_pilot_refuses_a_password_in_any_url_of_its_list(tmp_path):
    token = tmp_path / "token"
    token.write_text("t")
    token.chmod(0o600)
    argv = [
        "--broker-url",
        "amqp://pilot@mq1//;amqp://pilot:pw@mq2//",
        "--register-token-file",
        str(token),
    ]
    with pytest.raises(ConfigError, match="password"):
        load(argv, environ={}, stdin=None)


def test_the_publisher_and_healthz_take_the_next_url_when_one_is_down(
    quorum, settings, drain_queue
):
    from wms.views import broker_status

    real = settings.CELERY_BROKER_URL
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    settings.CELERY_BROKER_URL = f"{dead};{real}"
    bus.reset_connection()
    sent = message()
    assert bus.publish_jobs([sent]) == 1
    assert [body["job_uuid"] for body, _ in drain_queue("cpu")] == [sent.job_uuid]
    assert broker_status() == "ok"  # /healthz's verdict on the broker


# --- the whole thing on three nodes (opt-in: it starts a cluster and the stack) ------------------


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("WMS_TEST_CLUSTER") != "1",
    reason="starts a 3-node RabbitMQ cluster and the stack: WMS_TEST_CLUSTER=1",
)
def test_cluster_script_quick(settings):
    db = settings.DATABASES["default"]
    url = f"postgres://{db.get('USER') or 'postgres'}@{db.get('HOST') or '127.0.0.1'}:"
    url += f"{db.get('PORT') or 5432}/{db['NAME'].removeprefix('test_')}_cluster"
    done = subprocess.run(
        [sys.executable, "benchmarks/cluster.py", "--quick"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "  lost                         0" in done.stdout
    assert "  run twice                    0" in done.stdout
