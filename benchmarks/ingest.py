"""Bulk status ingestion: running-metric events of N running attempts, by REST and by the bus.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/wms \
    CELERY_BROKER_URL=amqp://guest:guest@127.0.0.1:5672// \
    .venv/bin/python benchmarks/ingest.py [N] [--events 5] [--pilots 4] [--batch 500] \
        [--consumers 1]

N jobs are made ``running``, each with a running attempt of one of P pilots (a bulk fixture,
not timed). Each attempt then gets E ``running`` events (its metrics), E x N in all, twice:

- **REST**: each pilot (a client process of its own, one ``requests.Session``) posts its
  attempts' events to ``POST /api/v1/pilots/{id}/events/`` in batches of 1,000 (the
  endpoint's limit), against the web app under gunicorn (2 sync workers); timed until the
  last answer, every outcome checked ``applied``.
- **bus**: the same number of ``StatusEvent`` bodies (each naming its pilot, signed with its
  bus key) are published to
  ``<prefix>.events`` (routing key ``event``; the run's own prefix), then K consumers (the
  workers' code, ``pilots.consumer.consume``, batches of ``WMS_EVENTS_BATCH``; each a process
  of its own, as K workers would run them) drain the queue; timed from their start to the
  last batch's commit.

Against, for the bus: a bare kombu consumer draining the same messages, acking them, nothing
else (the floor of one py-amqp connection). Both paths end in
``jobs.reports.job_events_apply``. Target (issue 4): >= 20k updates/s each.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

from _common import Timer, bench_database, django_setup, report
from _pilots import (
    CpuMeter,
    PilotSession,
    WebApp,
    bench_prefix,
    bus_key,
    delete_topology,
    make_pilots,
    make_running,
    make_task,
    queue_jobs,
    run_processes,
)

REST_BATCH = 1000


def metrics(source: str, round_: int) -> dict:
    return {
        "cpu_time": 10.0 * (round_ + 1),
        "rss_mb": 200.0 + round_,
        "wall_time": 12.0 * (round_ + 1),
        "max_rss_mb": 210.0,
        "source": source,
        "round": round_,
    }


def rest_client(barrier, url: str, pilot_id: int, token: str, attempts, rounds: int):
    """One pilot posts E rounds of running events of its attempts, 1,000 per request."""
    client = PilotSession(url, pilot_id, token)
    events = [
        {
            "job_uuid": job_uuid,
            "attempt": attempt,
            "state": "running",
            "metrics": metrics("rest", r),
        }
        for r in range(rounds)
        for job_uuid, attempt in attempts
    ]
    batches = [events[i : i + REST_BATCH] for i in range(0, len(events), REST_BATCH)]
    client.session.get(url + "/healthz", timeout=10)
    barrier.wait()
    cpu0 = time.process_time()
    lat = []
    for batch in batches:
        t, body = client.post(f"/pilots/{pilot_id}/events/", {"events": batch})
        lat.append(t)
        bad = [r for r in body["results"] if r.get("outcome") != "applied"]
        if bad:
            raise RuntimeError(f"{len(bad)} events not applied, first: {bad[0]}")
    client.close()
    return lat, time.process_time() - cpu0


def bus_consumer(barrier, total: int, batch: int, shared):
    """One consumer (``pilots.consumer.consume``, the workers' code) on its own connection, until
    every event is applied by one of the K. Returns (applied here, time of its last batch, CPU)."""
    from pilots import consumer
    from wms import bus

    last = [0.0]
    applied = [0]
    apply_messages = consumer.apply_messages

    def counted(messages):
        result = apply_messages(messages)
        applied[0] += result.applied
        with shared.get_lock():
            shared.value += result.applied
        last[0] = time.time()
        return result

    class Drained:  # consume() polls is_set() between deliveries (at least every 0.5 s)
        def is_set(self) -> bool:
            return shared.value >= total

        def wait(self, seconds: float) -> bool:
            time.sleep(seconds)
            return self.is_set()

    consumer.apply_messages = counted
    conn = bus.new_connection()
    conn.ensure_connection(max_retries=3)
    barrier.wait()
    c0 = time.process_time()
    try:
        consumer.consume(conn, batch_size=batch, stop=Drained())
    finally:
        conn.release()
    return applied[0], last[0], time.process_time() - c0


def raw_drain(conn, queue, total: int, batch: int) -> None:
    from kombu import Consumer

    got: list = []

    def on_message(message) -> None:
        got.append(message)
        if len(got) % batch == 0 or len(got) == total:
            message.ack(multiple=True)

    with Consumer(
        conn.default_channel, queues=[queue], on_message=on_message, prefetch_count=2 * batch
    ):
        while len(got) < total:
            conn.drain_events(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", nargs="?", type=int, default=10_000, help="running attempts (10^4)")
    parser.add_argument("--events", type=int, default=5, help="events per attempt (5)")
    parser.add_argument("--pilots", type=int, default=4, help="pilots = REST clients (4)")
    parser.add_argument("--batch", type=int, default=None, help="consumer batch (WMS default)")
    parser.add_argument("--consumers", type=int, default=1, help="bus consumers (1)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (2)")
    parser.add_argument("--worker-class", default="sync", choices=("sync", "gthread"))
    parser.add_argument("--threads", type=int, default=2, help="threads of a gthread worker (2)")
    args = parser.parse_args()
    n, rounds, k = args.n, args.events, args.pilots
    total = n * rounds

    bench_prefix()
    django_setup()
    from django.conf import settings
    from kombu import Producer

    from jobs.models import AttemptState, JobAttempt
    from wms import bus
    from wms.contract import StatusEvent, event_headers

    if not settings.CELERY_BROKER_URL.startswith("amqp"):
        raise SystemExit("set CELERY_BROKER_URL=amqp://... (RabbitMQ)")
    batch = args.batch or settings.WMS_EVENTS_BATCH
    pilots: list[tuple[int, str]] = []
    conn = bus.new_connection()
    try:
        with bench_database():
            task = make_task(n)
            assert queue_jobs(n) == n
            pilots = make_pilots(k)
            tokens = dict(pilots)
            running = make_running(task, list(tokens))

            # --- REST ---------------------------------------------------------------------
            web = WebApp(workers=args.workers, worker_class=args.worker_class, threads=args.threads)
            with web:
                cpu_rest = CpuMeter(web.proc.pid)
                rest = run_processes(
                    rest_client,
                    [(web.url, pid, tokens[pid], mine, rounds) for pid, mine in running.items()],
                    start=cpu_rest.start,
                )
                cpu_rest.stop()
            assert (
                JobAttempt.objects.filter(
                    state=AttemptState.RUNNING, metrics__source="rest", metrics__round=rounds - 1
                ).count()
                == n
            )

            # --- bus ----------------------------------------------------------------------
            topology = bus.topology()
            queue = topology.events_queue()
            topology.declare(conn, queues=[queue])
            keys = {pid: bus_key(pid, token) for pid, token in pilots}
            # each pilot signs its own events, as an agent publishing them would
            signed = [
                (body, event_headers(body, pilot_id=pid, key=keys[pid]))
                for r in range(rounds)
                for pid, mine in running.items()
                for job_uuid, attempt in mine
                for body in [
                    StatusEvent(
                        job_uuid=job_uuid,
                        attempt=attempt,
                        state="running",
                        pilot_id=pid,
                        metrics=metrics("bus", r),
                    ).encode()
                ]
            ]
            producer = Producer(conn.default_channel)

            def publish() -> None:
                for body, headers in signed:
                    producer.publish(
                        body,
                        headers=headers,
                        exchange=topology.events_exchange,
                        routing_key="event",
                        delivery_mode=2,
                        content_type="application/json",
                        content_encoding="utf-8",
                        retry=False,
                    )
                while queue(conn.default_channel).queue_declare(passive=True)[1] < total:
                    time.sleep(0.05)

            # The floor: the same messages drained by a bare kombu consumer that only acks
            # (one multiple ack per batch, as the consumer does), no decoding, no database.
            publish()
            with Timer() as t_raw:
                raw_drain(conn, queue, total, batch)
            with Timer() as t_publish:
                publish()
            # K consumers (processes of their own, as K workers would run them) share the
            # queue; they stop once every event is applied (they would wait for more).
            shared = multiprocessing.get_context("fork").Value("q", 0)
            cpu_bus = CpuMeter(broker=True)
            bus_runs = run_processes(
                bus_consumer, [(total, batch, shared)] * args.consumers, start=cpu_bus.start
            )
            cpu_bus.stop()
            t_bus = max(last for _, last, _ in bus_runs) - cpu_bus.started
            applied = sum(a for a, _, _ in bus_runs)
            assert applied == total, applied
            assert (
                JobAttempt.objects.filter(
                    state=AttemptState.RUNNING, metrics__source="bus", metrics__round=rounds - 1
                ).count()
                == n
            )
    finally:
        delete_topology([pid for pid, _ in pilots])
        conn.release()

    rest_lat = [t for lat, _ in rest for t in lat]
    rest_rate = total / cpu_rest.wall
    bus_rate = total / t_bus
    p50 = sorted(rest_lat)[len(rest_lat) // 2] * 1000
    report(
        f"ingestion of {total:,} running events ({n:,} attempts x {rounds}),"
        f" REST by {k} pilots ({web.describe()}) and bus (consumer batch {batch})",
        [
            (
                "REST /pilots/{id}/events/",
                f"{cpu_rest.wall:.2f} s = {rest_rate:,.0f} updates/s"
                f"  ({len(rest_lat)} requests of <= {REST_BATCH}, p50 {p50:.0f} ms)"
                "  (target >= 20,000/s)",
            ),
            ("  CPU per 1,000 events", cpu_rest.per(total / 1000, clients=sum(c for _, c in rest))),
            (
                f"bus, {args.consumers} consumer(s)",
                f"{t_bus:.2f} s = {bus_rate:,.0f} updates/s"
                f"  (batches of up to {batch})  (target >= 20,000/s)",
            ),
            (
                "  CPU per 1,000 events",
                cpu_bus.per(total / 1000, consumers=sum(c for _, _, c in bus_runs)),
            ),
            (
                "  publishing (not in the figure)",
                f"{t_publish.seconds:.2f} s = {total / t_publish.seconds:,.0f} msg/s",
            ),
            (
                "  raw kombu drain (the floor)",
                f"{t_raw.seconds:.2f} s = {total / t_raw.seconds:,.0f} msg/s"
                f"  (the consumers at {t_raw.seconds / t_bus:.2f}x of it)",
            ),
            ("ratio bus/REST", f"{bus_rate / rest_rate:.2f}x"),
        ],
    )


if __name__ == "__main__":
    main()
