"""The slot watchdog (``pilots.agent.watchdog``): a job slot whose thread is stuck around its
payload (stage-in, stage-out, the report) or dead is freed, and its attempt reported failed."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from pilots.agent.staging import Stager
from pilots.agent.watchdog import SLOT_STUCK, SlotWatchdog
from tests.pilots.agent.fakewms import wait_until
from tests.pilots.agent.test_agent import publish_job


@dataclass
class FakeRunner:
    pid: int | None = None
    ended: bool = False


@dataclass
class Slot:
    runner: FakeRunner
    thread: threading.Thread | None = None
    started: float = 0.0
    job: Any = field(default_factory=lambda: type("J", (), {"job_uuid": "j", "attempt": 0})())


def alive_thread() -> threading.Thread:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    thread.stop = stop  # type: ignore[attr-defined]
    return thread


def test_what_is_stuck_and_what_is_not():
    freed: list[tuple[Slot, str]] = []
    running_payload = Slot(FakeRunner(pid=10), alive_thread(), started=0.0)
    staging_in = Slot(FakeRunner(pid=None), alive_thread(), started=0.0)
    staging_out = Slot(FakeRunner(pid=11, ended=True), alive_thread(), started=0.0)
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    dead_thread = Slot(FakeRunner(pid=12), dead, started=0.0)
    slots = [running_payload, staging_in, staging_out, dead_thread]
    dog = SlotWatchdog(lambda: slots, lambda s, why: freed.append((s, why)), stuck_after=60)

    assert dog.check(now=10.0) == 1  # the dead thread at once; the others are young
    assert freed[0][0] is dead_thread
    slots.remove(dead_thread)
    assert dog.check(now=59.0) == 0  # the payload's end is first seen at 10 s
    assert dog.check(now=65.0) == 1 and freed[1][0] is staging_in  # 65 s after its start
    slots.remove(staging_in)
    assert dog.check(now=69.0) == 0
    assert dog.check(now=70.0) == 1 and freed[2][0] is staging_out  # 60 s after its end
    slots.remove(staging_out)
    assert dog.check(now=10_000.0) == 0  # a payload may run as long as it likes
    for slot in (running_payload, staging_in, staging_out):
        slot.thread.stop.set()  # type: ignore[union-attr]


def test_a_stuck_stage_out_frees_the_slot_and_reports_slot_stuck(
    bus, fake_wms, agent_config, start_agent, outdir, monkeypatch
):
    """The payload ended but its stage-out blocks (a hung file system): after
    ``slot_stuck_after`` the slot is freed, the attempt reported failed (``slot_stuck``), and
    the next job runs in that slot."""
    release = threading.Event()
    stage_out = Stager.stage_out
    first: list[str] = []

    def blocking_stage_out(self, result, logfh):
        if not first:
            first.append(self.job.job_uuid)
            release.wait(30)
        return stage_out(self, result, logfh)

    monkeypatch.setattr(Stager, "stage_out", blocking_stage_out)
    running = start_agent(agent_config, slots=1, slot_stuck_after=1.0)
    stuck = publish_job(bus, fake_wms, outdir, "write", "a=1")
    wait_until(lambda: first)
    after = publish_job(bus, fake_wms, outdir, "write", "b=2")

    (report,) = wait_until(lambda: fake_wms.final_reports(stuck.job_uuid), timeout=15)
    assert report.body["state"] == "failed" and report.body["error_code"] == SLOT_STUCK
    (next_report,) = wait_until(lambda: fake_wms.final_reports(after.job_uuid), timeout=15)
    assert next_report.body["state"] == "finished"  # the freed slot took the next job
    assert stuck.job_uuid not in running.agent.jobs

    release.set()  # the stuck thread wakes: its own report follows, the slot is not freed twice
    wait_until(lambda: len(fake_wms.final_reports(stuck.job_uuid)) == 2, timeout=15)
    running.stop()
    assert running.agent.jobs_done == 2
