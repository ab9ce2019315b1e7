"""End to end: N no-op jobs through 4 pilot slots on the real stack, against a plain Celery
worker of the same concurrency running the same no-op subprocess, in the same run.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/wms \
    CELERY_BROKER_URL=amqp://guest:guest@127.0.0.1:5672// \
    .venv/bin/python benchmarks/e2e.py [N] [--pilots 2] [--slots 2] [--payload true]

**WMS**: the whole stack as child processes (``devtools.stack``): the web app under gunicorn (2
workers), a Celery worker with beat (splitter, executor, events consumer), and P pilot agents
with S slots each, on the run's own bus prefix and the bench database. Once every pilot is
idle, a task of N jobs (one input file each, executable ``wms-payload-noop``) is created over a
closed dataset: timed from the task's creation to the end of its last job (``max(time_end)``),
through split, dispatch, the pilots' ``start``, the payload, stage-out of its log, the final
``report`` and the DSM registration of the log.

**Plain Celery**: ``celery_noop.py``, a worker with ``--concurrency P x S`` (prefork), on a
queue of its own: N tasks each running ``subprocess.run(["wms-payload-noop"])``, timed from
the first enqueue to the last task's end (an ``O_APPEND`` counter file; no result backend).

``--payload`` names the executable both sides run (default ``wms-payload-noop``, a Python
no-op; ``true`` makes the figure the bare cost of each system). The report adds the WMS's CPU
per job on the server (web + worker + PostgreSQL) and in the pilots (with the payload's).

Targets (issue 15): with ``--payload true`` >= 0.5x plain Celery, <= 3 ms of server CPU and
<= 2 ms of pilot CPU per job; with the no-op >= 0.9x.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _common import ROOT, bench_database, django_setup, report
from _pilots import CpuMeter, bench_prefix, db_url

HERE = Path(__file__).resolve().parent


def venv_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


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


# --- plain Celery -------------------------------------------------------------------------------


def run_celery(
    n: int, concurrency: int, work: Path, prefix: str, timeout: float, payload: str
) -> dict:
    queue = f"{prefix}.noop"
    counter = work / "celery-counter"
    os.environ["BENCH_QUEUE"] = queue  # celery_noop reads it at import
    import celery_noop
    from kombu import Exchange, Queue

    env = venv_env(
        BENCH_QUEUE=queue, BENCH_COUNTER=str(counter), BENCH_PAYLOAD=payload, PYTHONUNBUFFERED="1"
    )
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "celery_noop",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        str(concurrency),
        "-Q",
        queue,
        "--loglevel",
        "WARNING",
        "--without-heartbeat",
        "--without-mingle",
        "--without-gossip",
        "--hostname",
        f"wmsbench-noop-{uuid.uuid4().hex[:6]}@%h",
    ]
    log = open(work / "celery.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        argv, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )

    def alive() -> None:
        if proc.poll() is not None:
            log.flush()
            tail = Path(log.name).read_text().splitlines()[-15:]
            raise RuntimeError(f"the Celery worker exited ({proc.returncode}):\n" + "\n".join(tail))

    try:
        # warm-up: every pool process has run one task before the clock starts
        for _ in range(concurrency):
            celery_noop.noop.apply_async()
        wait_until(
            lambda: celery_noop.done(str(counter))[0] >= concurrency,
            timeout=60,
            what="the Celery worker's warm-up",
            also=alive,
        )
        counter.unlink()
        cpu = CpuMeter(groups={"celery worker": [proc.pid]}, broker=True)
        cpu.start()
        t0 = time.time()
        with celery_noop.app.producer_or_acquire() as producer:
            for _ in range(n):
                celery_noop.noop.apply_async(producer=producer)
        enqueued = time.time() - t0
        wait_until(
            lambda: counter.exists() and counter.stat().st_size >= n * celery_noop.LINE,
            timeout=timeout,
            what=f"{n} Celery tasks",
            also=alive,
        )
        cpu.stop()
        done, last = celery_noop.done(str(counter))
        assert done == n, done
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        log.close()
        with celery_noop.app.connection_for_write() as conn, contextlib.suppress(Exception):
            channel = conn.default_channel
            Queue(queue, Exchange(queue))(channel).delete()
            Exchange(queue)(channel).delete()
    return {"seconds": last - t0, "enqueue": enqueued, "cpu": cpu}


# --- the WMS ------------------------------------------------------------------------------------


def run_wms(
    n: int, pilots: int, slots: int, work: Path, prefix: str, timeout: float, payload: str
) -> dict:
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db.models import Count, Max, Min

    from devtools.stack import Stack, StackConfig
    from files.services import dataset_add_files, dataset_close, dataset_register
    from jobs.models import Job, JobAttempt, JobState, JobTransition
    from pilots.models import Pilot, PilotState
    from pilots.services import pilot_registrar_ensure
    from tasks.create import task_create
    from wms.models import Switch

    final = (JobState.FINISHED, JobState.FAILED, JobState.CANCELLED)
    control = f"{prefix}.control"
    static = work / "static"
    static.mkdir()
    config = StackConfig(
        var_dir=work / "var",
        broker_url=settings.CELERY_BROKER_URL,
        register_token=pilot_registrar_ensure(),
        control_queue=control,
        web="gunicorn",
        devices=("cpu",),
        pilots_per_device=pilots,
        pilot_slots=slots,
        pilot_args=("--bus-prefix", prefix, "--log-level", "WARNING"),
        storage_roots=(work.resolve().as_uri(),),  # the inputs are written under work/
        python=sys.executable,
        cwd=ROOT,
        stop_timeout=30,
    )
    env = {
        "DATABASE_URL": db_url(),
        "WMS_BUS_PREFIX": prefix,
        "WMS_CONTROL_QUEUE": control,
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": "bench-" + uuid.uuid4().hex,
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "DJANGO_SECURE_SSL_REDIRECT": "false",  # plain HTTP on the loopback, no TLS proxy
        "DJANGO_STATIC_ROOT": str(static),
        "WMS_LOG_LEVEL": "WARNING",
        "WMS_STORAGE_ROOTS": work.resolve().as_uri(),
        "WMS_OUTPUT_ROOT": (work / "outputs").resolve().as_uri(),
    }
    # this process registers the inputs and creates the task: the same roots as the stack's
    settings.WMS_STORAGE_ROOTS = [env["WMS_STORAGE_ROOTS"]]
    settings.WMS_OUTPUT_ROOT = env["WMS_OUTPUT_ROOT"]
    log = open(work / "stack.log", "w")  # noqa: SIM115 - closed below
    stack = Stack(config, env=env, out=log)
    pilot_ids: list[int] = []
    try:
        stack.start(healthy_timeout=90)
        wait_until(
            lambda: Pilot.objects.filter(state=PilotState.IDLE).count() == pilots,
            timeout=90,
            what=f"{pilots} idle pilots",
            also=stack.check_alive,
        )
        # the worker runs: its beat has claimed a cycle of the splitter and of the executor
        wait_until(
            lambda: (
                Switch.objects.filter(
                    pk__in=("splitter", "executor"), last_run_at__isnull=False
                ).count()
                == 2
            ),
            timeout=90,
            what="the worker's first beat cycles",
            also=stack.check_alive,
        )
        pilot_ids = list(Pilot.objects.values_list("id", flat=True))
        owner, _ = get_user_model().objects.get_or_create(username="bench")
        ds = dataset_register(name="e2e.input")
        inputs = work / "inputs"  # the pilots check that each input is a readable file
        inputs.mkdir()
        files = []
        for i in range(n):
            path = inputs / f"evt.{i:07d}.root"
            path.write_bytes(b"x")
            files.append({"name": path.name, "size": 1, "url": path.as_uri()})
        dataset_add_files(dataset=ds, files=files)
        dataset_close(dataset=ds, source="bench")
        groups = {
            "web": [c.proc.pid for c in stack.children if c.name == "web"],
            "worker": [c.proc.pid for c in stack.children if c.name == "worker"],
            "pilots": [c.proc.pid for c in stack.children if c.name.startswith("pilot")],
        }
        cpu = CpuMeter(groups=groups, broker=True)
        cpu.start()
        task = task_create(
            owner=owner,
            name="e2e",
            executable=payload,
            data_in_uid=ds.uid,  # the outputs go to its place in <work>/outputs/bench/
        )
        jobs = Job.objects.filter(task=task)
        wait_until(
            lambda: jobs.count() == n and jobs.filter(state__in=final).count() == n,
            timeout=timeout,
            what=f"{n} jobs to end",
            poll=1.0,
            also=stack.check_alive,
        )
        cpu.stop()
        states = dict(jobs.values_list("state").annotate(c=Count("id")))
        times = jobs.aggregate(
            split=Max("created_at"), first_start=Min("time_start"), last_end=Max("time_end")
        )
        times["queued"] = JobTransition.objects.filter(
            subject__task=task, to_state=JobState.QUEUED
        ).aggregate(first=Min("at"), last=Max("at"))
        attempts = JobAttempt.objects.filter(job__task=task).count()
        errors = dict(
            JobAttempt.objects.filter(job__task=task)
            .exclude(error_code="")
            .values_list("error_code")
            .annotate(c=Count("id"))
        )
        if errors:
            example = JobAttempt.objects.filter(job__task=task).exclude(error_code="").first()
            assert example is not None  # errors counted at least one such attempt
            print(f"failed attempts: {errors}; e.g. {example.error_message[:500]}", file=sys.stderr)
    except Exception:
        print(f"the stack's output: {log.name}", file=sys.stderr)
        raise
    finally:
        stack.stop()
        log.close()
        _delete_names(control, pilot_ids)
    created = task.created_at

    def since(t) -> float:
        return (t - created).total_seconds()

    return {
        "seconds": since(times["last_end"]),
        "running": (times["last_end"] - times["first_start"]).total_seconds(),
        "phases": (
            f"split done {since(times['split']):.1f} s, first queued"
            f" {since(times['queued']['first']):.1f} s, first started"
            f" {since(times['first_start']):.1f} s, last queued"
            f" {since(times['queued']['last']):.1f} s, last ended {since(times['last_end']):.1f} s"
        ),
        "states": states,
        "attempts": attempts,
        "cpu": cpu,
    }


def _delete_names(control: str, pilot_ids: list[int]) -> None:
    """What the stack declared under the run's names: the topology (server queues, pilots'
    command queues), the Celery control queue and its exchange."""
    from kombu import Exchange, Queue

    from wms import bus

    conn = bus.new_connection()
    try:
        bus.topology().delete(conn, pilot_ids=pilot_ids)
        channel = conn.default_channel
        with contextlib.suppress(Exception):
            Queue(control, durable=True)(channel).delete()
        with contextlib.suppress(Exception):
            Exchange(control, type="direct")(channel).delete()
    finally:
        conn.release()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", nargs="?", type=int, default=10_000, help="jobs and tasks (10^4)")
    parser.add_argument("--pilots", type=int, default=2, help="pilot agents (2)")
    parser.add_argument("--slots", type=int, default=2, help="slots per pilot (2)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per half")
    parser.add_argument(
        "--payload",
        default="wms-payload-noop",
        help="the executable of every job and Celery task (wms-payload-noop; true: the bare cost)",
    )
    args = parser.parse_args()
    n, slots = args.n, args.pilots * args.slots
    timeout = args.timeout or max(300.0, n * 0.5)

    prefix = bench_prefix()
    django_setup()
    from django.conf import settings

    if not settings.CELERY_BROKER_URL.startswith("amqp"):
        raise SystemExit("set CELERY_BROKER_URL=amqp://... (RabbitMQ)")
    with tempfile.TemporaryDirectory(prefix="wmsbench-e2e-") as tmp, bench_database():
        work = Path(tmp)
        celery = run_celery(n, slots, work, prefix, timeout, args.payload)
        wms = run_wms(n, args.pilots, args.slots, work, prefix, timeout, args.payload)

    wms_rate = n / wms["seconds"]
    celery_rate = n / celery["seconds"]
    finished = wms["states"].get("finished", 0)
    cpu = wms["cpu"].cpu
    server = sum(cpu.get(k, 0.0) for k in ("web", "worker", "postgres")) / n * 1000
    pilots = cpu.get("pilots", 0.0) / n * 1000
    report(
        f"end to end: {n} jobs of {args.payload}, {args.pilots} pilots x {args.slots} slots"
        f" (web gunicorn 2 workers, worker + beat) vs plain Celery --concurrency {slots}",
        [
            (
                "WMS",
                f"{wms['seconds']:.1f} s = {wms_rate:,.1f} jobs/s from task creation to the"
                f" last job's end ({finished}/{n} finished, {wms['attempts']} attempts)",
            ),
            ("  after the task's creation", wms["phases"]),
            (
                "  first start to last end",
                f"{wms['running']:.1f} s = {n / max(wms['running'], 1e-9):,.1f} jobs/s (the pilots'"
                " pace, without the wait for the first split and dispatch)",
            ),
            ("  CPU per job", wms["cpu"].per(n)),
            (
                "  of which",
                f"server (web + worker + postgres) {server:.2f} ms (target <= 3),"
                f" pilots {pilots:.2f} ms with the payload (target <= 2 besides it)",
            ),
            (
                "plain Celery",
                f"{celery['seconds']:.1f} s = {celery_rate:,.1f} tasks/s from the first enqueue"
                f" to the last task's end (enqueue {celery['enqueue']:.1f} s)",
            ),
            ("  CPU per task", celery["cpu"].per(n)),
            (
                "ratio WMS/Celery",
                f"{wms_rate / celery_rate:.2f}x  (target >= "
                f"{'0.5' if args.payload == 'true' else '0.9'}x)",
            ),
        ],
    )
    if finished != n:
        raise SystemExit(f"not every job finished: {wms['states']}")


if __name__ == "__main__":
    main()
