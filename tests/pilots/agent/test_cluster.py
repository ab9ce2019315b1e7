"""The pilot on a RabbitMQ cluster (docs/deployment.md): it declares its queues of the type the
server's registration answer names (quorum: no priority), and its broker URL may be a
failover list whose first node does not answer. On the machine's real RabbitMQ, under a
prefix of the test's own, deleted after."""

from __future__ import annotations

import contextlib
import threading
import uuid
from dataclasses import replace

from kombu import Connection, Producer

from devtools.stack import free_port
from pilots.agent.agent import Agent
from tests.pilots.agent.conftest import BROKER_URL, job_message
from tests.pilots.agent.fakewms import wait_until
from wms.contract import Command
from wms.topology import Topology

QUORUM = {"x-queue-type": "quorum"}


def is_quorum(conn: Connection, name: str) -> bool:
    """It exists and redeclaring it with exactly ``x-queue-type: quorum`` is accepted (not
    classic, no ``x-max-priority``)."""
    channel = conn.channel()
    try:
        channel.queue_declare(name, passive=True)
        channel.queue_declare(name, durable=True, auto_delete=False, arguments=QUORUM)
        return True
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            channel.close()


def test_the_pilot_declares_quorum_queues_when_the_server_says_so_and_fails_over(
    fake_wms, agent_config, outdir
):
    prefix = f"wmstest-agent.{uuid.uuid4().hex[:10]}"
    fake_wms.bus_prefix = prefix
    fake_wms.queue_type = "quorum"
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    config = replace(agent_config, queue_type="classic", broker_url=f"{dead};{BROKER_URL}")
    agent = Agent(config, install_signals=False, sample_interval=0.1)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(agent.run()), daemon=True)
    topology = Topology(prefix, "quorum")
    conn = Connection(BROKER_URL, connect_timeout=5)
    thread.start()
    try:
        wait_until(lambda: agent.registered.is_set() or not thread.is_alive(), timeout=20)
        assert thread.is_alive(), f"the agent exited at start-up: {result}"
        assert agent.topology.queue_type == "quorum"  # the server's answer won
        wait_until(lambda: agent.consumer is not None and agent.consumer.ready.is_set(), 20)
        pilot_id = agent.pilot_id
        assert pilot_id is not None
        assert is_quorum(conn, topology.job_queue_name("cpu"))
        assert is_quorum(conn, topology.command_queue(pilot_id).name)

        # a job through the quorum queue, taken over the second URL of the list
        job = job_message(outdir, "write", "h.json=1")
        fake_wms.jobs[job.job_uuid] = job.to_dict()
        publish = Producer(conn.default_channel).publish
        publish(job.encode(), exchange=topology.jobs_exchange, routing_key="cpu", delivery_mode=2)
        (report,) = wait_until(lambda: fake_wms.final_reports(job.job_uuid), timeout=30)
        assert report.body["state"] == "finished"
        publish(
            Command(command="drain", pilot_id=pilot_id, id="d").encode(),
            exchange=topology.commands_exchange,
            routing_key=topology.command_routing_key(pilot_id),
        )
        thread.join(20)
        assert not thread.is_alive() and result == [0]
    finally:
        if thread.is_alive():
            agent.shutdown("test teardown")
            thread.join(20)
        topology.delete(conn, pilot_ids=[agent.pilot_id] if agent.pilot_id else [])
        conn.release()
