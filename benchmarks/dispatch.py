"""Dispatch N jobs to RabbitMQ with publisher confirms, against a raw kombu publish of the same
messages without confirms, in the same run.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/wms \
    CELERY_BROKER_URL=amqp://guest:guest@127.0.0.1:5672// \
    .venv/bin/python benchmarks/dispatch.py [N]

Target (issue 3): >= 10k jobs/s and >= 0.5x the raw publish.
"""

from __future__ import annotations

import os
import sys
import uuid

from _common import Timer, bench_database, django_setup, report


def main(n: int) -> None:
    os.environ["WMS_BUS_PREFIX"] = f"wmsbench.{uuid.uuid4().hex[:8]}"
    os.environ["WMS_QUEUE_MAX_DEPTH"] = "0"
    os.environ["WMS_DISPATCH_MAX_PER_RUN"] = str(n)
    django_setup()
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from kombu import Producer

    from files.services import dataset_add_files, dataset_close, dataset_register
    from jobs.executor import build_messages, dispatch
    from jobs.models import Job, JobState
    from tasks.create import task_create
    from tasks.splitter import task_split
    from wms import bus
    from wms.topology import rank_to_priority

    if not settings.CELERY_BROKER_URL.startswith("amqp"):
        sys.exit("set CELERY_BROKER_URL=amqp://... (RabbitMQ)")
    conn = bus.new_connection()
    try:
        with bench_database():
            user = get_user_model().objects.create_user("bench")
            ds = dataset_register(name="bench.input")
            dataset_add_files(
                dataset=ds, files=[{"name": f"evt.{i:07d}.root", "size": 1} for i in range(n)]
            )
            dataset_close(dataset=ds, source="bench")
            task = task_create(owner=user, executable="noop", data_in_uid=ds.uid)
            task_split(task_id=task.pk)

            with Timer() as t_dispatch:
                result = dispatch()
            assert result.total == n, result
            assert Job.objects.filter(state=JobState.QUEUED).count() == n
            messages = build_messages(list(Job.objects.values_list("id", flat=True)))
            queue = bus.topology().job_queue("cpu")(conn.default_channel)
            assert queue.queue_declare(passive=True)[1] == n
            queue.purge()

            # Raw: the same bodies, one channel, no confirms, no database.
            producer = Producer(conn.default_channel)
            exchange = bus.topology().jobs_exchange
            bodies = [(m.encode(), rank_to_priority(m.rank)) for m in messages]
            with Timer() as t_raw:
                for body, prio in bodies:
                    producer.publish(
                        body,
                        exchange=exchange,
                        routing_key="cpu",
                        priority=prio,
                        delivery_mode=2,
                        content_type="application/json",
                        content_encoding="utf-8",
                        retry=False,
                    )
                # every message is in the queue before the clock stops
                while queue.queue_declare(passive=True)[1] < n:
                    pass
    finally:
        bus.topology().delete(conn)
        conn.release()

    report(
        f"dispatch {n} jobs to RabbitMQ (batch {settings.WMS_DISPATCH_BATCH}, publisher confirms)",
        [
            (
                "executor",
                f"{t_dispatch.seconds:.2f} s = {n / t_dispatch.seconds:,.0f} jobs/s"
                "  (target >= 10,000)",
            ),
            (
                "raw kombu publish",
                f"{t_raw.seconds:.2f} s = {n / t_raw.seconds:,.0f} msg/s"
                "  (no confirms, no database)",
            ),
            (
                "ratio executor/raw",
                f"{t_raw.seconds / t_dispatch.seconds:.2f}x of raw throughput  (target >= 0.5x)",
            ),
        ],
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
