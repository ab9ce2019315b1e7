"""No payload outlives its pilot (docs/pilot.md, "When the pilot dies").

Three pieces, Linux only (elsewhere the pilot says so in its log and runs without them):

The process side (``/proc``, marks, pid-safe signals) is ``pilots.agent.procs``.

- **The mark.** Every payload gets ``WMS_PAYLOAD_MARK=<run id>:<job uuid>:<attempt>`` in its
  environment (``<run id>``: random, new at every start of a pilot). Its descendants inherit it,
  also those that double-fork or call ``setsid`` to leave the job's session, so the processes
  of a job are found by reading ``/proc/*/environ``, whoever their parent is now.
- **The guardian**, :func:`guardian_main` (``python -m pilots.agent.guard``): a small process
  the pilot starts before it runs any job, in a session of its own (a signal to the pilot's
  process group does not reach it). The pilot writes it one line per payload started and ended
  on a pipe (its standard input). When the pipe reaches end of file the pilot is gone, however
  it died (``SIGKILL`` included, the kernel closes its end): the guardian kills every payload
  still there (the session of each, every process carrying a mark of this run), then exits.
  The pipe's end of file is the pilot's death certificate: unlike ``PR_SET_PDEATHSIG`` it does
  not fire when the *thread* that started the guardian ends, and it needs no signal handler.
- **The records.** ``<work_dir>/payloads/`` (mode 0700, the pilot's own: a payload cannot
  write there, so it cannot name a process it wants killed) holds one file per run
  (``run.<run id>.json``: the pilot id) and one per running payload
  (``<job uuid>.<attempt>.json``: pid, session, start time, mark), written atomically, removed
  when the payload ends. A pilot starting on a work directory (under its lock, so no other
  pilot uses it) reads the files of the runs before it (:meth:`PayloadGuard.scan_leftovers`),
  kills what is left of them and tells the server at registration.

A process is killed only if it proves it is the one recorded: the same pid *and* start time
(``/proc/<pid>/stat``, clock ticks since boot, same boot), or a member of the recorded session
while that session's leader is still the recorded process, or the mark in its own
environment. A pid reused by an unrelated process matches none of these. Signals go through a
pidfd opened before the last check where the kernel has them (``pidfd_send_signal``), so the
pid cannot be reused between the check and the kill either.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from pilots.agent.logs import kv, log
from pilots.agent.procs import (
    LINUX,
    MARK_VAR,
    ProcInfo,
    Target,
    boot_id,
    find,
    make_mark,
    new_run_id,
    parse_mark,
    proc_marks,
    proc_stat,
    signal_marked,
    terminate,
)

__all__ = [  # the process side lives in pilots.agent.procs; its names are found here too
    "MARK_VAR",
    "Orphan",
    "PayloadGuard",
    "ProcInfo",
    "Target",
    "find",
    "guardian_main",
    "make_mark",
    "parse_mark",
    "proc_marks",
    "proc_stat",
    "record_name",
    "signal_marked",
    "terminate",
    "write_json",
]

RECORDS_DIR = "payloads"
RECORD_VERSION = 1
MAX_REPORTED_PIDS = 1000  # per job, in the registration's ``orphans`` (the server's bound)


# --- records in the work directory ------------------------------------------------------------


def write_json(path: Path, data: dict[str, Any], *, durable: bool = True) -> None:
    """Atomically: a temporary file, fsync (if ``durable``), rename. A payload's record is
    not made durable: it is read only while the node runs (after a crash of the node its
    processes are gone with it, and the run file, durable, names the run)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        raw = json.dumps(data).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def record_name(job_uuid: str, attempt: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in job_uuid) or "_"
    return f"{safe}.{attempt}.json"


@dataclass
class Orphan:
    """What a dead pilot left of one job, found and killed at start-up."""

    job_uuid: str
    attempt: int
    pilot_id: int | None
    pids: list[int]

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_uuid": self.job_uuid,
            "attempt": self.attempt,
            "pilot_id": self.pilot_id,
            "pids": self.pids[:MAX_REPORTED_PIDS],
        }


# --- the pilot's side -------------------------------------------------------------------------


class PayloadGuard:
    """The pilot's handle on its guardian and its records (one per pilot run)."""

    def __init__(self, work_dir: Path, *, grace: float = 5.0, run_id: str | None = None) -> None:
        self.dir = Path(work_dir) / RECORDS_DIR
        self.grace = grace
        self.run_id = run_id or new_run_id()
        self.pilot_id: int | None = None
        self.boot_id = boot_id()
        self.enabled = LINUX
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._tracked: dict[str, dict[str, Any]] = {}  # mark -> the guardian's "add" line

    @property
    def run_file(self) -> Path:
        return self.dir / f"run.{self.run_id}.json"

    @property
    def guardian_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def prepare(self) -> None:
        """The records' directory, the pilot's own (0700)."""
        self.dir.mkdir(exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)

    def mark(self, job_uuid: str, attempt: int) -> str:
        return make_mark(self.run_id, job_uuid, attempt)

    # start and end of the pilot

    def start(self) -> bool:
        """Write this run's file and start the guardian. False (and a log line) where this
        cannot work: payloads then die with the pilot only if they end by themselves."""
        self._write_run_file()
        if not self.enabled:
            log.warning(
                kv(
                    "payload_guardian_unavailable",
                    platform=sys.platform,
                    effect="payloads are killed when the pilot exits normally, not if it is "
                    "killed (SIGKILL); no orphan scan at start-up (Linux only)",
                )
            )
            return False
        return self._start_guardian()

    def _start_guardian(self) -> bool:
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        argv = [sys.executable, "-m", "pilots.agent.guard", "--run-id", self.run_id]
        argv += ["--grace", str(self.grace), "--pilot-pid", str(os.getpid())]
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # a kill of the pilot's process group spares it
                close_fds=True,
                env=env,
            )
        except OSError as exc:
            log.error(kv("payload_guardian_not_started", error=exc))
            self._proc = None
            return False
        log.info(kv("payload_guardian_started", pid=self._proc.pid, run_id=self.run_id))
        return True

    def set_pilot_id(self, pilot_id: int) -> None:
        self.pilot_id = pilot_id
        with contextlib.suppress(OSError):
            self._write_run_file()

    def _write_run_file(self) -> None:
        write_json(
            self.run_file,
            {
                "v": RECORD_VERSION,
                "run_id": self.run_id,
                "pilot_id": self.pilot_id,
                "pilot_pid": os.getpid(),
                "boot_id": self.boot_id,
                "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )

    def close(self, timeout: float | None = None) -> None:
        """The pilot ends: the guardian's pipe closed (it kills what is left of this run's
        payloads, normally nothing, and exits), this run's file removed."""
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
            try:
                proc.wait(timeout if timeout is not None else self.grace + 15)
            except subprocess.TimeoutExpired:
                log.warning(kv("payload_guardian_slow_to_exit", pid=proc.pid))
        with contextlib.suppress(OSError):
            self.run_file.unlink()

    # one payload

    def launched(self, *, job_uuid: str, attempt: int, pid: int, mark: str) -> None:
        """A payload started: its record written, the guardian told."""
        info = proc_stat(pid) if self.enabled else None
        entry = {
            "op": "add",
            "mark": mark,
            "pid": pid,
            "sid": info.sid if info is not None else pid,
            "start": info.start if info is not None else None,
        }
        record = {
            "v": RECORD_VERSION,
            "job_uuid": job_uuid,
            "attempt": attempt,
            "pilot_id": self.pilot_id,
            "run_id": self.run_id,
            "mark": mark,
            "pid": pid,
            "sid": entry["sid"],
            "start": entry["start"],
            "boot_id": self.boot_id,
            "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        try:
            write_json(self.dir / record_name(job_uuid, attempt), record, durable=False)
        except OSError as exc:  # the mark still finds it; say why the record is missing
            log.warning(kv("payload_record_not_written", job_uuid=job_uuid, error=exc))
        with self._lock:
            self._tracked[mark] = entry
            self._tell(entry)

    def ended(self, *, job_uuid: str, attempt: int, mark: str) -> None:
        with self._lock:
            self._tracked.pop(mark, None)
            self._tell({"op": "del", "mark": mark})
        with contextlib.suppress(FileNotFoundError):
            (self.dir / record_name(job_uuid, attempt)).unlink()

    def _tell(self, entry: dict[str, Any]) -> None:
        """One line to the guardian (under self._lock); a guardian found dead is restarted
        and told every payload running now."""
        if self._proc is None:
            return
        try:
            self._write(self._proc.stdin, entry)
            return
        except (OSError, ValueError) as exc:
            log.warning(kv("payload_guardian_gone_restarting", pid=self._proc.pid, error=exc))
        with contextlib.suppress(OSError, ValueError):
            assert self._proc.stdin is not None
            self._proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(1)
        self._proc = None
        if not self._start_guardian() or self._proc is None:
            return
        try:
            for tracked in self._tracked.values():
                self._write(self._proc.stdin, tracked)
        except (OSError, ValueError) as exc:
            log.error(kv("payload_guardian_unreachable", error=exc))

    @staticmethod
    def _write(pipe: IO[bytes] | None, entry: dict[str, Any]) -> None:
        if pipe is None:
            raise ValueError("no pipe")
        pipe.write(json.dumps(entry).encode() + b"\n")
        pipe.flush()

    # leftovers of the runs before

    def scan_leftovers(self) -> list[Orphan]:
        """Kill what pilots that ran on this work directory before left running (called under
        the work directory's lock, before this run starts any payload). One log line per job;
        the files of those runs are removed. Returns what to tell the server."""
        if not self.dir.is_dir():
            return []
        runs: dict[str, int | None] = {}  # run id -> its pilot id
        records: list[dict[str, Any]] = []
        for path in sorted(self.dir.glob("*.json")):
            data = _read_json(path)
            if path.name.startswith("run."):
                if data is not None and data.get("run_id") != self.run_id:
                    runs[str(data.get("run_id"))] = _int_or_none(data.get("pilot_id"))
                elif data is None:
                    path.unlink(missing_ok=True)
                continue
            if data is None or data.get("run_id") == self.run_id:
                continue
            records.append(data)
        if not runs and not records:
            return []
        if not self.enabled:
            log.warning(kv("orphan_scan_unavailable", platform=sys.platform, records=len(records)))
            return []
        same_boot = {r["run_id"] for r in records if r.get("boot_id") == self.boot_id}
        targets: list[Target] = []
        jobs: dict[tuple[str, int], int | None] = {}  # (job uuid, attempt) -> pilot id
        for r in records:
            uuid, attempt = str(r.get("job_uuid", "")), _int_or_none(r.get("attempt"))
            mark = str(r.get("mark", ""))
            if not uuid or attempt is None or parse_mark(mark) is None:
                continue
            pilot_id = _int_or_none(r.get("pilot_id"))
            jobs[(uuid, attempt)] = pilot_id or runs.get(str(r.get("run_id")))
            if r.get("run_id") in same_boot:  # after a reboot a pid means nothing any more
                pid, sid, start = (_int_or_none(r.get(k)) for k in ("pid", "sid", "start"))
                targets.append(Target(mark, pid=pid, sid=sid, start=start))
            else:
                targets.append(Target(mark))
        run_of_record = {str(r.get("run_id")) for r in records}
        for run_id in {*runs, *run_of_record}:
            if run_id and run_id != "None":
                targets.append(Target(f"{run_id}:"))
        exclude = [self.guardian_pid] if self.guardian_pid else []
        killed = terminate(targets, grace=self.grace, exclude=exclude)
        by_job: dict[tuple[str, int], list[int]] = {}
        for mark, pids in killed.items():
            parsed = parse_mark(mark)
            if parsed is None:
                continue
            run_id, uuid, attempt = parsed
            by_job.setdefault((uuid, attempt), []).extend(pids)
            jobs.setdefault((uuid, attempt), runs.get(run_id))
        orphans = []
        for (uuid, attempt), pilot_id in sorted(jobs.items()):
            pids = sorted(set(by_job.get((uuid, attempt), [])))
            orphans.append(Orphan(uuid, attempt, pilot_id, pids))
            if pids:
                log.warning(
                    kv(
                        "orphan_payload_killed",
                        job_uuid=uuid,
                        attempt=attempt,
                        pids=",".join(map(str, pids)),
                        previous_pilot_id=pilot_id,
                    )
                )
            else:
                log.info(
                    kv(
                        "orphan_payload_record_nothing_left",
                        job_uuid=uuid,
                        attempt=attempt,
                        previous_pilot_id=pilot_id,
                    )
                )
        for path in self.dir.glob("*.json"):
            data = _read_json(path)
            if data is None or data.get("run_id") != self.run_id:
                path.unlink(missing_ok=True)
        for path in self.dir.glob(".*.tmp"):  # a write the dead pilot did not finish
            path.unlink(missing_ok=True)
        return orphans


# --- the guardian process ---------------------------------------------------------------------


def guardian_main(argv: Sequence[str] | None = None) -> int:
    """``python -m pilots.agent.guard --run-id R --grace S --pilot-pid P``: read the pilot's
    lines until end of file, then kill every payload of run R that is left, and exit."""
    from pilots.agent import logs
    from pilots.agent.sandbox import make_undumpable

    parser = argparse.ArgumentParser(prog="wms-pilot-guardian")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--pilot-pid", type=int, default=0)
    args = parser.parse_args(argv)
    make_undumpable()
    logs.setup("INFO")
    # it outlives what kills the pilot: signals to the pilot's group, a SIGTERM meant for the
    # pilot (``pkill -f pilots.agent`` matches this command line too); SIGKILL still ends it
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    tracked: dict[str, Target] = {}
    for line in sys.stdin.buffer:
        try:
            entry = json.loads(line)
            mark = str(entry["mark"])
            if entry["op"] == "add":
                tracked[mark] = Target(
                    mark,
                    pid=_int_or_none(entry.get("pid")),
                    sid=_int_or_none(entry.get("sid")),
                    start=_int_or_none(entry.get("start")),
                )
            else:
                tracked.pop(mark, None)
        except (ValueError, KeyError, TypeError):
            continue
    # end of file: the pilot is gone (or closed the pipe on its way out)
    targets = [*tracked.values(), Target(f"{args.run_id}:")]
    exclude = [args.pilot_pid] if args.pilot_pid else []
    killed = terminate(targets, grace=args.grace, exclude=exclude)
    for mark, pids in sorted(killed.items()):
        parsed = parse_mark(mark)
        log.warning(
            kv(
                "guardian_killed_payload",
                job_uuid=parsed[1] if parsed else mark,
                attempt=parsed[2] if parsed else "-",
                pids=",".join(map(str, pids)),
                pilot_pid=args.pilot_pid,
                run_id=args.run_id,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(guardian_main())
