"""The slot watchdog: no job slot of the pilot hangs for ever (docs/pilot.md, "Time-outs").

A job's slot is held by its thread (``Agent._run_job``): stage-in, the payload, stage-out, the
final report spooled. The payload may run as long as it likes (it is killed only by a
command, a shutdown, or its pilot's end), but what the pilot does around it must end:

- the job's thread is dead while the job still holds its slot;
- the payload has not started ``stuck_after`` seconds after the job did (stage-in hangs: a
  hung file system, a lock);
- the payload ended ``stuck_after`` seconds ago and the thread has not finished (stage-out
  or the report blocks).

Such a slot is **stuck**: the watchdog logs it (``slot_stuck``) and hands it to ``free``, which
kills what may still run of the job, takes the job off the pilot's slots and spools a final
``failed`` report with error code ``slot_stuck``. If the thread wakes up later, its own final
report replaces the spooled one if that one was not sent yet; else the server keeps the first
(``report_conflict``). The watchdog runs in a thread of its own and never blocks on a job.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Generic, Protocol, TypeVar

from pilots.agent.logs import kv, log

SLOT_STUCK = "slot_stuck"


class Watched(Protocol):
    """What the watchdog reads of a running job (``agent.RunningJob``)."""

    job: Any
    runner: Any
    thread: threading.Thread | None
    started: float


W = TypeVar("W", bound=Watched)


class SlotWatchdog(Generic[W]):
    def __init__(
        self,
        jobs: Callable[[], Iterable[W]],
        free: Callable[[W, str], None],
        *,
        stuck_after: float,
        interval: float | None = None,
    ) -> None:
        self.jobs = jobs
        self.free = free
        self.stuck_after = stuck_after
        self.interval = interval if interval is not None else max(0.2, min(10.0, stuck_after / 4))
        self._ended_at: dict[int, float] = {}  # id(running job) -> when its payload was seen ended
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def why_stuck(self, running: W, now: float) -> str | None:
        """Why this job's slot is stuck, or None."""
        thread = running.thread
        if thread is not None and not thread.is_alive():
            return "its job thread ended without freeing the slot"
        runner = running.runner
        if runner.ended:
            seen = self._ended_at.setdefault(id(running), now)
            if now - seen >= self.stuck_after:
                return f"its payload ended {now - seen:.0f}s ago; stage-out or report blocks"
        elif runner.pid is None and now - running.started >= self.stuck_after:
            return f"its payload has not started {now - running.started:.0f}s after the job"
        return None

    def check(self, now: float | None = None) -> int:
        """One pass: frees the stuck slots; returns how many."""
        now = time.monotonic() if now is None else now
        jobs = list(self.jobs())
        alive = {id(r) for r in jobs}
        for gone in set(self._ended_at) - alive:
            del self._ended_at[gone]
        freed = 0
        for running in jobs:
            why = self.why_stuck(running, now)
            if why is None:
                continue
            log.error(
                kv(
                    SLOT_STUCK,
                    job_uuid=running.job.job_uuid,
                    attempt=running.job.attempt,
                    reason=why,
                )
            )
            self._ended_at.pop(id(running), None)
            try:
                self.free(running, why)
                freed += 1
            except Exception as exc:  # the watchdog must live on
                log.exception(kv("slot_free_failed", job_uuid=running.job.job_uuid, error=exc))
        return freed

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception as exc:  # keep watching whatever one pass hits
                log.exception(kv("watchdog_pass_failed", error=exc))

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pilot-watchdog", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
