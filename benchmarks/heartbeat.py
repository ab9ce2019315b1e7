"""Heartbeats of many registered pilots against the web app under gunicorn.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/wms \
    CELERY_BROKER_URL=amqp://guest:guest@127.0.0.1:5672// \
    .venv/bin/python benchmarks/heartbeat.py [--pilots 200] [--rounds 25] [--clients 4] [--busy]
        [--bare]

The web app: gunicorn, 2 ``sync`` workers (``--worker-class gthread --threads T`` to compare).

P pilots are registered (the service) and each sends one heartbeat before the clock starts
(``registered → idle``). Then C client processes, one ``requests.Session`` each, send R
rounds of heartbeats of their share of the pilots, each with that pilot's own token, as fast
as the answers come (a closed loop: C heartbeats in flight). Each call is what the agent
sends (``pilots.agent.heartbeat``): a new ``Idempotency-Key``, state, status, host metrics,
``reporting`` (empty: nothing in the spool), no acknowledged command. With ``--busy`` every
pilot first starts one job and its heartbeats carry that attempt's metrics (``jobs``: one
running event each, applied by ``job_events_apply``). ``--bare``: the body and headers of
the issue-4 runs (no key, no ``reporting``), to compare with the figures of that time.

Against: ``GET /healthz`` by the same clients on the same server, in the same run.
Target (issue 4): >= 1,000 heartbeats/s with p99 < 50 ms.
"""

from __future__ import annotations

import argparse
import time

from _common import bench_database, django_setup, report
from _pilots import (
    CpuMeter,
    WebApp,
    bench_prefix,
    delete_topology,
    make_pilots,
    make_task,
    queue_jobs,
    queued_messages,
    run_processes,
    summary,
)

HOST_METRICS = {
    "load1": 0.42,
    "free_disk_mb": 51234,
    "cpu_percent": 12.5,
    "rss_mb": 48.2,
    "running_jobs": 0,
    "slots": 1,
    "jobs_done": 17,
}


def body(running: tuple[str, int] | None, *, bare: bool = False) -> dict:
    agent: dict[str, list] = {} if bare else {"reporting": []}
    if running is None:
        return {
            "state": "idle",
            "status": "idle: 0/1 slots busy, 17 done",
            "metrics": HOST_METRICS,
            "jobs": [],
            "acked_commands": [],
            **agent,
        }
    job_uuid, attempt = running
    return {
        **agent,
        "state": "busy",
        "status": "busy: 1/1 slots busy, 17 done",
        "metrics": {**HOST_METRICS, "running_jobs": 1},
        "jobs": [
            {
                "job_uuid": job_uuid,
                "attempt": attempt,
                "cpu_time": 12.5,
                "rss_mb": 210.0,
                "wall_time": 14.0,
                "max_rss_mb": 230.0,
            }
        ],
        "acked_commands": [],
    }


def client(
    barrier,
    url: str,
    pilots: list[tuple[int, str, tuple[str, int] | None]],
    rounds: int,
    bare: bool = False,
):
    import uuid

    import requests

    session = requests.Session()
    session.get(url + "/healthz", timeout=10)
    calls = [
        (
            f"{url}/api/v1/pilots/{pid}/heartbeat/",
            {"Authorization": f"Pilot {token}"},
            body(job, bare=bare),
        )
        for pid, token, job in pilots
    ]
    barrier.wait()
    cpu0 = time.process_time()
    lat = []
    for _ in range(rounds):
        for path, auth, payload in calls:
            # as the agent does: a new key for every heartbeat (the same in its retries)
            headers = auth if bare else {**auth, "Idempotency-Key": str(uuid.uuid4())}
            t0 = time.perf_counter()
            resp = session.post(path, json=payload, headers=headers, timeout=60)
            lat.append(time.perf_counter() - t0)
            if resp.status_code != 200:
                raise RuntimeError(f"heartbeat: HTTP {resp.status_code} {resp.text[:300]}")
    session.close()
    return lat, time.process_time() - cpu0


def client_healthz(barrier, url: str, n: int):
    import requests

    session = requests.Session()
    session.get(url + "/healthz", timeout=10)
    barrier.wait()
    cpu0 = time.process_time()
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        resp = session.get(url + "/healthz", timeout=60)
        lat.append(time.perf_counter() - t0)
        assert resp.status_code == 200
    session.close()
    return lat, time.process_time() - cpu0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pilots", type=int, default=200, help="registered pilots (200)")
    parser.add_argument("--rounds", type=int, default=25, help="heartbeats per pilot (25)")
    parser.add_argument("--clients", type=int, default=4, help="client processes (4)")
    parser.add_argument("--busy", action="store_true", help="each pilot runs one job")
    parser.add_argument(
        "--bare", action="store_true", help="no idempotency key, no `reporting` (issue 4's runs)"
    )
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (2)")
    parser.add_argument("--worker-class", default="sync", choices=("sync", "gthread"))
    parser.add_argument("--threads", type=int, default=2, help="threads of a gthread worker (2)")
    args = parser.parse_args()
    p, k, rounds = args.pilots, args.clients, args.rounds

    bench_prefix()
    django_setup()
    from pilots.models import Pilot, PilotState
    from pilots.protocol import pilot_job_start
    from pilots.services import pilot_heartbeat

    pilots: list[tuple[int, str]] = []
    try:
        with bench_database():
            pilots = make_pilots(p)
            running: list[tuple[str, int] | None] = [None] * p
            if args.busy:
                task = make_task(p)
                assert queue_jobs(p) == p
                for i, ((pid, _), (job_uuid, attempt)) in enumerate(
                    zip(pilots, queued_messages(task), strict=True)
                ):
                    pilot_job_start(
                        pilot=Pilot.objects.get(pk=pid), job_uuid=job_uuid, attempt=attempt
                    )
                    running[i] = (job_uuid, attempt)
            for (pid, _), job in zip(pilots, running, strict=True):
                pilot_heartbeat(pilot_id=pid, **body(job))  # registered -> idle / busy
            rows = [(pid, token, job) for (pid, token), job in zip(pilots, running, strict=True)]
            web = WebApp(workers=args.workers, worker_class=args.worker_class, threads=args.threads)
            with web:
                cpu_hb = CpuMeter(web.proc.pid)
                results = run_processes(
                    client,
                    [(web.url, rows[i::k], rounds, args.bare) for i in range(k)],
                    start=cpu_hb.start,
                )
                cpu_hb.stop()
                n_health = max(1000, p * rounds // k)
                cpu_health = CpuMeter(web.proc.pid)
                health = run_processes(
                    client_healthz, [(web.url, n_health)] * k, start=cpu_health.start
                )
                cpu_health.stop()
            expected = PilotState.BUSY if args.busy else PilotState.IDLE
            assert Pilot.objects.filter(state=expected).count() == p
    finally:
        delete_topology([pid for pid, _ in pilots])

    lat = [t for r, _ in results for t in r]
    health_lat = [t for h, _ in health for t in h]
    rate = len(lat) / cpu_hb.wall
    health_rate = len(health_lat) / cpu_health.wall
    kind = "busy (one running job's metrics each)" if args.busy else "idle"
    kind += ", bare calls" if args.bare else ""
    report(
        f"heartbeats of {p} {kind} pilots, {rounds} each, {k} clients, {web.describe()}",
        [
            (
                "heartbeats",
                f"{len(lat)} in {cpu_hb.wall:.2f} s = {rate:,.0f}/s  (target >= 1,000/s)",
            ),
            ("  latency", f"{summary(lat)}  (target p99 < 50 ms)"),
            ("  CPU per heartbeat", cpu_hb.per(len(lat), clients=sum(c for _, c in results))),
            (
                "GET /healthz",
                f"{len(health_lat)} in {cpu_health.wall:.2f} s = {health_rate:,.0f}/s"
                f"  ({summary(health_lat)})",
            ),
            (
                "  CPU per request",
                cpu_health.per(len(health_lat), clients=sum(c for _, c in health)),
            ),
            (
                "ratio",
                f"a heartbeat costs {health_rate / rate:.1f} /healthz requests;"
                f" {rate / 1000:.2f}x the target rate",
            ),
        ],
    )


if __name__ == "__main__":
    main()
