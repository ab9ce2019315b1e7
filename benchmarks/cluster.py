"""A task through the WMS on a three-node RabbitMQ cluster with quorum queues, while one node
is killed: every job must finish, none may run twice.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/wms_cluster \\
    .venv/bin/python benchmarks/cluster.py [--jobs 200] [--quick]

What it does (docs/deployment.md describes the deployment it imitates):

1. starts three ``rabbitmq-server`` processes on this machine (``wms1..3@localhost``, AMQP on
   127.0.0.1:5681-5683, their files in a temporary folder, no plugin) and joins them into one
   cluster (benchmarks/_rabbit.py). The machine's own node (5672) is not touched;
2. makes a fresh database ``test_<name of DATABASE_URL's database>`` on that Postgres (dropped
   at the end);
3. runs the WMS against the cluster with ``WMS_QUEUE_TYPE=quorum`` and the three nodes as a
   failover list in ``CELERY_BROKER_URL``: 2 web processes (gunicorn), 2 Celery workers, 2 beat
   processes and 4 CPU pilots of 2 slots (pilots 1, 3 report to the first web process, 2, 4 to
   the second), and prints the type and leader of every queue;
4. submits a task of N jobs whose payload records its run (job, attempt, start and end times,
   appended to one file) and sleeps ``--sleep`` seconds;
5. when a tenth of the jobs have ended, kills (SIGKILL to its Erlang VM) the node that leads
   the job queue ``<prefix>.jobs.cpu``;
6. waits until every job has ended and prints: jobs, finished, lost (jobs not finished), run
   twice (jobs with more than one attempt, or whose payload ran more than once), the node
   killed and the time taken.

Exit code 0 only when nothing was lost and nothing ran twice. Everything it started is
stopped at the end, on failure and on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from _common import ROOT, bench_database, django_setup, report
from _rabbit import Cluster

# the payload: records its run (job, attempt, start and end) once it has slept
PAYLOAD = """\
import json, os, sys, time

log, seconds = sys.argv[1], float(sys.argv[2])
run = {"job": os.environ["WMS_JOB_UUID"], "attempt": int(os.environ["WMS_ATTEMPT"]),
       "pid": os.getpid(), "start": time.time()}
time.sleep(seconds)
run["end"] = time.time()
fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, (json.dumps(run) + "\\n").encode())
os.close(fd)
"""


def say(line: str) -> None:
    print(f"[cluster] {line}", flush=True)


def wait_until(cond, *, timeout: float, what: str, poll: float = 0.5, also=None):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if also is not None:
            also()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


def _interrupt(signum, _frame):  # SIGTERM: unwind like Ctrl-C, so that finally-blocks stop all
    raise KeyboardInterrupt(f"signal {signum}")


def show_queues(queues: dict[str, dict[str, str]], prefix: str, title: str) -> None:
    """The WMS's queues and Celery's own (the 28 ``celery_delayed_*`` of Celery's native
    delayed delivery, which the WMS does not use, are counted, not listed)."""
    delayed = [n for n in queues if n.startswith("celery_delayed_")]
    say(title)
    for name in sorted(n for n in queues if n not in delayed):
        if not (name.startswith(prefix) or ".pidbox" in name or name.startswith("celery")):
            continue
        q = queues[name]
        say(f"  {name:<44} {q['type']:<8} leader {q['leader'] or '-':<16} messages {q['messages']}")
    types = Counter(queues[n]["type"] for n in delayed)
    say(f"  celery_delayed_0..27 (Celery's delayed delivery, unused): {dict(types)}")


def run(args: argparse.Namespace, work: Path, cluster: Cluster) -> dict:
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db.models import Count

    from devtools.stack import Stack, StackConfig
    from files.services import dataset_add_files, dataset_close, dataset_register
    from jobs.models import Job, JobAttempt, JobState
    from pilots.models import Pilot, PilotState
    from pilots.services import pilot_registrar_ensure
    from tasks.create import task_create
    from wms.models import Switch

    prefix = settings.WMS_BUS_PREFIX
    control = settings.CELERY_TASK_DEFAULT_QUEUE
    final = (JobState.FINISHED, JobState.FAILED, JobState.CANCELLED)
    static = work / "static"
    static.mkdir()
    pilots = args.pilots
    config = StackConfig(
        var_dir=work / "var",
        broker_url=settings.CELERY_BROKER_URL,
        register_token=pilot_registrar_ensure(),
        control_queue=control,
        web="gunicorn",
        web_processes=2,
        workers=2,
        beats=2,
        devices=("cpu",),
        pilots_per_device=pilots,
        pilot_slots=args.slots,
        pilot_args=("--bus-prefix", prefix, "--log-level", "WARNING", "--heartbeat-interval", "5"),
        storage_roots=(work.resolve().as_uri(),),
        python=sys.executable,
        cwd=ROOT,
        stop_timeout=30,
    )
    env = {
        "DATABASE_URL": os.environ["DATABASE_URL_BENCH"],
        "WMS_BUS_PREFIX": prefix,
        "WMS_QUEUE_TYPE": "quorum",
        "WMS_CONTROL_QUEUE": control,
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": "cluster-" + uuid.uuid4().hex,
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "DJANGO_SECURE_SSL_REDIRECT": "false",  # plain HTTP on the loopback, no TLS proxy
        "DJANGO_STATIC_ROOT": str(static),
        "WMS_LOG_LEVEL": "WARNING",
        "WMS_STORAGE_ROOTS": work.resolve().as_uri(),
        "WMS_OUTPUT_ROOT": (work / "outputs").resolve().as_uri(),
        "WMS_HEARTBEAT_INTERVAL": "5",
        "WMS_SPLIT_EVERY": "2",
        "WMS_DISPATCH_EVERY": "1",
        "WMS_RECONCILE_EVERY": "10",
        # a message lost in the crash would come back after this long (none should be)
        "WMS_QUEUED_REPUBLISH_AFTER": str(args.republish_after),
        # few messages queued per device: rank decides what goes next (docs/deployment.md)
        "WMS_QUEUE_MAX_DEPTH": str(max(8, pilots * args.slots * 2)),
    }
    settings.WMS_STORAGE_ROOTS = [env["WMS_STORAGE_ROOTS"]]
    settings.WMS_OUTPUT_ROOT = env["WMS_OUTPUT_ROOT"]
    runs_log = work / "runs.jsonl"
    payload = work / "payload.py"
    payload.write_text(PAYLOAD)
    log = open(work / "stack.log", "w")  # noqa: SIM115 - closed below
    stack = Stack(config, env=env, out=log)
    result: dict = {}
    try:
        say("starting 2 web processes, 2 workers, 2 beats")
        stack.start(pilots=False, healthy_timeout=120)
        stack.start_pilots()
        say(f"starting {pilots} pilots x {args.slots} slots")
        wait_until(
            lambda: Pilot.objects.filter(state=PilotState.IDLE).count() == pilots,
            timeout=120,
            what=f"{pilots} idle pilots",
            also=stack.check_alive,
        )
        wait_until(
            lambda: (
                Switch.objects.filter(
                    pk__in=("splitter", "executor"), last_run_at__isnull=False
                ).count()
                == 2
            ),
            timeout=120,
            what="the beats' first cycles",
            also=stack.check_alive,
        )
        owner, _ = get_user_model().objects.get_or_create(username="bench")
        ds = dataset_register(name="cluster.input")
        inputs = work / "inputs"
        inputs.mkdir()
        files = []
        for i in range(args.jobs):
            path = inputs / f"evt.{i:07d}.root"
            path.write_bytes(b"x")
            files.append({"name": path.name, "size": 1, "url": path.as_uri()})
        dataset_add_files(dataset=ds, files=files)
        dataset_close(dataset=ds, source="bench")
        t0 = time.time()
        task = task_create(
            owner=owner,
            name="cluster",
            executable=sys.executable,
            args=f"{payload} {runs_log} {args.sleep}",
            data_in_uid=ds.uid,
        )
        say(f"task {task.pk}: {args.jobs} jobs of {args.sleep:g} s")
        jobs = Job.objects.filter(task=task)
        wait_until(
            lambda: jobs.filter(state__in=final).count() >= max(1, args.jobs // 10),
            timeout=args.timeout,
            what="a tenth of the jobs to end",
            poll=0.2,
            also=stack.check_alive,
        )
        job_queue = f"{prefix}.jobs.cpu"
        before = cluster.queues()
        leader = before.get(job_queue, {}).get("leader", "")
        victim = cluster.node(leader) if args.kill == "leader" else cluster.node(args.kill)
        in_flight = dict(jobs.values_list("state").annotate(c=Count("id")))
        pid = cluster.kill(victim)
        killed_at = time.time()
        say(
            f"killed {victim.name} (pid {pid}, SIGKILL), leader of {job_queue}: {leader};"
            f" jobs just before: {in_flight}"
        )
        show_queues(before, prefix, "queues just before the kill (name, type, leader, messages):")
        wait_until(
            lambda: jobs.count() == args.jobs and jobs.filter(state__in=final).count() == args.jobs,
            timeout=args.timeout,
            what=f"{args.jobs} jobs to end",
            poll=1.0,
            also=stack.check_alive,
        )
        seconds = time.time() - t0
        after = cluster.queues()
        left_at_end = int(after.get(job_queue, {}).get("messages") or 0)
        # duplicates (a batch whose confirms the crash cut short is published again) that are
        # still queued: the pilots take them and drop them (their start is refused)
        settle = time.monotonic()
        with contextlib.suppress(RuntimeError):
            wait_until(
                lambda: cluster.queues().get(job_queue, {}).get("messages") == "0",
                timeout=120,
                what="the job queue to empty",
                poll=1.0,
            )
        after = cluster.queues()
        left = int(after.get(job_queue, {}).get("messages") or 0)
        settled = time.monotonic() - settle
        show_queues(after, prefix, "queues at the end:")
        states = dict(jobs.values_list("state").annotate(c=Count("id")))
        attempts = Counter(
            JobAttempt.objects.filter(job__task=task).values_list("job_id", flat=True)
        )
        runs: Counter[str] = Counter()
        overlapping = 0
        spans: dict[str, list[tuple[float, float]]] = {}
        for line in runs_log.read_text().splitlines() if runs_log.exists() else []:
            r = json.loads(line)
            runs[r["job"]] += 1
            spans.setdefault(r["job"], []).append((r["start"], r["end"]))
        for intervals in spans.values():
            intervals.sort()
            overlapping += any(b[0] < a[1] for a, b in itertools.pairwise(intervals))
        uuids = dict(jobs.values_list("id", "uuid"))
        twice_attempts = {j for j, c in attempts.items() if c > 1}
        twice_runs = {j for j, u in uuids.items() if runs[str(u)] > 1}
        errors = dict(
            JobAttempt.objects.filter(job__task=task)
            .exclude(error_code="")
            .values_list("error_code")
            .annotate(c=Count("id"))
        )
        result = {
            "jobs": args.jobs,
            "finished": states.get(JobState.FINISHED, 0),
            "states": states,
            "attempts": sum(attempts.values()),
            "payload_runs": sum(runs.values()),
            "twice": twice_attempts | twice_runs,
            "twice_attempts": len(twice_attempts),
            "twice_runs": len(twice_runs),
            "overlapping": overlapping,
            "errors": errors,
            "killed": f"{victim.name} (leader of {job_queue}: {leader == victim.name})",
            "killed_after": killed_at - t0,
            "new_leader": after.get(job_queue, {}).get("leader", "?"),
            "seconds": seconds,
            "left": (left_at_end, left, settled),
            "queue_types": Counter(q["type"] for n, q in after.items() if n.startswith(prefix)),
            "other_types": Counter(q["type"] for n, q in after.items() if not n.startswith(prefix)),
        }
    except BaseException:
        print(f"the stack's output: {log.name}", file=sys.stderr)
        raise
    finally:
        stack.stop()
        log.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.epilog = __doc__.split("\n\n", 2)[2]
    parser.add_argument("--jobs", type=int, default=200, help="jobs of the task (200)")
    parser.add_argument("--quick", action="store_true", help="40 jobs of 1 s (a smoke test)")
    parser.add_argument("--sleep", type=float, default=None, help="seconds per payload (2)")
    parser.add_argument("--pilots", type=int, default=4, help="CPU pilots (4)")
    parser.add_argument("--slots", type=int, default=2, help="slots per pilot (2)")
    parser.add_argument(
        "--kill", default="leader", help="the node to kill: leader (of the job queue) or a name"
    )
    parser.add_argument(
        "--ports", default="5681,5682,5683", help="the nodes' AMQP ports (5681,5682,5683)"
    )
    parser.add_argument("--prefix", default="", help="bus prefix (a fresh one)")
    parser.add_argument(
        "--republish-after",
        type=int,
        default=60,
        help="WMS_QUEUED_REPUBLISH_AFTER of the stack, seconds (60)",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per wait (900)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args()
    if args.quick:
        args.jobs = 40 if args.jobs == 200 else args.jobs
        args.sleep = 1.0 if args.sleep is None else args.sleep
    args.sleep = 2.0 if args.sleep is None else args.sleep
    if args.kill != "leader" and "@" not in args.kill:
        args.kill = f"{args.kill}@localhost"
    if not os.environ.get("DATABASE_URL", "").startswith("postgres"):
        sys.exit("set DATABASE_URL=postgres://... (a fresh test_<name> database is made there)")
    signal.signal(signal.SIGTERM, _interrupt)

    work = Path(tempfile.mkdtemp(prefix="wmsbench-cluster-"))
    ports = tuple(int(p) for p in args.ports.split(","))
    cluster = Cluster(work / "rabbitmq", ports=ports)
    prefix = args.prefix or f"wmsclu-{uuid.uuid4().hex[:6]}"
    ok = False
    t_start = time.time()
    try:
        say(f"starting a 3-node RabbitMQ cluster in {cluster.work}")
        cluster.start(say=say)
        if args.kill != "leader":
            cluster.node(args.kill)  # a name the cluster knows
        os.environ["CELERY_BROKER_URL"] = cluster.urls()
        os.environ["WMS_QUEUE_TYPE"] = "quorum"
        os.environ["WMS_BUS_PREFIX"] = prefix
        os.environ["WMS_CONTROL_QUEUE"] = f"{prefix}.control"
        django_setup()
        from django.conf import settings

        with bench_database():
            db = settings.DATABASES["default"]
            user = db.get("USER") or "postgres"
            auth = f"{user}:{db['PASSWORD']}@" if db.get("PASSWORD") else f"{user}@"
            os.environ["DATABASE_URL_BENCH"] = (
                f"postgres://{auth}{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/"
                f"{db['NAME']}"
            )
            say(f"database {db['NAME']}, bus prefix {prefix}, broker {cluster.urls()}")
            r = run(args, work, cluster)
        lost = r["jobs"] - r["finished"]
        twice = len(r["twice"])
        report(
            f"RabbitMQ cluster failover: {args.jobs} jobs of {args.sleep:g} s,"
            f" {args.pilots} pilots x {args.slots} slots, 2 web + 2 workers + 2 beats,"
            " quorum queues",
            [
                ("jobs", str(r["jobs"])),
                ("finished", f"{r['finished']}  (states {r['states']})"),
                ("lost", str(lost)),
                (
                    "run twice",
                    f"{twice}  (jobs with more than one attempt: {r['twice_attempts']};"
                    f" whose payload ran more than once: {r['twice_runs']};"
                    f" with overlapping runs: {r['overlapping']})",
                ),
                ("attempts / payload runs", f"{r['attempts']} / {r['payload_runs']}"),
                ("failed attempts", str(r["errors"] or "none")),
                ("node killed", f"{r['killed']}, {r['killed_after']:.1f} s after the submission"),
                ("new leader of the job queue", r["new_leader"]),
                (
                    "left in the job queue",
                    f"{r['left'][0]} when the last job ended (duplicates of published jobs),"
                    f" {r['left'][1]} {r['left'][2]:.0f} s later",
                ),
                ("the WMS's queues", f"{dict(r['queue_types'])} (at the end)"),
                (
                    "Celery's own queues",
                    f"{dict(r['other_types'])} (pidbox, gossip: per process, transient)",
                ),
                ("time taken", f"{r['seconds']:.1f} s from the submission until every job ended"),
            ],
        )
        ok = lost == 0 and twice == 0
        return 0 if ok else 1
    except KeyboardInterrupt:
        say("interrupted: stopping everything")
        return 130
    finally:
        say("stopping the RabbitMQ cluster")
        cluster.stop()
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"logs kept in {work}")
        say(f"done in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
