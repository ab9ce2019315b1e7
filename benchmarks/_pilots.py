"""What the pilot-protocol benchmarks share: queued jobs, registered pilots, the web app under
gunicorn as a child process, HTTP clients in processes of their own, percentiles.

Import after :func:`_common.django_setup` (it uses Django), except :func:`percentiles`,
:func:`summary` and :class:`PilotSession`, which the client processes use.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from _common import ROOT

# --- figures ------------------------------------------------------------------------------------


def percentiles(values: Sequence[float], points: Iterable[int] = (50, 95, 99)) -> dict[int, float]:
    """Nearest-rank percentiles of ``values`` (seconds) in milliseconds."""
    ordered = sorted(values)
    if not ordered:
        return {p: math.nan for p in points}
    out = {}
    for p in points:
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        out[p] = ordered[rank - 1] * 1000
    return out


def summary(values: Sequence[float], points: Iterable[int] = (50, 95, 99)) -> str:
    pct = percentiles(values, points)
    return "  ".join(f"p{p} {v:.1f} ms" for p, v in pct.items())


# --- the bench run's names and settings ---------------------------------------------------------


def bench_prefix() -> str:
    """A random bus prefix of this run (set before django_setup)."""
    prefix = f"wmsbench.{uuid.uuid4().hex[:8]}"
    os.environ["WMS_BUS_PREFIX"] = prefix
    return prefix


def db_url() -> str:
    """The URL of the bench database (the ``test_<name>`` one, once it exists)."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    user = db.get("USER") or "postgres"
    auth = f"{user}:{db['PASSWORD']}@" if db.get("PASSWORD") else f"{user}@"
    return f"postgres://{auth}{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{db['NAME']}"


# --- data ---------------------------------------------------------------------------------------


def make_task(n: int, *, executable: str = "wms-payload-noop", name: str = "bench"):
    """A task of ``n`` jobs (one input file each), split: its jobs are ``defined``."""
    from django.contrib.auth import get_user_model

    from files.services import dataset_add_files, dataset_close, dataset_register
    from tasks.create import task_create
    from tasks.splitter import task_split

    user, _ = get_user_model().objects.get_or_create(username="bench")
    ds = dataset_register(name=f"{name}.input.{uuid.uuid4().hex[:6]}")
    dataset_add_files(
        dataset=ds,
        files=[{"name": f"evt.{i:07d}.root", "size": 1, "url": ""} for i in range(n)],
    )
    dataset_close(dataset=ds, source="bench")
    task = task_create(owner=user, executable=executable, data_in_uid=ds.uid, name=name)
    result = task_split(task_id=task.pk)
    assert result.jobs == n, result
    return task


def queue_jobs(n: int) -> int:
    """Dispatch the defined jobs (the executor, on the run's bus prefix), then empty the job
    queue: the jobs are ``queued`` as the pilots would find them. Returns how many."""
    from django.test import override_settings

    from jobs.executor import dispatch
    from wms import bus

    with override_settings(WMS_QUEUE_MAX_DEPTH=0, WMS_DISPATCH_MAX_PER_RUN=n):
        result = dispatch()
    conn = bus.new_connection()
    try:
        bus.topology().job_queue("cpu")(conn.default_channel).purge()
    finally:
        conn.release()
    return result.total


def queued_messages(task) -> list[tuple[str, int]]:
    """(job uuid, attempt) of the task's queued jobs: what the job messages carry."""
    from jobs.models import Job, JobState

    return [
        (str(u), a)
        for u, a in Job.objects.filter(task=task, state=JobState.QUEUED)
        .order_by("id")
        .values_list("uuid", "cur_retry")
    ]


def make_running(task, pilot_ids: Sequence[int]) -> dict[int, list[tuple[str, int]]]:
    """Bench fixture: the task's queued jobs become ``running``, each with a running attempt of
    one of the pilots (round robin), in bulk (one UPDATE + transition rows + one INSERT per
    pilot) rather than one ``start`` each. Returns pilot id -> [(job uuid, attempt)]."""
    from django.db import transaction
    from django.utils import timezone

    from jobs.models import Job, JobAttempt, JobState
    from wms.statemachine import apply_transition_bulk

    now = timezone.now()
    rows = list(
        Job.objects.filter(task=task, state=JobState.QUEUED)
        .order_by("id")
        .values_list("id", "uuid", "cur_retry")
    )
    out: dict[int, list[tuple[str, int]]] = {}
    with transaction.atomic():
        for i, pid in enumerate(pilot_ids):
            mine = rows[i :: len(pilot_ids)]
            apply_transition_bulk(
                Job,
                [r[0] for r in mine],
                JobState.RUNNING,
                from_state=JobState.QUEUED,
                source=f"pilot:{pid}",
                reason="bench: attempt started",
                updates={"pilot_id": pid, "time_start": now},
            )
            JobAttempt.objects.bulk_create(
                [
                    JobAttempt(job_id=job_id, number=attempt, pilot_id=pid, started_at=now)
                    for job_id, _, attempt in mine
                ],
                batch_size=5000,
            )
            out[pid] = [(str(u), attempt) for _, u, attempt in mine]
    return out


def make_pilots(k: int, *, slots: int = 1) -> list[tuple[int, str]]:
    """``k`` registered pilots (through the service): (pilot id, pilot token)."""
    from pilots.services import pilot_register

    out = []
    for i in range(k):
        pilot, token = pilot_register(
            hostname=f"bench-{i:04d}", site="bench", slots=slots, version="bench"
        )
        out.append((pilot.pk, token))
    return out


def bus_key(pilot_id: int, token: str) -> str:
    """The bus key a pilot got with its token at registration (to sign its bus events)."""
    from pilots.auth import pilot_bus_key
    from pilots.services import hash_token

    return pilot_bus_key(pilot_id=pilot_id, token_hash=hash_token(token))


def delete_topology(pilot_ids: Sequence[int] = ()) -> None:
    """Delete every queue and exchange of the run's prefix (server queues, command queues)."""
    from wms import bus

    conn = bus.new_connection()
    try:
        bus.topology().delete(conn, pilot_ids=list(pilot_ids))
    finally:
        conn.release()


# --- the web app --------------------------------------------------------------------------------


class WebApp:
    """``gunicorn config.wsgi`` on a free port against the bench database, as a child process.

    ``DJANGO_DEBUG=false`` (no query log kept per request), log level WARNING (no structlog
    line per request) and no access log, as a production deployment would run it behind a proxy
    that logs. ``sync`` workers by default, as ``devtools.stack`` runs it: they close the connection
    after each answer, but on this workload ``gthread`` workers (keep-alive) were slower: the
    threads of one process convoy on the GIL between their many short queries.
    """

    def __init__(
        self,
        *,
        workers: int = 2,
        worker_class: str = "sync",
        threads: int = 4,
        log_level: str = "WARNING",
        env: dict[str, str] | None = None,
    ) -> None:
        from devtools.stack import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.worker_class = worker_class
        self.threads = threads
        self.log_level = log_level
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None
        # whitenoise wants STATIC_ROOT to exist (a warning per worker otherwise)
        self._static = tempfile.TemporaryDirectory(prefix="wmsbench-static-")

    def describe(self) -> str:
        threads = f" x {self.threads} threads" if self.worker_class == "gthread" else ""
        return f"gunicorn {self.workers} {self.worker_class} workers{threads}"

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DATABASE_URL=db_url(),
            DJANGO_DEBUG="false",
            DJANGO_SECRET_KEY="bench-" + uuid.uuid4().hex,
            DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost",
            DJANGO_SECURE_SSL_REDIRECT="false",  # plain HTTP on the loopback, no TLS proxy
            WMS_LOG_LEVEL=self.log_level,
            WMS_SERVER_URL=self.url,
            DJANGO_STATIC_ROOT=self._static.name,
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    def argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "gunicorn",
            "config.wsgi:application",
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            str(self.workers),
            "--worker-class",
            self.worker_class,
            "--keep-alive",
            "30",
            "--backlog",
            "2048",
            "--log-level",
            "warning",
        ]
        if self.worker_class == "gthread":
            argv += ["--threads", str(self.threads)]
        return argv

    def __enter__(self) -> WebApp:
        self.proc = subprocess.Popen(  # its output goes to ours (warnings and errors only)
            self.argv(),
            cwd=ROOT,
            env=self.child_env(),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            self._wait_healthy(timeout=60)
        except BaseException:
            self.__exit__()  # no server left behind
            raise
        return self

    def _wait_healthy(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with code {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as resp:  # noqa: S310
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not answer /healthz in {timeout:g} s")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=5)
        finally:
            self._static.cleanup()


# --- where the CPU goes -------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds (user + system) between :meth:`start` and :meth:`stop` of: process trees
    given by their root pids (``groups``: name -> pids, sampled at both ends; a tree's reaped
    children count through their parent), PostgreSQL (the server processes of the bench
    database's connections) and, with ``broker``, RabbitMQ (``beam.smp``: other users of the
    broker count too). The servers' processes are sampled every half second as well, so that a
    connection closed meanwhile (``CONN_MAX_AGE``) still counts. Clients (or the measuring
    process itself) report their own CPU with :meth:`per`'s extras."""

    def __init__(
        self,
        web_pid: int | None = None,
        *,
        groups: dict[str, Sequence[int]] | None = None,
        broker: bool = False,
    ) -> None:
        self.groups: dict[str, list[int]] = {k: list(v) for k, v in (groups or {}).items()}
        if web_pid is not None:
            self.groups["web"] = [web_pid]
        self.servers = {"postgres": "postgres"}
        if broker:
            self.servers["beam.smp"] = "rabbitmq"
        from django.conf import settings

        self._db = f" {settings.DATABASES['default']['NAME']} "  # in a backend's title
        self.cpu: dict[str, float] = {}
        self.wall = 0.0
        self._t0 = 0.0
        self.started = 0.0
        self._trees: dict[str, dict[int, float]] = {}
        self._first: dict[str, dict[int, float]] = {}  # server pid -> CPU when first seen
        self._last: dict[str, dict[int, float]] = {}  # server pid -> CPU when last seen
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _times(p, *, children: bool) -> float:
        t = p.cpu_times()
        own = t.user + t.system
        return own + t.children_user + t.children_system if children else own

    def _sample_trees(self) -> dict[str, dict[int, float]]:
        import psutil

        out: dict[str, dict[int, float]] = {}
        for name, roots in self.groups.items():
            got = out[name] = {}
            for root in roots:
                with contextlib.suppress(psutil.Error):
                    top = psutil.Process(root)
                    for p in [top, *top.children(recursive=True)]:
                        with contextlib.suppress(psutil.Error):
                            got[p.pid] = self._times(p, children=True)
        return out

    def _sample_servers(self, *, initial: bool = False) -> None:
        import psutil

        for p in psutil.process_iter(["name", "cmdline"]):
            name = self.servers.get(p.info["name"])
            if name is None:
                continue
            if name == "postgres" and self._db not in " ".join(p.info["cmdline"] or ()):
                continue  # another database's connection, or a server process
            with contextlib.suppress(psutil.Error):
                t = self._times(p, children=False)
                # a process first seen after the start counts from zero
                self._first[name].setdefault(p.pid, t if initial else 0.0)
                self._last[name][p.pid] = t

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            self._sample_servers()

    def start(self) -> None:
        self._first = {name: {} for name in self.servers.values()}
        self._last = {name: {} for name in self.servers.values()}
        self._trees = self._sample_trees()
        self._sample_servers(initial=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="cpu-meter", daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        self.started = time.time()  # the same instant, for figures taken in other processes

    def stop(self) -> None:
        self.wall = time.perf_counter() - self._t0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample_servers()
        after = self._sample_trees()
        self.cpu = {
            # alive at the end (no negative figure for a process that exited meanwhile)
            name: sum(t - self._trees.get(name, {}).get(pid, 0.0) for pid, t in pids.items())
            for name, pids in after.items()
        }
        for name, last in self._last.items():
            self.cpu[name] = sum(t - self._first[name][pid] for pid, t in last.items())

    @property
    def web(self) -> float:
        return self.cpu.get("web", 0.0)

    @property
    def postgres(self) -> float:
        return self.cpu.get("postgres", 0.0)

    def per(self, n: float, **extra: float) -> str:
        """CPU milliseconds per unit of work by component (``extra``: other components'
        seconds, e.g. the clients'), and how busy the machine's cores were with all of it."""
        parts = {**self.cpu, **extra}
        total = sum(parts.values())
        cores = os.cpu_count() or 1
        figures = ", ".join(f"{name} {v / n * 1000:.2f}" for name, v in parts.items())
        return f"{figures} ms; {total / self.wall / cores:.0%} of {cores} cores busy"


# --- clients ------------------------------------------------------------------------------------


class PilotSession:
    """A pilot's HTTP client: one ``requests.Session`` (its connection kept alive when the
    server keeps it), the pilot's own token."""

    def __init__(self, base_url: str, pilot_id: int, token: str) -> None:
        import requests

        self.base = base_url.rstrip("/") + "/api/v1"
        self.pilot_id = pilot_id
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Pilot {token}"

    def post(self, path: str, payload: dict[str, Any]) -> tuple[float, Any]:
        """POST, raise on anything but 200; returns (seconds, decoded body)."""
        t0 = time.perf_counter()
        # as the agent calls: every call with its own idempotency key
        key = {"Idempotency-Key": str(uuid.uuid4())}
        resp = self.session.post(self.base + path, json=payload, headers=key, timeout=60)
        elapsed = time.perf_counter() - t0
        if resp.status_code != 200:
            raise RuntimeError(f"POST {path}: HTTP {resp.status_code} {resp.text[:300]}")
        return elapsed, resp.json()

    def close(self) -> None:
        self.session.close()


def run_processes(target: Callable[..., Any], args: Sequence[tuple], *, start=None) -> list[Any]:
    """Run ``target(*a)`` for each ``a`` in a process of its own (fork), all released at once
    by a barrier; returns their results in order. ``start`` is called once every process is
    ready (the caller's clock starts there)."""
    from django.db import connections

    connections.close_all()  # no database connection is shared with a child
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(len(args) + 1)
    queue = ctx.Queue()

    def child(i: int, a: tuple) -> None:
        try:
            result = target(barrier, *a)
            queue.put((i, result, None))
        except BaseException as exc:  # the parent must hear of it, not hang on the queue
            barrier.abort()  # nobody waits for a process that will not come
            queue.put((i, None, f"{type(exc).__name__}: {exc}"))

    procs = [ctx.Process(target=child, args=(i, a), daemon=True) for i, a in enumerate(args)]
    for p in procs:
        p.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass  # a child failed getting ready: its error comes through the queue
    else:
        if start is not None:
            start()
    results: list[Any] = [None] * len(args)
    errors = []
    for _ in procs:
        i, result, error = queue.get()
        results[i] = result
        if error:
            errors.append(error)
    for p in procs:
        p.join()
    if errors:
        raise RuntimeError("client failed: " + "; ".join(errors))
    return results
