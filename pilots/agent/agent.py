"""The pilot's main loop and its life: start-up, the loop that fills the slots, the way out.

The agent owns its parts (each a module of its own):

- ``session`` (:class:`~pilots.agent.session.Session`): registration, the pilot's token, its
  REST calls, the spool of final reports and its sender;
- ``intake`` (:class:`~pilots.agent.intake.Intake`): the job queue, ``POST start`` with its
  retries, ack/requeue, the job's thread; ``slots`` (:class:`~pilots.agent.intake.Slots`) the
  running jobs;
- ``beats`` (:class:`~pilots.agent.heartbeat.Heartbeat`): the heartbeat thread, running reports;
- the command consumer and dispatcher (``pilots.agent.commands``), the slot watchdog
  (``pilots.agent.watchdog``), the payload guard (``pilots.agent.guard``).

Start-up: re-send what a previous run left in the spool, register (user token), declare the
topology on its own broker connection, start the heartbeat, command and spool threads. Then,
while running: when a slot is free, take one job message (empty queue: a short growing
backoff) and start it (the intake's rules); back off while the WMS cannot start jobs.

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
import threading
import time
from typing import Any

from pilots.agent import __version__
from pilots.agent.client import ApiResult, Backoff
from pilots.agent.commands import CommandConsumer, CommandDispatcher
from pilots.agent.config import PilotConfig
from pilots.agent.guard import Orphan, PayloadGuard
from pilots.agent.heartbeat import Heartbeat
from pilots.agent.intake import Intake
from pilots.agent.logs import kv, log
from pilots.agent.sandbox import PayloadSandbox, SandboxError, from_config, is_dumpable
from pilots.agent.session import Session, StartupError
from pilots.agent.slots import RunningJob, Slots
from pilots.agent.spool import Spool
from pilots.agent.watchdog import SlotWatchdog
from wms.contract import Command
from wms.topology import QUEUE_TYPES, Topology

__all__ = ["Agent", "RunningJob", "StartupError"]

EXIT_OK = 0  # drained, shut down, idle
EXIT_FAILED = 1  # could not start (registration, broker, work dir)
EXIT_TOKEN_REFUSED = 3  # the WMS answered 401/403 to the pilot's own token (revoked?)

IDLE, BUSY, DRAINING = "idle", "busy", "draining"
FLUSH_AT_EXIT = 15.0  # seconds spent re-sending spooled reports before terminate


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
        self.device_type = config.device_type
        self.topology = Topology(config.bus_prefix, config.queue_type)
        self.dispatcher: CommandDispatcher | None = None
        self.consumer: CommandConsumer | None = None
        self.sandbox = PayloadSandbox()
        # payloads die with the pilot; what a dead pilot left is killed at start-up (guard.py)
        self.guard: PayloadGuard | None = None
        self.orphans: list[Orphan] = []

        self.draining = False
        self.shutting_down = False
        self.exit_reason = ""
        self.token_refused = False
        self.registered = threading.Event()  # tests wait on it
        self._wake = threading.Event()
        self._signals: list[int] = []  # appended by the signal handler, read by the main loop
        self._signals_seen = 0
        self._lock_fd: int | None = None
        self._stop_on_signal = threading.Event()  # cuts the registration retries short

        self.session = Session(config)
        self.slots = Slots(config.slots)
        self.intake = Intake(self)
        self.beats = Heartbeat(self)
        self.watchdog = SlotWatchdog(
            self.slots.running, self.intake.free_stuck_slot, stuck_after=config.slot_stuck_after
        )

    # --- what the parts hold, by their old names (tests, operators' scripts) ---------------------

    @property
    def pilot_id(self) -> int | None:
        return self.session.pilot_id

    @property
    def spool(self) -> Spool | None:
        return self.session.spool

    @property
    def jobs(self) -> dict[str, RunningJob]:
        return self.slots.jobs

    @property
    def jobs_done(self) -> int:
        return self.slots.done

    @property
    def heartbeat_interval(self) -> float:
        return self.beats.interval

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
        self.slots.kill_all(f"pilot shutdown: {reason}")
        self._wake.set()

    def kill_job(self, job_uuid: str, attempt: int | None, reason: str) -> bool:
        """Kill one job's attempt if it runs here; remember the order a while if not (yet)."""
        return self.slots.kill_job(job_uuid, attempt, reason)

    def heartbeat(self) -> bool:
        """One heartbeat now (see :meth:`Heartbeat.beat`)."""
        return self.beats.beat()

    def token_refused_by_wms(self, result: ApiResult) -> None:
        """The WMS answered 401/403 to the pilot's own token: shut down, exit code 3."""
        self.token_refused = True
        self.shutdown(f"the WMS refused the pilot's token ({result.describe()})")

    def wake(self) -> None:
        """Wake the main loop (a slot was freed)."""
        self._wake.set()

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
        assert self.session.sender is not None
        self.session.sender.start()  # a previous run's reports go out now, registered or not
        try:
            self._register()
            self.intake.connect()
        except Exception as exc:  # StartupError, or a bug: exit with a clear line either way
            if isinstance(exc, StartupError):
                log.error(kv("pilot_cannot_start", error=exc))
            else:
                log.exception(kv("pilot_cannot_start", error=f"{type(exc).__name__}: {exc}"))
            if self.pilot_id is not None:
                self.session.terminate(f"startup failed: {exc}")
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
        self.session.open_spool()
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
        """Register, then take the server's answer: it wins over the local configuration."""
        sent, answer = self.session.register(self.orphans, self._stop_on_signal)
        pilot_id = answer.pilot_id
        if self.guard is not None:
            self.guard.set_pilot_id(pilot_id)
        if answer.device_type:
            self.device_type = answer.device_type
        prefix, queue_type = self.topology.prefix, self.topology.queue_type
        if answer.bus_prefix:
            prefix = answer.bus_prefix
        if answer.queue_type in QUEUE_TYPES:  # a server older than it names none
            if answer.queue_type != queue_type:
                log.info(kv("queue_type_from_server", pilot=queue_type, server=answer.queue_type))
            queue_type = answer.queue_type
        self.topology = Topology(prefix, queue_type)
        self.beats.set_interval(answer.heartbeat_interval)
        expected = {
            "job_queue": (answer.job_queue, self.topology.job_queue_name(self.device_type)),
            "command_queue": (answer.command_queue, self.topology.command_queue(pilot_id).name),
        }
        for key, (server, name) in expected.items():
            if server and server != name:
                log.warning(kv("queue_name_mismatch", key=key, server=server, pilot=name))
        self.dispatcher = CommandDispatcher(pilot_id, self._on_command)
        log.info(
            kv(
                "pilot_registered",
                pilot_id=pilot_id,
                device_type=self.device_type,
                bus_prefix=self.topology.prefix,
                queue_type=self.topology.queue_type,
                heartbeat_interval=self.heartbeat_interval,
                **{k: v for k, v in sent.to_dict().items() if k != "device_type"},
            )
        )
        self.registered.set()

    def _start_threads(self) -> None:
        assert self.pilot_id is not None and self.dispatcher is not None
        self.consumer = CommandConsumer(
            self.cfg.broker_connect_url,
            self.topology.command_queue(self.pilot_id),
            self.dispatcher.handle_raw,
            transport_options=dict(self.cfg.broker_options),
        )
        self.consumer.start()
        self.beats.start()
        self.watchdog.start()
        self.slots.last_activity = time.monotonic()

    def _on_command(self, command: Command, source: str) -> None:
        if command.command == "kill_job":
            self.kill_job(command.job_uuid, command.attempt, command.reason or "kill_job command")
        elif command.command == "drain":
            self.drain(f"drain command{': ' + command.reason if command.reason else ''}")
        elif command.command == "shutdown":
            self.shutdown(f"shutdown command{': ' + command.reason if command.reason else ''}")

    # --- signals -------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            # no locks here: the main loop reads the list and acts
            self._signals.append(signum)
            if self.session.pilot_id is None:
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
            running = self.slots.count()
            if self.draining or running >= self.cfg.slots:
                self.wait(0.5)
                continue
            idle = time.monotonic() - self.slots.last_activity
            if (
                self.cfg.idle_timeout
                and not running
                and idle >= self.cfg.idle_timeout
                # reports the WMS has not taken yet: it is away, this is not idleness
                and not self.session.spooled()
            ):
                self.exit_reason = f"idle for {idle:.0f}s"
                log.info(kv("pilot_idle_exit", idle=f"{idle:.1f}"))
                break
            messages = self.intake.get_batch(self.cfg.slots - running)
            if not messages:
                self.wait(poll.next())
                continue
            poll.reset()
            delay = self.intake.take_many(messages)
            if delay is None:
                start_backoff.reset()
            else:
                # work is waiting and the WMS cannot be reached: not idleness
                self.slots.last_activity = time.monotonic()
                wait = start_backoff.next()
                log.warning(kv("start_backoff", wait=f"{wait:.1f}"))
                self.wait(wait)

    def wait(self, seconds: float) -> None:
        """Sleep (in short steps: a signal's flag is read between them) unless woken."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self._signals_seen < len(self._signals):
                return
            if self._wake.wait(min(left, 0.25)):
                self._wake.clear()
                return
            self.intake.keep_alive()

    # --- the way out ---------------------------------------------------------------------------

    def _finish(self) -> None:
        if self.shutting_down:
            self.slots.kill_all(f"pilot shutdown: {self.exit_reason}")
        while True:  # killed ones end within the grace period (plus stage-out); a stuck
            threads = self.slots.threads()  # one is taken off its slot by the watchdog
            if not threads:
                break
            threads[0].join(0.5)
        self.beats.stop()
        if self.consumer is not None:
            self.consumer.stop()
        self.beats.stop(self.cfg.http_timeout + 1)
        assert self.session.sender is not None
        left = self.session.sender.flush_until(time.monotonic() + FLUSH_AT_EXIT)
        if left:
            log.warning(kv("reports_left_in_spool", reports=left, spool=self.cfg.spool_path))
        self.session.terminate(self.exit_reason or "exit")
        self.intake.delete_command_queue()
        self._close()
        log.info(
            kv(
                "pilot_exited",
                pilot_id=self.pilot_id,
                reason=self.exit_reason,
                jobs_done=self.jobs_done,
            )
        )

    def _close(self) -> None:
        self.beats.stop()
        self.watchdog.stop()
        if self.consumer is not None:
            self.consumer.stop()
        self.intake.drop_connection()
        self.session.close()
        if self.guard is not None:  # before the lock: a pilot taking over finds it all done
            self.guard.close()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None


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
