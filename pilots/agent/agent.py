"""The pilot's main loop.

Start-up: re-send what a previous run left in the spool, register (user token), declare the
topology on its own broker connection, start the heartbeat, command and spool threads.

Then, while running: when a slot is free, ``basic_get`` one job message (empty queue: a short
growing backoff); decode it (a malformed one is acked and dropped); ``POST start``; only then
ack: 200 → ack and run it in a thread of its own; 409 (and other 4xx) → ack and drop; 5xx or no
answer → the same start again with the same idempotency key (``start_retries`` times, backoff
with jitter: the server answers a start it already made with the same job message), then reject
with requeue and back off. So at most ``slots`` jobs run, and no message stays unacked longer
than one ``start`` call and its retries. A watchdog (``pilots.agent.watchdog``) frees a slot
whose job is stuck around its payload.

It stops on: drain (command or first SIGTERM/SIGINT: take no more jobs, let the running ones end),
shutdown (command or second signal: kill the running jobs, report them), idle timeout (no job for
that long) or a refused token. On the way out: final reports flushed, ``POST terminate``, the
command queue deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kombu import Connection, Queue
from kombu.message import Message

from pilots.agent import __version__, host
from pilots.agent.client import (
    CONFLICT,
    OK,
    REJECTED,
    RETRY,
    ApiResult,
    Backoff,
    PilotClient,
    new_key,
)
from pilots.agent.commands import CommandConsumer, CommandDispatcher
from pilots.agent.config import PilotConfig
from pilots.agent.guard import Orphan, PayloadGuard
from pilots.agent.logs import kv, log
from pilots.agent.runner import FAILED, JobResult, JobRunner
from pilots.agent.sandbox import PayloadSandbox, SandboxError, from_config, is_dumpable
from pilots.agent.spool import ReportSender, Spool
from pilots.agent.watchdog import SLOT_STUCK, SlotWatchdog
from wms.contract import JOB, VERSION, Command, ContractError, JobMessage, decode_job
from wms.topology import QUEUE_TYPES, Topology, broker_urls

EXIT_OK = 0  # drained, shut down, idle
EXIT_FAILED = 1  # could not start (registration, broker, work dir)
EXIT_TOKEN_REFUSED = 3  # the WMS answered 401/403 to the pilot's own token (revoked?)

IDLE, BUSY, DRAINING = "idle", "busy", "draining"
PENDING_KILL_TTL = 120.0  # a kill_job for a job not (yet) here is remembered this long
REMEMBERED_ENDED = 10_000  # job uuids that ended here (a late kill for them is not kept)
FLUSH_AT_EXIT = 15.0  # seconds spent re-sending spooled reports before terminate
MAX_REPORTING = 5_000  # spooled reports named in a heartbeat (the WMS takes 10,000 at most)


class StartupError(RuntimeError):
    """The pilot cannot start (registration refused, broker unreachable, work dir in use)."""


@dataclass
class RunningJob:
    job: JobMessage
    runner: JobRunner
    thread: threading.Thread | None = None
    started: float = field(default_factory=time.monotonic)
    next_report: float = 0.0


class Agent:
    def __init__(
        self,
        config: PilotConfig,
        *,
        install_signals: bool = True,
        sample_interval: float = 1.0,
    ) -> None:
        self.cfg = config
        self.install_signals = install_signals
        self.sample_interval = sample_interval
        self.work_dir = config.work_path
        self.client = PilotClient(config.server_url, timeout=config.http_timeout)
        self.spool: Spool | None = None
        self.sender: ReportSender | None = None
        self.pilot_id: int | None = None
        self.device_type = config.device_type
        self.topology = Topology(config.bus_prefix, config.queue_type)
        self.heartbeat_interval = config.heartbeat_interval
        self.dispatcher: CommandDispatcher | None = None
        self.consumer: CommandConsumer | None = None
        self.sandbox = PayloadSandbox()
        # payloads die with the pilot; what a dead pilot left is killed at start-up (guard.py)
        self.guard: PayloadGuard | None = None
        self.orphans: list[Orphan] = []

        self.jobs: dict[str, RunningJob] = {}
        self.jobs_lock = threading.Lock()
        self.jobs_done = 0
        self.pending_kills: dict[str, tuple[int | None, str, float]] = {}
        self.ended: dict[str, int] = {}  # job uuid -> last attempt that ended here
        self.draining = False
        self.shutting_down = False
        self.exit_reason = ""
        self.token_refused = False
        self.registered = threading.Event()  # tests wait on it
        self._wake = threading.Event()
        self._threads_stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._signals: list[int] = []  # appended by the signal handler, read by the main loop
        self._signals_seen = 0
        self._conn: Connection | None = None
        self._job_queue: Queue | None = None  # the job queue bound to self._conn's channel
        self._lock_fd: int | None = None
        self._stop_on_signal = threading.Event()  # cuts the registration retries short
        self._last_activity = time.monotonic()
        self.watchdog = SlotWatchdog(
            self._running_jobs, self._free_stuck_slot, stuck_after=config.slot_stuck_after
        )

    # --- public controls (commands, signals, tests) --------------------------------------------

    def drain(self, reason: str = "drain") -> None:
        """Take no more jobs; exit once the running ones have ended."""
        if not self.draining:
            log.info(kv("pilot_draining", reason=reason, running=len(self.jobs)))
        self.draining = True
        self.exit_reason = self.exit_reason or reason
        self._wake.set()

    def shutdown(self, reason: str = "shutdown") -> None:
        """Kill the running jobs (their reports say killed) and exit."""
        if not self.shutting_down:
            log.info(kv("pilot_shutting_down", reason=reason, running=len(self.jobs)))
        self.shutting_down = True
        self.draining = True
        self.exit_reason = reason
        self._kill_all(f"pilot shutdown: {reason}")
        self._wake.set()

    def kill_job(self, job_uuid: str, attempt: int | None, reason: str) -> bool:
        """Kill one job's attempt if it runs here; remember the order a while if not (yet)."""
        with self.jobs_lock:
            running = self.jobs.get(job_uuid)
            ended = self.ended.get(job_uuid)
            # not here (yet?): its start may be on its way; not if that attempt already ended here
            keep = running is None and (ended is None or (attempt is not None and attempt > ended))
            if keep:
                self.pending_kills[job_uuid] = (attempt, reason, time.monotonic())
        if running is None:
            log.info(
                kv("kill_job_not_running_here", job_uuid=job_uuid, attempt=attempt, remembered=keep)
            )
            return False
        if attempt is not None and attempt != running.job.attempt:
            log.info(
                kv(
                    "kill_job_other_attempt_ignored",
                    job_uuid=job_uuid,
                    attempt=attempt,
                    running_attempt=running.job.attempt,
                )
            )
            return False
        running.runner.kill(reason or "kill_job command")
        return True

    @property
    def state(self) -> str:
        if self.draining:
            return DRAINING
        return BUSY if self.jobs else IDLE

    # --- the whole life ------------------------------------------------------------------------

    def run(self) -> int:
        log.info(kv("pilot_starting", version=__version__, pid=os.getpid(), **_loggable(self.cfg)))
        try:
            self._prepare_dirs()
        except StartupError as exc:
            log.error(kv("pilot_cannot_start", error=exc))
            return EXIT_FAILED
        if self.install_signals:
            self._install_signal_handlers()
        assert self.sender is not None
        self.sender.start()  # a previous run's reports go out now, registered or not
        try:
            self._register()
            self._connect_broker()
        except Exception as exc:  # StartupError, or a bug: exit with a clear line either way
            if isinstance(exc, StartupError):
                log.error(kv("pilot_cannot_start", error=exc))
            else:
                log.exception(kv("pilot_cannot_start", error=f"{type(exc).__name__}: {exc}"))
            if self.pilot_id is not None:
                self._terminate(f"startup failed: {exc}")
            self._close()
            return EXIT_FAILED
        self._start_threads()
        try:
            self._loop()
        except Exception as exc:  # a bug: still kill and report the jobs, and say goodbye
            log.exception(kv("pilot_loop_crashed", error=exc))
            self.shutdown(f"pilot error: {type(exc).__name__}: {exc}")
        self._finish()
        return EXIT_TOKEN_REFUSED if self.token_refused else EXIT_OK

    # --- start-up ------------------------------------------------------------------------------

    def _prepare_sandbox(self) -> None:
        cfg = self.cfg
        hidden = [self.work_dir, cfg.spool_path, *cfg.secret_files()]
        try:
            self.sandbox = from_config(
                payload_user=cfg.payload_user,
                payload_env=cfg.payload_env,
                wrapper=cfg.payload_wrapper,
                image=cfg.payload_wrapper_image,
                options=cfg.payload_wrapper_options,
                hidden=hidden,
                empty_file=self.work_dir / ".empty",
            )
        except SandboxError as exc:
            raise StartupError(str(exc)) from exc
        user = self.sandbox.user
        log.info(
            kv(
                "payload_isolation",
                user=user.name if user else "pilot's own",
                wrapper=cfg.payload_wrapper,
                pilot_dumpable=is_dumpable(),
            )
        )
        if (user.uid if user is not None else os.geteuid()) == 0:
            log.warning(kv("payloads_run_as_root", hint="--payload-user an unprivileged account"))
        elif not self.sandbox.switches_user and self.sandbox.wrapper is None:
            # same account, no container: file permissions cannot keep a payload out of the
            # spool (the pilot's token) or a secret file; standard input leaves no file
            secret_files = cfg.secret_files()
            if secret_files:
                log.warning(
                    kv(
                        "payloads_can_read_pilot_files",
                        files=",".join(map(str, secret_files)),
                        hint="run payloads as another account (--payload-user) or in a "
                        "container (--payload-wrapper), or pass the secrets on standard input",
                    )
                )

    def _prepare_dirs(self) -> None:
        self._prepare_sandbox()
        try:
            # the pilot's own: its lock, its spool (the pilot token), the jobs' parent (0711:
            # a payload account reaches its job's directory, lists nothing)
            self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
            os.chmod(self.work_dir, 0o711)  # noqa: S103 - traverse only
            (self.work_dir / "jobs").mkdir(exist_ok=True, mode=0o711)
            os.chmod(self.work_dir / "jobs", 0o711)  # noqa: S103 - traverse only
            # what a container wrapper mounts over the pilot's secret files
            empty = self.work_dir / ".empty"
            with contextlib.suppress(FileExistsError):
                os.close(os.open(empty, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444))
            fd = os.open(self.work_dir / ".pilot.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StartupError(f"work dir {self.work_dir}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StartupError(
                f"work dir {self.work_dir} is used by another pilot (give each its own)"
            ) from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        try:
            self.spool = Spool(self.cfg.spool_path)
        except OSError as exc:
            raise StartupError(f"spool dir {self.cfg.spool_path}: {exc}") from exc
        self.sender = ReportSender(self.spool, timeout=self.cfg.http_timeout)
        left = len(self.spool)
        if left:
            log.info(kv("spool_has_reports_from_before", reports=left, spool=self.spool.directory))
        self._guard_payloads()

    def _guard_payloads(self) -> None:
        """Under the work dir's lock (no other pilot uses it): kill what the pilots that ran here
        before left running (reported at registration), then start this run's guardian."""
        guard = PayloadGuard(self.work_dir, grace=self.cfg.grace_period)
        try:
            guard.prepare()
            self.orphans = guard.scan_leftovers()
            guard.start()
        except OSError as exc:
            raise StartupError(f"payload records in {guard.dir}: {exc}") from exc
        self.guard = guard

    def _register(self) -> None:
        gpus = self.cfg.gpus if self.cfg.gpus >= 0 else host.gpus()
        payload = {
            "hostname": self.cfg.hostname or host.hostname(),
            "site": self.cfg.site,
            "device_type": self.cfg.device_type,
            "cores": host.cores(),
            "memory_mb": host.memory_mb(),
            "gpus": gpus,
            "slots": self.cfg.slots,
            "version": __version__,
        }
        if self.orphans:
            payload["orphans"] = [o.as_dict() for o in self.orphans]
        if not self.cfg.register_token:
            raise StartupError(
                "no register token (--register-token-file FILE, - for standard input, "
                "or register_token in a config file of mode 0600)"
            )
        result = self.client.register(
            payload,
            register_token=self.cfg.register_token,
            retries=self.cfg.register_retries,
            stop=self._stop_on_signal,
        )
        if result.status == 400 and "orphans" in payload and "orphans" in str(result.body):
            # a server older than the field: register without it, the log has said it all
            log.warning(kv("orphans_report_refused_by_server", answer=_head(result.body)))
            del payload["orphans"]
            result = self.client.register(
                payload,
                register_token=self.cfg.register_token,
                retries=self.cfg.register_retries,
                stop=self._stop_on_signal,
            )
        if not result.ok:
            raise StartupError(
                f"registration at {self.cfg.server_url} failed: {result.describe()}"
                f" {result.body if result.status else ''}".rstrip()
            )
        body = result.body if isinstance(result.body, dict) else {}
        pilot_id, token = body.get("pilot_id"), body.get("token")
        if not isinstance(pilot_id, int) or not isinstance(token, str) or not token:
            raise StartupError(f"registration answer without pilot_id/token: {body!r}")
        self.pilot_id = pilot_id
        self.client.pilot_id = pilot_id
        self.client.token = token
        if self.guard is not None:
            self.guard.set_pilot_id(pilot_id)
        # the server's answer wins over the local configuration
        if body.get("device_type") in ("cpu", "gpu"):
            self.device_type = body["device_type"]
        prefix, queue_type = self.topology.prefix, self.topology.queue_type
        if isinstance(body.get("bus_prefix"), str) and body["bus_prefix"]:
            prefix = body["bus_prefix"]
        if body.get("queue_type") in QUEUE_TYPES:  # a server older than it names none
            if body["queue_type"] != queue_type:
                log.info(kv("queue_type_from_server", pilot=queue_type, server=body["queue_type"]))
            queue_type = body["queue_type"]
        self.topology = Topology(prefix, queue_type)
        self._set_heartbeat_interval(body.get("heartbeat_interval"))
        expected = {
            "job_queue": self.topology.job_queue_name(self.device_type),
            "command_queue": self.topology.command_queue(pilot_id).name,
        }
        for key, name in expected.items():
            if body.get(key) and body[key] != name:
                log.warning(kv("queue_name_mismatch", key=key, server=body[key], pilot=name))
        self.dispatcher = CommandDispatcher(pilot_id, self._on_command)
        log.info(
            kv(
                "pilot_registered",
                pilot_id=pilot_id,
                device_type=self.device_type,
                bus_prefix=self.topology.prefix,
                queue_type=self.topology.queue_type,
                heartbeat_interval=self.heartbeat_interval,
                **{k: v for k, v in payload.items() if k != "device_type"},
            )
        )
        self.registered.set()

    def _set_heartbeat_interval(self, value: Any) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            self.heartbeat_interval = float(value)

    def _new_connection(self) -> Connection:
        options: dict[str, Any] = dict(self.cfg.broker_options)
        if self.cfg.broker_connect_url.split(":", 1)[0] in ("amqp", "amqps", "pyamqp"):
            # socket time-outs of py-amqp: no get, ack or reject waits for ever on the broker
            for name in ("read_timeout", "write_timeout"):  # a site's own option wins
                options[name] = float(options.get(name, self.cfg.broker_timeout))
        return Connection(
            self.cfg.broker_connect_url,
            transport_options=options,
            connect_timeout=min(10.0, self.cfg.broker_timeout),
            heartbeat=60,
        )

    def _connect_broker(self) -> None:
        assert self.pilot_id is not None
        conn = self._new_connection()
        try:
            conn.ensure_connection(
                # each retry tries the next URL of a failover list; a pause after each round
                max_retries=max(1, self.cfg.register_retries)
                * len(broker_urls(self.cfg.broker_url)),
                interval_start=1,
                interval_step=2,
                interval_max=30,
                errback=lambda exc, interval: log.warning(
                    kv("broker_retry", error=exc, wait=interval)
                ),
            )
            self.topology.declare(
                conn,
                queues=[
                    self.topology.job_queue(self.device_type),
                    self.topology.command_queue(self.pilot_id),
                ],
            )
        except Exception as exc:  # kombu's and amqp's connection and channel errors
            with contextlib.suppress(Exception):
                conn.release()
            raise StartupError(f"broker {_hide(self.cfg.broker_url)}: {exc}") from exc
        self._conn = conn
        log.info(
            kv(
                "topology_declared",
                prefix=self.topology.prefix,
                job_queue=self.topology.job_queue_name(self.device_type),
                command_queue=self.topology.command_queue(self.pilot_id).name,
            )
        )

    def _start_threads(self) -> None:
        assert self.pilot_id is not None and self.dispatcher is not None
        self.consumer = CommandConsumer(
            self.cfg.broker_connect_url,
            self.topology.command_queue(self.pilot_id),
            self.dispatcher.handle_raw,
            transport_options=dict(self.cfg.broker_options),
        )
        self.consumer.start()
        self._heartbeat_thread = threading.Thread(
            target=self._heartbeat_loop, name="pilot-heartbeat", daemon=True
        )
        self._heartbeat_thread.start()
        self.watchdog.start()
        self._last_activity = time.monotonic()

    # --- signals -------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            # no locks here: the main loop reads the list and acts
            self._signals.append(signum)
            if self.pilot_id is None:
                self._stop_on_signal.set()  # interrupt the registration retries

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _handle_signals(self) -> None:
        while self._signals_seen < len(self._signals):
            signum = self._signals[self._signals_seen]
            self._signals_seen += 1
            name = signal.Signals(signum).name
            if self._signals_seen == 1:
                self.drain(f"signal {name}")
            else:
                self.shutdown(f"signal {name}")

    # --- the main loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        poll = Backoff(0.05, self.cfg.poll_interval)
        start_backoff = Backoff(1.0, 60.0)
        while True:
            self._handle_signals()
            if self.shutting_down or (self.draining and not self.jobs):
                break
            with self.jobs_lock:
                running = len(self.jobs)
            if self.draining or running >= self.cfg.slots:
                self._wait(0.5)
                continue
            idle = time.monotonic() - self._last_activity
            if (
                self.cfg.idle_timeout
                and not running
                and idle >= self.cfg.idle_timeout
                # reports the WMS has not taken yet: it is away, this is not idleness
                and not (self.spool is not None and len(self.spool))
            ):
                self.exit_reason = f"idle for {idle:.0f}s"
                log.info(kv("pilot_idle_exit", idle=f"{idle:.1f}"))
                break
            message = self._get()
            if message is None:
                self._wait(poll.next())
                continue
            poll.reset()
            delay = self._take(message)
            if delay is None:
                start_backoff.reset()
            else:
                # work is waiting and the WMS cannot be reached: not idleness
                self._last_activity = time.monotonic()
                wait = start_backoff.next()
                log.warning(kv("start_backoff", wait=f"{wait:.1f}"))
                self._wait(wait)

    def _wait(self, seconds: float) -> None:
        """Sleep (in short steps: a signal's flag is read between them) unless woken."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self._signals_seen < len(self._signals):
                return
            if self._wake.wait(min(left, 0.25)):
                self._wake.clear()
                return
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.heartbeat_check()

    def _get(self) -> Message | None:
        """One ``basic_get`` on the job queue, reconnecting after broker trouble."""
        try:
            if self._conn is None:
                self._conn = self._new_connection()
                # every URL of a failover list once (one URL: tried twice)
                self._conn.ensure_connection(
                    max_retries=max(1, len(broker_urls(self.cfg.broker_url)) - 1)
                )
            channel = self._conn.default_channel
            queue = self._job_queue
            if queue is None or queue.channel is not channel:  # bound once per channel
                queue = self._job_queue = self.topology.job_queue(self.device_type)(channel)
            return queue.get(no_ack=False)
        except Exception as exc:  # connection/channel errors of kombu or amqp
            log.warning(kv("broker_get_failed", error=f"{type(exc).__name__}: {exc}"))
            self._drop_connection()
            self._wait(min(5.0, self.cfg.poll_interval * 2))
            return None

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        self._job_queue = None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.release()

    def _settle(self, message: Message, *, ack: bool) -> None:
        try:
            if ack:
                message.ack()
            else:
                message.reject(requeue=True)
        except Exception as exc:  # the broker will redeliver; the server's claim stays atomic
            log.warning(kv("message_settle_failed", ack=ack, error=exc))
            self._drop_connection()

    def _take(self, message: Message) -> float | None:
        """Start (or drop, or requeue) one message. Returns a truthy delay to back off after."""
        try:
            job = decode_job(message.body)
        except ContractError as exc:
            log.error(kv("job_message_malformed_dropped", error=exc, body=_head(message.body)))
            self._settle(message, ack=True)
            return None
        context = {"job_uuid": job.job_uuid, "attempt": job.attempt}
        result = self._start(job)
        if result.outcome == OK:
            try:
                # the server's copy is the one to run; "v"/"kind" may be left out of it
                body = result.body if isinstance(result.body, dict) else {}
                to_run = decode_job({"v": VERSION, "kind": JOB, **body}) if body else job
            except ContractError as exc:
                log.warning(kv("start_answer_not_a_job_message", **context, error=exc))
                to_run = job
            running = self._register_job(to_run)
            self._settle(message, ack=True)
            self._launch(running)
            return None
        if result.outcome == CONFLICT and result.error == "pilot_not_live":
            # Declared lost while the WMS did not hear from it: the next heartbeat makes it live
            # again. The message goes back to its queue meanwhile; dropping it would leave the
            # job queued until it is published again.
            log.warning(kv("job_start_refused_pilot_not_live_requeued", **context))
            self._settle(message, ack=False)
            return 1.0
        if result.outcome == CONFLICT:
            log.info(kv("job_start_refused_dropped", **context, answer=result.describe()))
            self._settle(message, ack=True)
            return None
        if result.outcome == REJECTED:
            if result.status in (401, 403):
                log.error(kv("start_unauthorized_requeued", **context, answer=result.describe()))
                self._settle(message, ack=False)
                self.token_refused = True
                self.shutdown(f"the WMS refused the pilot's token ({result.describe()})")
                return None
            log.error(
                kv(
                    "job_start_rejected_dropped",
                    **context,
                    answer=result.describe(),
                    body=_head(result.body),
                )
            )
            self._settle(message, ack=True)
            return None
        log.warning(kv("job_start_failed_requeued", **context, answer=result.describe()))
        self._settle(message, ack=False)
        return 1.0

    def _start(self, job: JobMessage) -> ApiResult:
        """``POST start``; while its outcome is unknown (no answer, time-out, 5xx: the server
        may have started the job for this pilot) sent again with the same idempotency key,
        with backoff and jitter, up to ``start_retries`` more times. The server answers a
        start it already made with the same job message (docs/pilot-api.md)."""
        key = new_key()
        backoff = Backoff(0.5, 10.0)
        result = self.client.start(job.job_uuid, job.attempt, key=key)
        for _ in range(self.cfg.start_retries):
            if result.outcome != RETRY or self.shutting_down:
                break
            delay = backoff.next()
            log.warning(
                kv(
                    "job_start_retry",
                    job_uuid=job.job_uuid,
                    attempt=job.attempt,
                    answer=result.describe(),
                    wait=f"{delay:.1f}",
                )
            )
            deadline = time.monotonic() + delay
            while not self.shutting_down and (left := deadline - time.monotonic()) > 0:
                time.sleep(min(left, 0.25))
                if self._conn is not None:  # the message stays unacked: keep the link alive
                    with contextlib.suppress(Exception):
                        self._conn.heartbeat_check()
            result = self.client.start(job.job_uuid, job.attempt, key=key)
        return result

    # --- running jobs --------------------------------------------------------------------------

    def _register_job(self, job: JobMessage) -> RunningJob:
        runner = JobRunner(
            job,
            work_root=self.work_dir,
            grace_period=self.cfg.grace_period,
            stage_in=self.cfg.stage_in,
            storage_roots=self.cfg.storage_roots,
            sample_interval=self.sample_interval,
            extra_env={"PATH": _job_path()},
            sandbox=self.sandbox,
            guard=self.guard,
        )
        running = RunningJob(job, runner, next_report=time.monotonic() + self.cfg.report_interval)
        with self.jobs_lock:
            self.jobs[job.job_uuid] = running
            pending = self.pending_kills.pop(job.job_uuid, None)
            now = time.monotonic()
            for uuid, (_, _, at) in list(self.pending_kills.items()):
                if now - at > PENDING_KILL_TTL:
                    del self.pending_kills[uuid]
        if pending is not None and pending[0] in (None, job.attempt):
            runner.kill(pending[1] or "kill_job command")
        if self.shutting_down:
            runner.kill("pilot shutdown")
        return running

    def _launch(self, running: RunningJob) -> None:
        log.info(
            kv(
                "job_started",
                job_uuid=running.job.job_uuid,
                attempt=running.job.attempt,
                task_id=running.job.task_id,
                executable=running.job.executable,
                running=len(self.jobs),
                slots=self.cfg.slots,
            )
        )
        running.thread = threading.Thread(
            target=self._run_job,
            args=(running,),
            name=f"job-{running.job.job_uuid[:8]}",
            daemon=True,
        )
        running.thread.start()

    def _run_job(self, running: RunningJob) -> None:
        job, runner = running.job, running.runner
        try:
            try:
                result = runner.run()
            except Exception as exc:  # a pilot bug or a broken work dir: still a final report
                log.exception(kv("job_runner_crashed", job_uuid=job.job_uuid, error=exc))
                result = JobResult(
                    FAILED,
                    error_code="pilot_error",
                    error_message=f"{type(exc).__name__}: {exc}",
                    metrics=runner.metrics(),
                )
            log.info(
                kv(
                    "job_ended",
                    job_uuid=job.job_uuid,
                    attempt=job.attempt,
                    state=result.state,
                    exit_code=result.exit_code,
                    error_code=result.error_code or "-",
                    outputs=len(result.outputs),
                    **result.metrics,
                )
            )
            self._final_report(job, result)
            if result.log_staged and not self.cfg.keep_job_dirs:
                runner.cleanup()
        finally:
            self._release(running)

    def _release(self, running: RunningJob) -> bool:
        """Take a job off its slot, once: False if it was off already (the watchdog freed
        its slot, and this is its thread ending late)."""
        job = running.job
        with self.jobs_lock:
            if self.jobs.get(job.job_uuid) is not running:
                return False
            del self.jobs[job.job_uuid]
            self.ended[job.job_uuid] = job.attempt
            while len(self.ended) > REMEMBERED_ENDED:
                del self.ended[next(iter(self.ended))]
            self.jobs_done += 1
            self._last_activity = time.monotonic()
        self._wake.set()
        return True

    def _running_jobs(self) -> list[RunningJob]:
        with self.jobs_lock:
            return list(self.jobs.values())

    def _free_stuck_slot(self, running: RunningJob, why: str) -> None:
        """The watchdog found this job's slot stuck: kill what may still run of it, free the
        slot and spool a final failed report (``slot_stuck``) for its attempt."""
        running.runner.kill(f"{SLOT_STUCK}: {why}")
        if not self._release(running):
            return
        result = JobResult(
            FAILED,
            error_code=SLOT_STUCK,
            error_message=f"the pilot freed the job's slot: {why}",
            metrics=running.runner.metrics(),
        )
        # in a thread of its own: a hung disk may block the spool too, never the watchdog
        threading.Thread(
            target=self._final_report,
            args=(running.job, result),
            name=f"stuck-{running.job.job_uuid[:8]}",
            daemon=True,
        ).start()

    def _final_report(self, job: JobMessage, result: JobResult) -> None:
        """Spool first (atomically), then let the sender send it."""
        assert self.spool is not None and self.sender is not None
        report = result.report(job.attempt)
        try:
            self.spool.put(
                job_uuid=job.job_uuid,
                attempt=job.attempt,
                report=report,
                pilot_id=self.pilot_id,
                server_url=self.client.server_url,
                token=self.client.token,
            )
        except OSError as exc:  # a full or broken disk: sending directly is all that is left
            log.error(kv("report_spool_failed_sending_directly", job_uuid=job.job_uuid, error=exc))
            answer = self.client.report(job.job_uuid, report)
            log.info(kv("report_sent_unspooled", job_uuid=job.job_uuid, answer=answer.describe()))
            return
        self.sender.wake()

    def _kill_all(self, reason: str) -> None:
        with self.jobs_lock:
            runners = [r.runner for r in self.jobs.values()]
        for runner in runners:
            runner.kill(reason)

    # --- commands and heartbeats ---------------------------------------------------------------

    def _on_command(self, command: Command, source: str) -> None:
        if command.command == "kill_job":
            self.kill_job(command.job_uuid, command.attempt, command.reason or "kill_job command")
        elif command.command == "drain":
            self.drain(f"drain command{': ' + command.reason if command.reason else ''}")
        elif command.command == "shutdown":
            self.shutdown(f"shutdown command{': ' + command.reason if command.reason else ''}")

    def _heartbeat_payload(self) -> dict[str, Any]:
        with self.jobs_lock:
            jobs = list(self.jobs.values())
        # After the running jobs, not before: a job's report is spooled before the job leaves
        # ``self.jobs``, so every attempt is named in one list or the other.
        reporting = self.spool.attempts(self.pilot_id) if self.spool is not None else []
        metrics = host.metrics(self.work_dir)
        metrics.update(running_jobs=len(jobs), slots=self.cfg.slots, jobs_done=self.jobs_done)
        state = self.state
        payload: dict[str, Any] = {
            "state": state,
            "status": f"{state}: {len(jobs)}/{self.cfg.slots} slots busy, {self.jobs_done} done",
            "metrics": metrics,
            "jobs": [_job_metrics(r) for r in jobs],
            "acked_commands": self.dispatcher.pending_acks() if self.dispatcher else [],
        }
        if len(reporting) <= MAX_REPORTING:  # else left out: a partial list would mislead
            payload["reporting"] = [{"job_uuid": u, "attempt": a} for u, a in reporting]
        return payload

    def heartbeat(self) -> bool:
        """One heartbeat; False when the WMS did not answer it (the loop then backs off).

        Neither an unreachable WMS nor a ``lost`` state in the answer stops the pilot: its jobs
        run on, their reports wait in the spool, and the WMS reconciles them when it hears
        from the pilot again. Only a refused token (401/403) or a command does."""
        payload = self._heartbeat_payload()
        result = self.client.heartbeat(payload)
        if result.ok:
            body = result.body if isinstance(result.body, dict) else {}
            assert self.dispatcher is not None
            self.dispatcher.confirm_acks(payload["acked_commands"])
            self._set_heartbeat_interval(body.get("heartbeat_interval"))
            for item in body.get("commands") or []:
                self.dispatcher.handle_raw(item, "heartbeat")
            log.debug(kv("heartbeat_sent", state=payload["state"], jobs=len(payload["jobs"])))
            return True
        if result.status in (401, 403):
            log.error(kv("heartbeat_unauthorized", answer=result.describe()))
            self.token_refused = True
            self.shutdown(f"the WMS refused the pilot's token ({result.describe()})")
            return True
        log.warning(kv("heartbeat_failed", answer=result.describe()))
        return result.outcome != RETRY

    def _running_reports(self) -> None:
        now = time.monotonic()
        with self.jobs_lock:
            due = [r for r in self.jobs.values() if now >= r.next_report]
        for running in due:
            running.next_report = now + self.cfg.report_interval
            if running.runner.pid is None or running.runner.ended:
                continue  # not started yet, or its final report is coming: no late "running"
            report = {
                "attempt": running.job.attempt,
                "state": "running",
                "exit_code": None,
                "error_code": "",
                "error_message": "",
                "metrics": running.runner.metrics(),
                "outputs": [],
            }
            result = self.client.report(running.job.job_uuid, report)
            if not result.ok:
                log.warning(
                    kv(
                        "running_report_failed",
                        job_uuid=running.job.job_uuid,
                        answer=result.describe(),
                    )
                )

    def _heartbeat_loop(self) -> None:
        """Every ``heartbeat_interval``; while the WMS does not answer, with a growing backoff
        (jittered, so pilots do not all come back in step), at most twice the interval."""
        backoff = Backoff(1.0, 60.0)
        while not self._threads_stop.is_set():
            answered = True
            try:
                answered = self.heartbeat()
                if answered:
                    self._running_reports()
            except Exception as exc:  # the heartbeat thread must live on
                log.exception(kv("heartbeat_loop_error", error=exc))
            if answered:
                backoff.reset()
                wait = self.heartbeat_interval
            else:
                backoff.first = max(0.5, min(self.heartbeat_interval / 4, 5.0))
                backoff.maximum = max(backoff.first, 2 * self.heartbeat_interval)
                wait = backoff.next()
                log.info(kv("heartbeat_backoff", wait=f"{wait:.1f}"))
            self._threads_stop.wait(wait)

    # --- the way out ---------------------------------------------------------------------------

    def _finish(self) -> None:
        if self.shutting_down:
            self._kill_all(f"pilot shutdown: {self.exit_reason}")
        while True:  # killed ones end within the grace period (plus stage-out); a stuck
            with self.jobs_lock:  # one is taken off its slot by the watchdog
                threads = [r.thread for r in self.jobs.values() if r.thread is not None]
            if not threads:
                break
            threads[0].join(0.5)
        self._threads_stop.set()
        if self.consumer is not None:
            self.consumer.stop()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(self.cfg.http_timeout + 1)
        assert self.sender is not None
        left = self.sender.flush_until(time.monotonic() + FLUSH_AT_EXIT)
        if left:
            log.warning(kv("reports_left_in_spool", reports=left, spool=self.cfg.spool_path))
        self._terminate(self.exit_reason or "exit")
        self._delete_command_queue()
        self._close()
        log.info(
            kv(
                "pilot_exited",
                pilot_id=self.pilot_id,
                reason=self.exit_reason,
                jobs_done=self.jobs_done,
            )
        )

    def _terminate(self, reason: str) -> None:
        result = self.client.terminate(reason)
        if result.ok:
            log.info(kv("pilot_terminated", pilot_id=self.pilot_id, reason=reason))
        else:
            log.warning(kv("terminate_failed", pilot_id=self.pilot_id, answer=result.describe()))

    def _delete_command_queue(self) -> None:
        """The queue is this pilot's alone and the pilot id is never reused: leave no litter."""
        if self.pilot_id is None:
            return
        try:
            conn = self._conn or self._new_connection()
            self._conn = conn
            self.topology.command_queue(self.pilot_id)(conn.default_channel).delete()
        except Exception as exc:  # the broker may be away; the queue is only litter then
            log.warning(kv("command_queue_delete_failed", error=exc))

    def _close(self) -> None:
        self._threads_stop.set()
        self.watchdog.stop()
        if self.consumer is not None:
            self.consumer.stop()
        if self.sender is not None:
            self.sender.stop()
        self._drop_connection()
        self.client.close()
        if self.guard is not None:  # before the lock: a pilot taking over finds it all done
            self.guard.close()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None


# --- helpers ----------------------------------------------------------------------------------


def _job_metrics(running: RunningJob) -> dict[str, Any]:
    m = running.runner.metrics()
    return {
        "job_uuid": running.job.job_uuid,
        "attempt": running.job.attempt,
        "cpu_time": m["cpu_time"],
        "rss_mb": m["rss_mb"],
        "wall_time": m["wall_time"],
        "max_rss_mb": m["max_rss_mb"],
    }


def _job_path() -> str:
    """The job's PATH: the pilot's, plus the directory of the pilot's Python (its virtualenv's
    ``bin``), so that console scripts installed with the pilot (payloads) are found."""
    path = os.environ.get("PATH", os.defpath)
    own_bin = str(Path(sys.executable).parent)
    parts = path.split(os.pathsep) if path else []
    return os.pathsep.join(parts if own_bin in parts else [*parts, own_bin])


def _hide(url: str) -> str:
    from pilots.agent.config import _hide_password

    return _hide_password(url)


def _head(body: Any, limit: int = 200) -> str:
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    text = str(body)
    return text if len(text) <= limit else text[:limit] + "..."


def _loggable(cfg: PilotConfig) -> dict[str, Any]:
    keys = (
        "server_url",
        "broker_url",
        "device_type",
        "site",
        "slots",
        "work_dir",
        "spool_dir",
        "idle_timeout",
        "grace_period",
        "bus_prefix",
    )
    values = cfg.redacted()
    return {k: values[k] for k in keys}
