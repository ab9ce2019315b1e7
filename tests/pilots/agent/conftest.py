"""Fixtures of the agent's tests: a fake WMS on a free port, a RabbitMQ namespace of the test's
own (deleted after), job messages, and agents run in a thread of the test process.

None of them needs Django or the database: the agent is Django-free.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Producer

from pilots.agent.agent import Agent
from pilots.agent.config import PilotConfig
from tests.pilots.agent.fakewms import REGISTER_TOKEN, FakeWMS, wait_until
from wms.contract import Command, InputFile, JobMessage
from wms.topology import Topology

BROKER_URL = os.environ.get("WMS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
PAYLOAD = str(Path(__file__).with_name("payload.py"))


def secret_args(
    register_token: str = REGISTER_TOKEN, broker_url: str = BROKER_URL
) -> tuple[list[str], str]:
    """The flags of a real pilot process and what to write on its standard input: the secrets
    go there, never on its command line or in its environment; as root, payloads run as root
    (said explicitly, as the pilot wants)."""
    from wms.topology import split_password

    url, password = split_password(broker_url)
    argv = ["--broker-url", url, "--register-token-file", "-"]
    lines = [register_token]
    if password:
        argv += ["--broker-password-file", "-"]
        lines.append(password)
    if os.geteuid() == 0:
        argv += ["--payload-user", "root"]
    return argv, "".join(f"{line}\n" for line in lines)


def job_message(
    output_dir: Path,
    *args: str,
    job_uuid: str | None = None,
    attempt: int = 0,
    executable: str = sys.executable,
    inputs: list[InputFile] | None = None,
    device_type: str = "cpu",
) -> JobMessage:
    """A job running ``payload.py <args>``, its outputs going to ``output_dir``."""
    import shlex

    return JobMessage(
        job_uuid=job_uuid or str(uuid.uuid4()),
        attempt=attempt,
        task_id=42,
        executable=executable,
        args=shlex.join([PAYLOAD, *args]),
        device_type=device_type,
        mode="map",
        inputs=inputs or [],
        output_url=output_dir.as_uri() + "/",
        output_dataset_uid=str(uuid.uuid4()),
        server_url="http://wms.invalid",
    )


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    d = tmp_path / "storage"
    d.mkdir()
    return d


@pytest.fixture
def fake_wms(tmp_path: Path) -> Iterator[FakeWMS]:
    fake = FakeWMS(spool_dir=tmp_path / "work" / "spool").start()
    yield fake
    fake.stop()


@dataclass
class Bus:
    prefix: str
    conn: Connection
    pilot_ids: set[int] = field(default_factory=set)

    @property
    def topology(self) -> Topology:
        return Topology(self.prefix)

    def publish(self, body: bytes | JobMessage, device_type: str = "cpu") -> None:
        data = body.encode() if isinstance(body, JobMessage) else body
        Producer(self.conn.default_channel).publish(
            data,
            exchange=self.topology.jobs_exchange,
            routing_key=device_type,
            delivery_mode=2,
            content_type="application/json",
            content_encoding="utf-8",
            declare=[self.topology.job_queue(device_type)],
            retry=False,
        )

    def send_command(self, command: Command) -> None:
        self.pilot_ids.add(command.pilot_id)
        Producer(self.conn.default_channel).publish(
            command.encode(),
            exchange=self.topology.commands_exchange,
            routing_key=self.topology.command_routing_key(command.pilot_id),
            content_type="application/json",
            content_encoding="utf-8",
            retry=False,
        )

    def ready(self, device_type: str = "cpu") -> int:
        """Messages ready (not unacked) in a job queue."""
        queue = self.topology.job_queue(device_type)(self.conn.default_channel)
        return queue.queue_declare(passive=True).message_count

    def command_queue_exists(self, pilot_id: int) -> bool:
        channel = self.conn.channel()
        try:
            self.topology.command_queue(pilot_id)(channel).queue_declare(passive=True)
            return True
        except Exception:
            return False
        finally:
            with contextlib.suppress(Exception):  # a channel closed by the broker's 404
                channel.close()


@pytest.fixture
def bus() -> Iterator[Bus]:
    """A per-test prefix on the real RabbitMQ; its queues and exchanges are deleted after."""
    prefix = f"wmstest-agent.{uuid.uuid4().hex[:10]}"
    conn = Connection(BROKER_URL, connect_timeout=5)
    conn.ensure_connection(max_retries=2)
    topology = Topology(prefix)
    topology.declare(conn)
    b = Bus(prefix, conn)
    yield b
    try:
        fresh = Connection(BROKER_URL, connect_timeout=5)
        topology.delete(fresh, pilot_ids=sorted(b.pilot_ids | set(range(7, 17))))
        fresh.release()
    finally:
        conn.release()


@dataclass
class RunningAgent:
    agent: Agent
    thread: threading.Thread
    result: list[int]

    def stop(self, how: str = "drain", timeout: float = 15.0) -> int:
        if self.thread.is_alive():
            getattr(self.agent, how)(f"test {how}")
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the agent did not exit"
        return self.result[0]


@pytest.fixture
def agent_config(tmp_path: Path, fake_wms: FakeWMS) -> PilotConfig:
    return PilotConfig(
        server_url=fake_wms.url,
        broker_url=BROKER_URL,
        register_token=REGISTER_TOKEN,
        hostname="wn001.test",
        work_dir=str(tmp_path / "work"),
        slots=1,
        heartbeat_interval=0.2,
        grace_period=1.0,
        poll_interval=0.1,
        http_timeout=5.0,
        register_retries=0,
    )


@pytest.fixture
def start_agent(bus: Bus, fake_wms: FakeWMS) -> Iterator[Any]:
    fake_wms.bus_prefix = bus.prefix
    started: list[RunningAgent] = []

    def _start(config: PilotConfig, **changes: Any) -> RunningAgent:
        agent = Agent(replace(config, **changes), install_signals=False, sample_interval=0.1)
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(agent.run()), daemon=True)
        thread.start()
        wait_until(lambda: agent.registered.is_set() or not thread.is_alive(), timeout=10)
        assert thread.is_alive(), f"the agent exited at start-up: {result}"
        assert agent.pilot_id is not None
        bus.pilot_ids.add(agent.pilot_id)
        if agent.consumer is None:
            wait_until(lambda: agent.consumer is not None)
        assert agent.consumer is not None
        wait_until(agent.consumer.ready.is_set, timeout=10)
        running = RunningAgent(agent, thread, result)
        started.append(running)
        return running

    yield _start
    for running in started:
        if running.thread.is_alive():
            running.agent.shutdown("test teardown")
            running.thread.join(20)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
