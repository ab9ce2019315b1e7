"""Publisher confirms (``wms.bus``) against the real RabbitMQ: a batch returns once the broker
confirmed every message of it, a message the broker refuses fails the batch, and the tags of
later batches on the same channel are counted from where the last one ended."""

from __future__ import annotations

import uuid

import pytest
from kombu import Exchange, Queue

from wms import bus
from wms.exceptions import BrokerError

pytestmark = pytest.mark.skipif(
    not bus.broker_url().startswith("amqp"), reason="publisher confirms need RabbitMQ"
)


@pytest.fixture
def target():
    """An exchange and a queue of the test's own (deleted after); ``target(max_length)``."""
    made: list[tuple[Exchange, Queue]] = []
    conn = bus._connection()

    def _make(max_length: int | None = None) -> tuple[str, Queue]:
        name = f"wmstest.confirms.{uuid.uuid4().hex[:10]}"
        exchange = Exchange(name, type="direct", durable=False, auto_delete=False)
        arguments = {}
        if max_length is not None:
            arguments = {"x-max-length": max_length, "x-overflow": "reject-publish"}
        queue = Queue(name, exchange, routing_key="k", durable=False, queue_arguments=arguments)
        queue(conn.default_channel).declare()
        made.append((exchange, queue))
        return name, queue

    yield _make
    channel = bus._connection().default_channel
    for exchange, queue in made:
        queue(channel).delete()
        exchange(channel).delete()
    bus.reset_connection()


def depth(queue: Queue) -> int:
    return queue(bus._connection().default_channel).queue_declare(passive=True).message_count


def test_batches_are_confirmed_whole_one_after_the_other(target):
    name, queue = target()
    for size in (3000, 1, 500):
        bus._publish([(b'{"n": 1}', name, "k", 0)] * size)
    assert depth(queue) == 3501


def test_a_message_the_broker_refuses_fails_its_batch_and_the_next_batch_is_counted_afresh(
    target,
):
    full, full_queue = target(max_length=2)
    with pytest.raises(BrokerError, match="refused 3 message"):
        bus._publish([(b"{}", full, "k", 0)] * 5)
    assert depth(full_queue) == 2
    name, queue = target()
    bus._publish([(b"{}", name, "k", 0)] * 10)
    assert depth(queue) == 10
