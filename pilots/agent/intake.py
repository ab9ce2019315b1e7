"""Taking jobs: the slots, the job queue, starting a job at the WMS, and the job's thread.

When a slot is free the main loop (``pilots.agent.agent``) asks :meth:`Intake.get` for one job
message (``basic_get``, reconnecting after broker trouble) and :meth:`Intake.take` starts it:
decode (a malformed one is acked and dropped), ``POST start``, and only then ack. 200 → ack and
run it in a thread of its own; 409 (and other 4xx) → ack and drop; 5xx or no answer → the same
start again with the same idempotency key (``start_retries`` times, backoff with jitter: the
server answers a start it already made with the same job message), then reject with requeue
and back off. So at most ``slots`` jobs run, and no message stays unacked longer than one
``start`` call and its retries.

:class:`Slots` holds the running jobs, the kills ordered for jobs not (yet) here, and the jobs
that ended here.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kombu import Connection, Queue
from kombu.message import Message

from pilots.agent.client import CONFLICT, OK, REJECTED, RETRY, ApiResult, Backoff, new_key
from pilots.agent.logs import kv, log
from pilots.agent.runner import FAILED, JobResult, JobRunner
from pilots.agent.session import StartupError, head
from pilots.agent.watchdog import SLOT_STUCK
from wms.contract import ContractError, JobMessage, decode_job, decode_start_answer
from wms.topology import broker_urls

if TYPE_CHECKING:
    from pilots.agent.config import PilotConfig
    from pilots.agent.guard import PayloadGuard
    from pilots.agent.sandbox import PayloadSandbox
    from pilots.agent.session import Session
    from pilots.agent.watchdog import SlotWatchdog
    from wms.topology import Topology


class IntakeOwner(Protocol):
    """What the intake needs of the agent that owns it (``pilots.agent.agent.Agent``): a
    protocol, so that the parts do not import the whole (no circle of imports)."""

    cfg: PilotConfig
    session: Session
    slots: Slots
    topology: Topology
    device_type: str
    work_dir: Path
    sandbox: PayloadSandbox
    guard: PayloadGuard | None
    watchdog: SlotWatchdog[Any]
    sample_interval: float
    shutting_down: bool

    def wake(self) -> None: ...

    def wait(self, seconds: float) -> None: ...

    def token_refused_by_wms(self, result: ApiResult) -> None: ...


PENDING_KILL_TTL = 120.0  # a kill_job for a job not (yet) here is remembered this long
REMEMBERED_ENDED = 10_000  # job uuids that ended here (a late kill for them is not kept)


@dataclass
class RunningJob:
    job: JobMessage
    runner: JobRunner
    thread: threading.Thread | None = None
    started: float = field(default_factory=time.monotonic)


class Slots:
    """The jobs running here (at most ``size``), under one lock."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.jobs: dict[str, RunningJob] = {}
        self.lock = threading.Lock()
        self.done = 0
        self.pending_kills: dict[str, tuple[int | None, str, float]] = {}
        self.ended: dict[str, int] = {}  # job uuid -> last attempt that ended here
        self.last_activity = time.monotonic()

    def count(self) -> int:
        with self.lock:
            return len(self.jobs)

    def running(self) -> list[RunningJob]:
        with self.lock:
            return list(self.jobs.values())

    def add(self, running: RunningJob) -> tuple[int | None, str, float] | None:
        """Put a job on a slot; returns a kill ordered for it before it came, if any."""
        job = running.job
        with self.lock:
            self.jobs[job.job_uuid] = running
            pending = self.pending_kills.pop(job.job_uuid, None)
            now = time.monotonic()
            for uuid, (_, _, at) in list(self.pending_kills.items()):
                if now - at > PENDING_KILL_TTL:
                    del self.pending_kills[uuid]
        return pending

    def release(self, running: RunningJob) -> bool:
        """Take a job off its slot, once: False if it was off already (the watchdog freed
        its slot, and this is its thread ending late)."""
        job = running.job
        with self.lock:
            if self.jobs.get(job.job_uuid) is not running:
                return False
            del self.jobs[job.job_uuid]
            self.ended[job.job_uuid] = job.attempt
            while len(self.ended) > REMEMBERED_ENDED:
                del self.ended[next(iter(self.ended))]
            self.done += 1
            self.last_activity = time.monotonic()
        return True

    def kill_job(self, job_uuid: str, attempt: int | None, reason: str) -> bool:
        """Kill one job's attempt if it runs here; remember the order a while if not (yet)."""
        with self.lock:
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

    def kill_all(self, reason: str) -> None:
        with self.lock:
            runners = [r.runner for r in self.jobs.values()]
        for runner in runners:
            runner.kill(reason)

    def threads(self) -> list[threading.Thread]:
        with self.lock:
            return [r.thread for r in self.jobs.values() if r.thread is not None]


class Intake:
    """The job queue (its own broker connection), the start call, and the jobs' threads."""

    def __init__(self, agent: IntakeOwner) -> None:
        self.agent = agent
        self.cfg = agent.cfg
        self.slots = agent.slots
        self.session = agent.session
        self.conn: Connection | None = None
        self._job_queue: Queue | None = None  # the job queue bound to self.conn's channel

    # --- the broker ------------------------------------------------------------------------------

    def new_connection(self) -> Connection:
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

    def connect(self) -> None:
        """The first connection: retried, then the topology declared on it."""
        agent = self.agent
        assert self.session.pilot_id is not None
        pilot_id = self.session.pilot_id
        conn = self.new_connection()
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
            agent.topology.declare(
                conn,
                queues=[
                    agent.topology.job_queue(agent.device_type),
                    agent.topology.command_queue(pilot_id),
                ],
            )
        except Exception as exc:  # kombu's and amqp's connection and channel errors
            with contextlib.suppress(Exception):
                conn.release()
            raise StartupError(f"broker {_hide(self.cfg.broker_url)}: {exc}") from exc
        self.conn = conn
        log.info(
            kv(
                "topology_declared",
                prefix=agent.topology.prefix,
                job_queue=agent.topology.job_queue_name(agent.device_type),
                command_queue=agent.topology.command_queue(pilot_id).name,
            )
        )

    def keep_alive(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.heartbeat_check()

    def get(self) -> Message | None:
        """One ``basic_get`` on the job queue, reconnecting after broker trouble."""
        agent = self.agent
        try:
            if self.conn is None:
                self.conn = self.new_connection()
                # every URL of a failover list once (one URL: tried twice)
                self.conn.ensure_connection(
                    max_retries=max(1, len(broker_urls(self.cfg.broker_url)) - 1)
                )
            channel = self.conn.default_channel
            queue = self._job_queue
            if queue is None or queue.channel is not channel:  # bound once per channel
                queue = self._job_queue = agent.topology.job_queue(agent.device_type)(channel)
            return queue.get(no_ack=False)
        except Exception as exc:  # connection/channel errors of kombu or amqp
            log.warning(kv("broker_get_failed", error=f"{type(exc).__name__}: {exc}"))
            self.drop_connection()
            agent.wait(min(5.0, self.cfg.poll_interval * 2))
            return None

    def drop_connection(self) -> None:
        conn, self.conn = self.conn, None
        self._job_queue = None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.release()

    def delete_command_queue(self) -> None:
        """The queue is this pilot's alone and the pilot id is never reused: leave no litter."""
        if self.session.pilot_id is None:
            return
        try:
            conn = self.conn or self.new_connection()
            self.conn = conn
            self.agent.topology.command_queue(self.session.pilot_id)(conn.default_channel).delete()
        except Exception as exc:  # the broker may be away; the queue is only litter then
            log.warning(kv("command_queue_delete_failed", error=exc))

    def _settle(self, message: Message, *, ack: bool) -> None:
        try:
            if ack:
                message.ack()
            else:
                message.reject(requeue=True)
        except Exception as exc:  # the broker will redeliver; the server's claim stays atomic
            log.warning(kv("message_settle_failed", ack=ack, error=exc))
            self.drop_connection()

    # --- one message -----------------------------------------------------------------------------

    def take(self, message: Message) -> float | None:
        """Start (or drop, or requeue) one message. Returns a truthy delay to back off after."""
        try:
            job = decode_job(message.body)
        except ContractError as exc:
            log.error(kv("job_message_malformed_dropped", error=exc, body=head(message.body)))
            self._settle(message, ack=True)
            return None
        context = {"job_uuid": job.job_uuid, "attempt": job.attempt}
        result = self.start(job)
        if result.outcome == OK:
            try:
                # the server's copy is the one to run; "v"/"kind" may be left out of it
                body = result.body if isinstance(result.body, dict) else {}
                to_run = decode_start_answer(body) if body else job
            except ContractError as exc:
                log.warning(kv("start_answer_not_a_job_message", **context, error=exc))
                to_run = job
            running = self.register_job(to_run)
            self._settle(message, ack=True)
            self.launch(running)
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
                self.agent.token_refused_by_wms(result)
                return None
            log.error(
                kv(
                    "job_start_rejected_dropped",
                    **context,
                    answer=result.describe(),
                    body=head(result.body),
                )
            )
            self._settle(message, ack=True)
            return None
        log.warning(kv("job_start_failed_requeued", **context, answer=result.describe()))
        self._settle(message, ack=False)
        return 1.0

    def start(self, job: JobMessage) -> ApiResult:
        """``POST start``; while its outcome is unknown (no answer, time-out, 5xx: the server
        may have started the job for this pilot) sent again with the same idempotency key,
        with backoff and jitter, up to ``start_retries`` more times. The server answers a
        start it already made with the same job message (docs/pilot-api.md)."""
        key = new_key()
        backoff = Backoff(0.5, 10.0)
        result = self.session.start(job, key)
        for _ in range(self.cfg.start_retries):
            if result.outcome != RETRY or self.agent.shutting_down:
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
            while not self.agent.shutting_down and (left := deadline - time.monotonic()) > 0:
                time.sleep(min(left, 0.25))
                self.keep_alive()  # the message stays unacked: keep the link alive
            result = self.session.start(job, key)
        return result

    # --- the job's slot and thread ---------------------------------------------------------------

    def register_job(self, job: JobMessage) -> RunningJob:
        agent = self.agent
        runner = JobRunner(
            job,
            work_root=agent.work_dir,
            grace_period=self.cfg.grace_period,
            stage_in=self.cfg.stage_in,
            storage_roots=self.cfg.storage_roots,
            sample_interval=agent.sample_interval,
            extra_env={"PATH": _job_path()},
            sandbox=agent.sandbox,
            guard=agent.guard,
        )
        running = RunningJob(job, runner)
        pending = self.slots.add(running)
        if pending is not None and pending[0] in (None, job.attempt):
            runner.kill(pending[1] or "kill_job command")
        if agent.shutting_down:
            runner.kill("pilot shutdown")
        return running

    def launch(self, running: RunningJob) -> None:
        log.info(
            kv(
                "job_started",
                job_uuid=running.job.job_uuid,
                attempt=running.job.attempt,
                task_id=running.job.task_id,
                executable=running.job.executable,
                running=len(self.slots.jobs),
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
            self.session.final_report(job, result)
            if result.log_staged and not self.cfg.keep_job_dirs:
                runner.cleanup()
        finally:
            self._release(running)

    def _release(self, running: RunningJob) -> bool:
        released = self.slots.release(running)
        if released:
            self.agent.wake()
        return released

    def free_stuck_slot(self, running: RunningJob, why: str) -> None:
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
            target=self.session.final_report,
            args=(running.job, result),
            name=f"stuck-{running.job.job_uuid[:8]}",
            daemon=True,
        ).start()


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
