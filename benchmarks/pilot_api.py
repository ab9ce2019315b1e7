"""The pilot protocol over REST: ``start`` then the final ``report`` (finished, one output and
its log) of N queued jobs, by a few pilots at once, against the web app under gunicorn.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/wms \
    CELERY_BROKER_URL=amqp://guest:guest@127.0.0.1:5672// \
    .venv/bin/python benchmarks/pilot_api.py [N] [--clients 4] [--workers 2] \
        [--worker-class sync|gthread] [--threads 2] [--batch B]

N jobs are split and dispatched (the executor, on a bus prefix of the run; the job queue is
then emptied), so they are ``queued`` as a pilot finds them. Each client is a process of its
own acting as one registered pilot: one ``requests.Session`` with the pilot's token (kept
alive by ``gthread`` workers; ``sync`` ones close it after each answer), taking its share of
the job messages one after the other (start, then report). The web app runs under gunicorn (2
``sync`` workers, as ``devtools.stack`` runs it) on a free port against the bench database.

Against: ``GET /healthz`` (Django's request cycle and one ``SELECT 1``, no authentication) by
the same clients on the same server, in the same run: the floor of one HTTP request here.
With ``--batch B`` each pilot starts B jobs in one ``POST /pilots/{id}/starts/`` and reports
them in one ``POST /pilots/{id}/events/`` (the agent's batched path, issue 15).
Target (issues 4 and 15): >= 1,000 jobs/s (start + report pairs).
"""

from __future__ import annotations

import argparse
import time

from _common import bench_database, django_setup, report
from _pilots import (
    CpuMeter,
    PilotSession,
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


def report_body(job_uuid: str, attempt: int, output_url: str) -> dict:
    """A finished attempt with one output and its log, as the agent sends it (under the job's
    output URL, which the start answered)."""
    root = f"{output_url.rstrip('/')}/{job_uuid}"
    log_name = f"{job_uuid}.{attempt}.log"
    return {
        "attempt": attempt,
        "state": "finished",
        "exit_code": 0,
        "error_code": "",
        "error_message": "",
        "metrics": {"cpu_time": 0.012, "rss_mb": 9.5, "max_rss_mb": 9.5, "wall_time": 0.03},
        "outputs": [
            {
                "name": "out.root",
                "type": "output",
                "size": 1024,
                "check_sum": "adler32:0a1b2c3d",
                "url": f"{root}/out.root",
            },
            {
                "name": log_name,
                "type": "log",
                "size": 512,
                "check_sum": "adler32:01020304",
                "url": f"{root}/{attempt}/{log_name}",
            },
        ],
    }


def client_pairs(
    barrier, url: str, pilot_id: int, token: str, jobs: list[tuple[str, int]], batch: int = 1
):
    """One pilot: start + report each of its jobs; the latencies of both calls. With
    ``batch`` > 1, ``batch`` jobs at a time: one ``starts`` call, then one ``events`` call
    with their final reports (the agent's batched path)."""
    client = PilotSession(url, pilot_id, token)
    client.session.get(url + "/healthz", timeout=10)  # the connection is open before the clock
    barrier.wait()
    cpu0 = time.process_time()
    starts, reports = [], []
    if batch > 1:
        for i in range(0, len(jobs), batch):
            group = jobs[i : i + batch]
            t, body = client.post(
                f"/pilots/{pilot_id}/starts/",
                {"starts": [{"job_uuid": u, "attempt": a} for u, a in group]},
            )
            starts.append(t)
            results = body["results"]
            assert all(r.get("outcome") == "started" for r in results), results[:3]
            events = [
                {
                    "job_uuid": r["job_uuid"],
                    **report_body(r["job_uuid"], r["attempt"], r["job"]["output_url"]),
                }
                for r in results
            ]
            t, body = client.post(f"/pilots/{pilot_id}/events/", {"events": events})
            reports.append(t)
            assert {r.get("outcome") for r in body["results"]} == {"applied"}, body["results"][:3]
        client.close()
        return starts, reports, time.process_time() - cpu0
    for job_uuid, attempt in jobs:
        t, body = client.post(f"/jobs/{job_uuid}/start/", {"attempt": attempt})
        starts.append(t)
        assert body["job_uuid"] == job_uuid
        report = report_body(job_uuid, attempt, body["output_url"])
        t, body = client.post(f"/jobs/{job_uuid}/report/", report)
        reports.append(t)
        assert body == {"job_state": "finished", "outcome": "applied"}, body
    client.close()
    return starts, reports, time.process_time() - cpu0


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
    parser.add_argument("n", nargs="?", type=int, default=5000, help="jobs (5000)")
    parser.add_argument("--clients", type=int, default=4, help="pilots calling at once (4)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (2)")
    parser.add_argument("--worker-class", default="sync", choices=("sync", "gthread"))
    parser.add_argument("--threads", type=int, default=2, help="threads of a gthread worker (2)")
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="jobs per call: 1 = start + report per job; B > 1 = one starts call and one "
        "events call per B jobs (1)",
    )
    args = parser.parse_args()
    n, k = args.n, args.clients

    bench_prefix()
    django_setup()
    from django.db.models import Count

    from jobs.models import Job, JobAttempt, JobState

    pilots: list[tuple[int, str]] = []
    try:
        with bench_database():
            task = make_task(n)
            assert queue_jobs(n) == n
            messages = queued_messages(task)
            pilots = make_pilots(k)
            shares = [messages[i::k] for i in range(k)]
            web = WebApp(workers=args.workers, worker_class=args.worker_class, threads=args.threads)
            with web:
                cpu_pairs = CpuMeter(web.proc.pid)
                results = run_processes(
                    client_pairs,
                    [
                        (web.url, pid, token, share, args.batch)
                        for (pid, token), share in zip(pilots, shares, strict=True)
                    ],
                    start=cpu_pairs.start,
                )
                cpu_pairs.stop()
                cpu_health = CpuMeter(web.proc.pid)
                health = run_processes(
                    client_healthz, [(web.url, max(1000, n // k))] * k, start=cpu_health.start
                )
                cpu_health.stop()

            states = dict(
                Job.objects.filter(task=task).values_list("state").annotate(c=Count("id"))
            )
            assert states == {JobState.FINISHED: n}, states
            assert JobAttempt.objects.filter(job__task=task, state="finished").count() == n
    finally:
        delete_topology([pid for pid, _ in pilots])

    starts = [t for s, _, _ in results for t in s]
    reports = [t for _, r, _ in results for t in r]
    health_lat = [t for h, _ in health for t in h]
    pairs_rate = n / cpu_pairs.wall
    health_rate = len(health_lat) / cpu_health.wall
    report(
        f"pilot API: start + final report of {n} jobs, {k} pilots, {web.describe()}"
        + (f", batches of {args.batch}" if args.batch > 1 else ""),
        [
            (
                "start + report",
                f"{cpu_pairs.wall:.2f} s = {pairs_rate:,.0f} jobs/s"
                f" ({(len(starts) + len(reports)) / cpu_pairs.wall:,.0f} requests/s)"
                "  (target >= 1,000 jobs/s)",
            ),
            ("  start latency" + (" (per call)" if args.batch > 1 else ""), summary(starts)),
            ("  report latency" + (" (per call)" if args.batch > 1 else ""), summary(reports)),
            ("  CPU per job", cpu_pairs.per(n, clients=sum(c for _, _, c in results))),
            (
                "GET /healthz",
                f"{len(health_lat)} in {cpu_health.wall:.2f} s = {health_rate:,.0f} requests/s"
                f"  ({summary(health_lat)})",
            ),
            (
                "  CPU per request",
                cpu_health.per(len(health_lat), clients=sum(c for _, c in health)),
            ),
            (
                "ratio",
                f"a start+report pair costs {health_rate / pairs_rate:.1f} /healthz requests"
                f"; {pairs_rate / 1000:.2f}x the target",
            ),
        ],
    )


if __name__ == "__main__":
    main()
