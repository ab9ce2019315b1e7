"""The pilot agent's own CPU per job, in one process: the per-job machinery without the WMS.

    .venv/bin/python benchmarks/agent_job.py [N] [--payload true] [--slots 4] [--inputs 1]
                                            [--log-level INFO] [--profile FILE] [--only MODE]

N jobs (default 2000) go through what a pilot does with each once the WMS has started it
(``pilots.agent.intake``'s job thread): a :class:`~pilots.agent.runner.JobRunner` as the
intake builds it (the pilot's sandbox, its guardian and records, the job's ``PATH``), its
``run()`` (work directory, stage-in of the inputs in place, the payload in its own process
group, its watch, stage-out of the log with its checksum), the ``job_ended`` line, the final
report spooled (``Session.final_report``: written, fsync'd, renamed) and sent by the spool's
sender thread (``ReportSender``: alone, or with the reports that wait with it in one
``events`` call) to a stand-in WMS (``tests/pilots/agent/fakewms.py``) in a process of its
own, and the work directory removed.

Twice: the N jobs one after the other in the main thread (``serial``), then in ``--slots``
threads at once (``slots``). Not included: the job queue (``basic_get``, ack) and the
``start`` call, the heartbeats, the command consumer (the intake's and the agent's share).

For each it prints the CPU per job of the agent (``time.process_time``, every thread of this
process) plus its children (``RUSAGE_CHILDREN``: the payloads, reaped by the runner) plus the
guardian's (read from ``/proc``; the stand-in WMS is not counted), the wall time per job, and
the floor: ``subprocess.run([payload])`` N times in the same run, measured the same way, and
the ratio of the two. ``--profile FILE`` writes a cProfile of the serial run (the main thread;
the sender thread is not in it) and prints its top functions.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import logging
import os
import pstats
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pilots.agent import logs  # noqa: E402
from pilots.agent.config import PilotConfig  # noqa: E402
from pilots.agent.guard import PayloadGuard  # noqa: E402
from pilots.agent.intake import _job_path  # noqa: E402
from pilots.agent.logs import kv, log  # noqa: E402
from pilots.agent.runner import JobRunner  # noqa: E402
from pilots.agent.sandbox import PayloadSandbox  # noqa: E402
from pilots.agent.session import Session  # noqa: E402
from tests.pilots.agent.fakewms import REGISTER_TOKEN  # noqa: E402
from wms.contract import InputFile, JobMessage  # noqa: E402

FAKE_WMS = """
import sys, time
sys.path.insert(0, {root!r})
from tests.pilots.agent.fakewms import FakeWMS
fake = FakeWMS().start()
fake.calls = type("Nothing", (list,), {{"append": lambda self, x: None}})()  # keep no calls
print(fake.url, flush=True)
sys.stdin.read()
"""


@dataclass
class Cost:
    cpu: float  # seconds: this process + its reaped children + the guardian
    children: float
    wall: float
    guardian: float = 0.0
    thread: float = 0.0  # the CPU of the thread that ran the jobs (serial run only)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def pid_cpu(pid: int | None) -> float:
    if not pid:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    def __init__(self, guardian: int | None = None) -> None:
        self.guardian = guardian

    def __enter__(self) -> Meter:
        self._t = time.perf_counter()
        self._p = time.process_time()
        self._c = children_cpu()
        self._g = pid_cpu(self.guardian)
        return self

    def __exit__(self, *exc: object) -> None:
        children = children_cpu() - self._c
        own = time.process_time() - self._p
        guard = pid_cpu(self.guardian) - self._g
        self.cost = Cost(own + children + guard, children, time.perf_counter() - self._t, guard)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, url: str) -> None:
        self.args = args
        self.work = work
        self.storage = work / "storage"
        self.storage.mkdir()
        inputs_dir = work / "data"
        inputs_dir.mkdir()
        self.inputs = []
        for i in range(args.inputs):
            path = inputs_dir / f"in{i}.dat"
            path.write_bytes(b"x" * 1000)
            self.inputs.append(
                InputFile(name=path.name, dataset_uid="bench", url=path.as_uri(), size=1000)
            )
        self.roots = (inputs_dir.resolve().as_uri() + "/",)
        self.agent_dir = work / "agent"
        (self.agent_dir / "jobs").mkdir(parents=True)
        cfg = PilotConfig(
            server_url=url,
            register_token=REGISTER_TOKEN,
            hostname="bench",
            work_dir=str(self.agent_dir),
            http_timeout=10.0,
            register_retries=3,
        )
        self.session = Session(cfg)
        self.session.open_spool()
        self.session.register([], threading.Event())
        self.guard = PayloadGuard(self.agent_dir, grace=1.0)
        self.guard.prepare()
        self.guard.start()
        self.guard.set_pilot_id(self.session.pilot_id or 0)
        self.sandbox = PayloadSandbox()
        exe, *rest = shlex.split(args.payload)
        self.executable, self.args_text = shutil.which(exe) or exe, shlex.join(rest)
        self.path = _job_path()
        assert self.session.sender is not None
        self.session.sender.start()
        self.failed = 0

    def job(self) -> JobMessage:
        return JobMessage(
            job_uuid=str(uuid.uuid4()),
            attempt=0,
            task_id=1,
            executable=self.executable,
            args=self.args_text,
            device_type="cpu",
            mode="map",
            inputs=self.inputs,
            output_url=self.storage.as_uri() + "/",
            output_dataset_uid=str(uuid.uuid4()),
            server_url=self.session.cfg.server_url,
        )

    def one(self) -> None:
        """One job as ``Intake.register_job`` + ``Intake._run_job`` do it."""
        job = self.job()
        runner = JobRunner(
            job,
            work_root=self.agent_dir,
            grace_period=30.0,
            stage_in="inplace",
            storage_roots=self.roots,
            sample_interval=1.0,
            extra_env={"PATH": self.path},
            sandbox=self.sandbox,
            guard=self.guard,
        )
        log.info(kv("job_started", job_uuid=job.job_uuid, attempt=0, task_id=1, executable="x"))
        result = runner.run()
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
        if result.state != "finished":
            self.failed += 1
            if self.failed == 1:
                print(f"  a job failed: {result.error_code} {result.error_message}")
        self.session.final_report(job, result)
        if result.log_staged:
            runner.cleanup()

    def drain(self) -> None:
        """Wait until the sender has sent every spooled report."""
        deadline = time.monotonic() + 60
        while self.session.spooled() and time.monotonic() < deadline:
            time.sleep(0.002)
        if self.session.spooled():
            sys.exit("the reports were not sent within 60 s")

    def serial(self, n: int, profile: cProfile.Profile | None = None) -> Cost:
        with Meter(self.guard.guardian_pid) as m:
            t0 = time.thread_time()
            if profile is not None:
                profile.enable()
            for _ in range(n):
                self.one()
            if profile is not None:
                profile.disable()
            thread = time.thread_time() - t0
            self.drain()
        m.cost.thread = thread
        return m.cost

    def slots(self, n: int, slots: int) -> Cost:
        left = [n]
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                self.one()

        with Meter(self.guard.guardian_pid) as m:
            threads = [threading.Thread(target=worker) for _ in range(slots)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.drain()
        return m.cost

    def close(self) -> None:
        self.session.close()
        self.guard.close()


def floor(n: int, payload: str) -> Cost:
    argv = [shutil.which(a) or a for a in shlex.split(payload)[:1]] + shlex.split(payload)[1:]
    with Meter() as m:
        for _ in range(n):
            subprocess.run(argv, stdout=subprocess.DEVNULL, check=False)
    return m.cost


def line(name: str, n: int, cost: Cost, base: Cost) -> str:
    per = cost.cpu / n * 1000
    return (
        f"  {name:<8} CPU {per:6.2f} ms/job (children {cost.children / n * 1000:.2f}),"
        f" wall {cost.wall / n * 1000:6.2f} ms/job, {per / (base.cpu / n * 1000):4.1f}x the floor"
        f"\n           of which guardian {cost.guardian / n * 1000:.2f}"
        + (
            f", the jobs' thread {cost.thread / n * 1000:.2f}, the other threads (the sender)"
            f" {(cost.cpu - cost.children - cost.guardian - cost.thread) / n * 1000:.2f}"
            if cost.thread
            else ""
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, nargs="?", default=2000)
    parser.add_argument("--payload", default="true", help="the job's command (default: true)")
    parser.add_argument("--slots", type=int, default=4, help="threads of the slots run (4)")
    parser.add_argument("--inputs", type=int, default=1, help="input files a job (1, in place)")
    parser.add_argument("--log-level", default="INFO", help="the agent's (INFO; to /dev/null)")
    parser.add_argument("--profile", help="cProfile of the serial run into this file")
    parser.add_argument("--only", choices=("serial", "slots"), help="one of the two runs")
    parser.add_argument("--json", action="store_true", help="one JSON line of the figures too")
    args = parser.parse_args()

    logs.setup(args.log_level, stream=open(os.devnull, "w"))  # noqa: SIM115
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    fake = subprocess.Popen(
        [sys.executable, "-c", FAKE_WMS.format(root=str(ROOT))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert fake.stdout is not None and fake.stdin is not None
    url = fake.stdout.readline().strip()
    with tempfile.TemporaryDirectory(prefix="agent-job-") as tmp:
        bench = Bench(args, Path(tmp), url)
        try:
            for _ in range(min(50, args.n)):  # warm up: imports, the HTTP connection, caches
                bench.one()
            bench.drain()
            n = args.n
            base = floor(n, args.payload)
            figures = {"floor": base.cpu / n * 1000}
            print(f"agent_job.py {n} jobs of {args.payload!r}, {args.inputs} input(s) a job")
            print(
                f"  floor    CPU {base.cpu / n * 1000:6.2f} ms/job (children "
                f"{base.children / n * 1000:.2f}), wall {base.wall / n * 1000:6.2f} ms/job"
                f" (subprocess.run)"
            )
            # CPU of the main thread (not wall time): what each function costs the agent
            profile = cProfile.Profile(time.thread_time) if args.profile else None
            if args.only in (None, "serial"):
                cost = bench.serial(n, profile)
                figures["serial"] = cost.cpu / n * 1000
                print(line("serial", n, cost, base))
            if args.only in (None, "slots"):
                cost = bench.slots(n, args.slots)
                figures[f"slots{args.slots}"] = cost.cpu / n * 1000
                print(line(f"{args.slots} slots", n, cost, base))
            if args.json:
                print(json.dumps({k: round(v, 3) for k, v in figures.items()}))
            if profile is not None:
                profile.dump_stats(args.profile)
                out = io.StringIO()
                pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(30)
                print(out.getvalue())
        finally:
            with contextlib.suppress(Exception):
                bench.close()
            fake.stdin.close()
            fake.wait(5)


if __name__ == "__main__":
    main()
