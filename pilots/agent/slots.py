"""The pilot's slots: the jobs running here (at most ``slots``), the kills ordered for jobs not
(yet) here, and the jobs that ended here. The intake (``pilots.agent.intake``) fills them."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from pilots.agent.logs import kv, log
from pilots.agent.runner import JobRunner
from wms.contract import JobMessage

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
