"""The heartbeat thread: what the pilot tells the WMS every ``heartbeat_interval``.

A heartbeat names the pilot's state, its host's metrics, the attempts it runs (with their
metrics) and those whose final report waits in the spool (``reporting``: the WMS neither fails
them as gone nor reconciles them away), and acknowledges the commands executed. Its answer may
change the interval and carry commands. After an answered heartbeat, the running jobs due for
one get a ``running`` report. While the WMS does not answer, a growing backoff (jittered, so
pilots do not all come back in step), at most twice the interval.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Protocol

from pilots.agent import host
from pilots.agent.client import RETRY, Backoff
from pilots.agent.logs import kv, log
from wms.contract import HeartbeatBody, HeartbeatJob, HeartbeatReply

if TYPE_CHECKING:
    from pathlib import Path

    from pilots.agent.client import ApiResult
    from pilots.agent.commands import CommandDispatcher
    from pilots.agent.config import PilotConfig
    from pilots.agent.intake import Intake
    from pilots.agent.session import Session
    from pilots.agent.slots import RunningJob, Slots


class HeartbeatOwner(Protocol):
    """What the heartbeat needs of the agent that owns it (``pilots.agent.agent.Agent``): a
    protocol, so that the parts do not import the whole (no circle of imports)."""

    cfg: PilotConfig
    session: Session
    slots: Slots
    intake: Intake
    dispatcher: CommandDispatcher | None
    work_dir: Path

    @property
    def state(self) -> str: ...

    def token_refused_by_wms(self, result: ApiResult) -> None: ...


MAX_REPORTING = 5_000  # spooled reports named in a heartbeat (the WMS takes 10,000 at most)


class Heartbeat:
    """The heartbeat thread of one agent, and its interval (the server's answer wins)."""

    def __init__(self, agent: HeartbeatOwner) -> None:
        self.agent = agent
        self.interval = agent.cfg.heartbeat_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set_interval(self, value: Any) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            self.interval = float(value)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="pilot-heartbeat", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread; wait for it ``timeout`` seconds if given."""
        self._stop.set()
        if timeout is not None and self._thread is not None:
            self._thread.join(timeout)

    # --- one heartbeat ---------------------------------------------------------------------------

    def body(self) -> HeartbeatBody:
        agent = self.agent
        jobs = agent.slots.running()
        # After the running jobs, not before: a job's report is spooled before the job leaves
        # its slot, so every attempt is named in one list or the other.
        reporting = agent.session.reporting()
        slots, done = agent.cfg.slots, agent.slots.done
        metrics = host.metrics(agent.work_dir)
        metrics.update(running_jobs=len(jobs), slots=slots, jobs_done=done)
        state = agent.state
        return HeartbeatBody(
            state=state,
            status=f"{state}: {len(jobs)}/{slots} slots busy, {done} done",
            metrics=metrics,
            jobs=[_job_metrics(r) for r in jobs],
            acked_commands=agent.dispatcher.pending_acks() if agent.dispatcher else [],
            # left out if too long: a partial list would mislead
            reporting=reporting if len(reporting) <= MAX_REPORTING else None,
        )

    def beat(self) -> bool:
        """One heartbeat; False when the WMS did not answer it (the loop then backs off).

        Neither an unreachable WMS nor a ``lost`` state in the answer stops the pilot: its jobs
        run on, their reports wait in the spool, and the WMS reconciles them when it hears
        from the pilot again. Only a refused token (401/403) or a command does."""
        agent = self.agent
        sent = self.body()
        result = agent.session.heartbeat(sent)
        if result.ok:
            reply = HeartbeatReply.from_dict(result.body)
            assert agent.dispatcher is not None
            agent.dispatcher.confirm_acks(sent.acked_commands)
            self.set_interval(reply.heartbeat_interval)
            for item in reply.commands:
                agent.dispatcher.handle_raw(item, "heartbeat")
            log.debug(kv("heartbeat_sent", state=sent.state, jobs=len(sent.jobs)))
            return True
        if result.status in (401, 403):
            log.error(kv("heartbeat_unauthorized", answer=result.describe()))
            agent.token_refused_by_wms(result)
            return True
        log.warning(kv("heartbeat_failed", answer=result.describe()))
        return result.outcome != RETRY

    def _loop(self) -> None:
        """Every ``interval``; while the WMS does not answer, with a growing backoff
        (jittered, so pilots do not all come back in step), at most twice the interval."""
        backoff = Backoff(1.0, 60.0)
        while not self._stop.is_set():
            answered = True
            try:
                answered = self.beat()
            except Exception as exc:  # the heartbeat thread must live on
                log.exception(kv("heartbeat_loop_error", error=exc))
            if answered:
                backoff.reset()
                wait = self.interval
            else:
                backoff.first = max(0.5, min(self.interval / 4, 5.0))
                backoff.maximum = max(backoff.first, 2 * self.interval)
                wait = backoff.next()
                log.info(kv("heartbeat_backoff", wait=f"{wait:.1f}"))
            self._stop.wait(wait)


def _job_metrics(running: RunningJob) -> HeartbeatJob:
    m = running.runner.metrics()
    return HeartbeatJob(
        job_uuid=running.job.job_uuid,
        attempt=running.job.attempt,
        cpu_time=m["cpu_time"],
        rss_mb=m["rss_mb"],
        wall_time=m["wall_time"],
        max_rss_mb=m["max_rss_mb"],
    )
