"""Taking jobs: the job queue, starting jobs at the WMS, and the jobs' threads.

When slots are free the main loop (``pilots.agent.agent``) asks :meth:`Intake.get_batch` for
job messages for them (``basic_get`` while the queue holds some, once more after
``start_gather``; reconnecting after broker trouble) and :meth:`Intake.take_many` starts them:
decode (a malformed one is acked and dropped; the same message twice, or one whose attempt
runs here, too), ``POST start`` for one message or ``POST /pilots/{id}/starts/`` for several,
and only then ack each by its own answer. Started → ack and run it in a thread of its own;
refused (409, other 4xx) → ack and drop; 5xx or no answer → the same call again with the same
idempotency key (``start_retries`` times, backoff with jitter: the server answers a start it
already made with the same job message), then reject with requeue and back off; a batched
call refused as a whole (a server without it) → one ``start`` per message. So at most
``slots`` jobs run, and no message stays unacked longer than one call and its retries.

:class:`~pilots.agent.slots.Slots` (``pilots/agent/slots.py``) holds the running jobs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kombu import Connection, Queue
from kombu.message import Message

from pilots.agent.client import CONFLICT, OK, REJECTED, RETRY, ApiResult, Backoff, new_key
from pilots.agent.logs import kv, log
from pilots.agent.runner import FAILED, JobResult, JobRunner
from pilots.agent.session import StartupError, head
from pilots.agent.slots import RunningJob, Slots
from pilots.agent.watchdog import SLOT_STUCK
from wms.contract import (
    ContractError,
    JobMessage,
    decode_job,
    decode_start_answer,
    decode_starts_answer,
)
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

    def get_batch(self, limit: int) -> list[Message]:
        """Up to ``limit`` messages for the free slots: what the queue holds now, then, when
        that is fewer, once more after ``start_gather`` seconds (a few milliseconds: a lone
        job is not delayed noticeably, a burst is started in one call)."""
        batch: list[Message] = []
        for round_ in range(2):
            while len(batch) < limit:
                message = self.get()
                if message is None:
                    break
                batch.append(message)
            if not batch or len(batch) >= limit or round_ or self.cfg.start_gather <= 0:
                break
            if self.conn is None:  # broker trouble: start what is here
                break
            time.sleep(self.cfg.start_gather)
        return batch

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
        return self.take_many([message])

    def take_many(self, messages: list[Message]) -> float | None:
        """Start (or drop, or requeue) the messages taken for the free slots: one of them
        with ``POST /jobs/{uuid}/start/``, several in one ``POST /pilots/{id}/starts/``.
        Returns a truthy delay to back off after."""
        taken: list[tuple[Message, JobMessage]] = []
        for message in messages:
            try:
                job = decode_job(message.body)
            except ContractError as exc:
                log.error(kv("job_message_malformed_dropped", error=exc, body=head(message.body)))
                self._settle(message, ack=True)
                continue
            if self._here_already(job, taken):
                # the same message delivered twice (the executor published it again): the
                # attempt runs here (or is being started here) already
                log.info(
                    kv("job_message_duplicate_dropped", job_uuid=job.job_uuid, attempt=job.attempt)
                )
                self._settle(message, ack=True)
                continue
            taken.append((message, job))
        if not taken:
            return None
        if len(taken) == 1:
            return self.take_one(*taken[0])
        return self._take_several(taken)

    def _here_already(self, job: JobMessage, taken: list[tuple[Message, JobMessage]]) -> bool:
        with self.slots.lock:
            running = self.slots.jobs.get(job.job_uuid)
        if running is not None and running.job.attempt == job.attempt:
            return True
        return any(t.job_uuid == job.job_uuid and t.attempt == job.attempt for _, t in taken)

    def _take_several(self, taken: list[tuple[Message, JobMessage]]) -> float | None:
        jobs = [job for _, job in taken]
        result = self._with_retries(
            lambda key: self.session.starts(jobs, key),
            what={"starts": len(jobs), "first_job_uuid": jobs[0].job_uuid},
        )
        if result.outcome == OK:
            try:
                answers = decode_starts_answer(
                    result.body if isinstance(result.body, dict) else {}, len(jobs)
                )
            except ContractError as exc:
                log.error(kv("starts_answer_malformed_requeued", starts=len(jobs), error=exc))
                for message, _ in taken:
                    self._settle(message, ack=False)
                return 1.0
            to_launch: list[RunningJob] = []
            requeued = False
            for (message, job), answer in zip(taken, answers, strict=True):
                context = {"job_uuid": job.job_uuid, "attempt": job.attempt}
                if answer.ok:
                    to_launch.append(self.register_job(answer.job or job))
                    self._settle(message, ack=True)
                elif answer.error == "pilot_not_live":
                    log.warning(kv("job_start_refused_pilot_not_live_requeued", **context))
                    self._settle(message, ack=False)
                    requeued = True
                else:
                    log.info(
                        kv(
                            "job_start_refused_dropped",
                            **context,
                            answer=f"409 {answer.error}: {answer.detail}",
                        )
                    )
                    self._settle(message, ack=True)
            for running in to_launch:
                self.launch(running)
            return 1.0 if requeued else None
        if result.outcome == CONFLICT and result.error == "pilot_not_live":
            log.warning(kv("job_starts_refused_pilot_not_live_requeued", starts=len(jobs)))
            for message, _ in taken:
                self._settle(message, ack=False)
            return 1.0
        if result.outcome in (CONFLICT, REJECTED) and result.status not in (401, 403):
            # refused as a whole (an old server without the call, a body it cannot read):
            # each message on its own, as one start each
            log.warning(
                kv("job_starts_refused_one_by_one", starts=len(jobs), answer=result.describe())
            )
            delays = [self.take_one(message, job) for message, job in taken]
            return max((d for d in delays if d), default=None)
        if result.outcome == REJECTED:
            log.error(
                kv("starts_unauthorized_requeued", starts=len(jobs), answer=result.describe())
            )
            for message, _ in taken:
                self._settle(message, ack=False)
            self.agent.token_refused_by_wms(result)
            return None
        log.warning(kv("job_starts_failed_requeued", starts=len(jobs), answer=result.describe()))
        for message, _ in taken:
            self._settle(message, ack=False)
        return 1.0

    def take_one(self, message: Message, job: JobMessage) -> float | None:
        """Start (or drop, or requeue) one decoded message."""
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
        """``POST start`` with its retries (:meth:`_with_retries`)."""
        return self._with_retries(
            lambda key: self.session.start(job, key),
            what={"job_uuid": job.job_uuid, "attempt": job.attempt},
        )

    def _with_retries(self, call: Callable[[str], ApiResult], what: dict[str, Any]) -> ApiResult:
        """A start call; while its outcome is unknown (no answer, time-out, 5xx: the server
        may have started the jobs for this pilot) sent again with the same idempotency key,
        with backoff and jitter, up to ``start_retries`` more times. The server answers a
        start it already made with the same job message (docs/pilot-api.md)."""
        key = new_key()
        backoff = Backoff(0.5, 10.0)
        result = call(key)
        for _ in range(self.cfg.start_retries):
            if result.outcome != RETRY or self.agent.shutting_down:
                break
            delay = backoff.next()
            log.warning(
                kv("job_start_retry", **what, answer=result.describe(), wait=f"{delay:.1f}")
            )
            deadline = time.monotonic() + delay
            while not self.agent.shutting_down and (left := deadline - time.monotonic()) > 0:
                time.sleep(min(left, 0.25))
                self.keep_alive()  # the messages stay unacked: keep the link alive
            result = call(key)
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
        thread = threading.Thread(
            target=self._run_job,
            args=(running,),
            name=f"job-{running.job.job_uuid[:8]}",
            daemon=True,
        )
        thread.start()
        # Only a started thread is shown to the watchdog: one not started yet is not alive,
        # and would be taken for a job thread that ended without freeing its slot.
        running.thread = thread

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
