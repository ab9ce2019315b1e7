"""Running one attempt of one job: work directory, stage-in, the process tree, monitoring, kill,
stage-out. Blocking; the agent runs each in a thread of its own.

The job's conventions (docs/pilot.md):

- a fresh work directory ``<work_dir>/jobs/<job_uuid>.<attempt>/``, the job's current directory;
- the executable with its shlex-split args, in its own session and process group
  (``start_new_session=True``), so a kill reaches every process it started;
- stdout and stderr into the log ``<job_uuid>.<attempt>.log`` in the work directory;
- a clean environment, never the pilot's (:class:`~pilots.agent.sandbox.PayloadSandbox`):
  ``PATH``, ``HOME`` and ``TMPDIR`` (the work directory), ``LANG``, ``USER``, the GPU and
  locale variables the pilot has, the names the site lists, plus ``WMS_JOB_UUID``,
  ``WMS_ATTEMPT``, ``WMS_TASK_ID``, ``WMS_INPUT_FILES`` (JSON list of local paths),
  ``WMS_OUTPUT_DIR`` (``<workdir>/outputs``: every file written there is an output),
  ``WMS_JOB_DIR``, ``WMS_JOB_MODE``, ``WMS_DEVICE_TYPE``;
- under the payload account and inside the container runtime the site configured, if any;
- at the end every file under ``outputs/`` gets its size and adler32 checksum and is copied to
  ``<output_url>/<job_uuid>/<name>``; the log to ``<output_url>/<job_uuid>/<attempt>/<log>``
  (``pilots.agent.staging``, which also holds :class:`JobResult` and the error codes).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

import psutil

from pilots.agent import __version__
from pilots.agent.guard import MARK_VAR, PayloadGuard, signal_marked
from pilots.agent.logs import kv, log
from pilots.agent.procs import PidClock, pid_clock
from pilots.agent.sandbox import PayloadSandbox
from pilots.agent.staging import (
    EXEC_FAILED,
    FAILED,
    FINISHED,
    KILLED,
    NONZERO_EXIT,
    STAGE_IN_FAILED,
    STAGE_IN_REFUSED,
    STAGE_OUT_FAILED,
    STAGE_OUT_REFUSED,
    JobResult,
    StageError,
    Stager,
    StageRefused,
    copy_with_checksum,
    local_path,
    note,
    open_inside,
    safe_name,
)
from wms.contract import JobMessage

__all__ = [  # what the runner's callers take from here (the staging names among them)
    "EXEC_FAILED",
    "FAILED",
    "FINISHED",
    "KILLED",
    "NONZERO_EXIT",
    "STAGE_IN_FAILED",
    "STAGE_IN_REFUSED",
    "STAGE_OUT_FAILED",
    "STAGE_OUT_REFUSED",
    "JobResult",
    "JobRunner",
    "StageError",
    "StageRefused",
    "copy_with_checksum",
    "local_path",
    "open_inside",
]

MB = 1024 * 1024
#: longest wait between two looks at a kill request where the runner cannot be woken at once
#: (no pidfd): the kill latency
KILL_CHECK = 0.1


def _exit_code(returncode: int) -> int:
    """A signal death (Popen's -N) as the shell writes it: 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


# --- the runner -------------------------------------------------------------------------------


class JobRunner:
    def __init__(
        self,
        job: JobMessage,
        *,
        work_root: str | Path,
        grace_period: float = 30.0,
        stage_in: str = "inplace",
        sample_interval: float = 1.0,
        extra_env: dict[str, str] | None = None,
        sandbox: PayloadSandbox | None = None,
        storage_roots: tuple[str, ...] = (),
        guard: PayloadGuard | None = None,
    ) -> None:
        self.job = job
        # the pilot's guardian and records (pilots/agent/guard.py): the payload carries a mark
        # in its environment, is recorded in the work dir while it runs, and dies with the pilot
        self.guard = guard
        self.mark = guard.mark(job.job_uuid, job.attempt) if guard is not None else ""
        self.sandbox = sandbox or PayloadSandbox()
        self.grace_period = grace_period
        self.sample_interval = sample_interval
        self.extra_env = extra_env or {}
        self.dir = Path(work_root) / "jobs" / f"{safe_name(job.job_uuid)}.{job.attempt}"
        self.inputs_dir = self.dir / "inputs"
        self.outputs_dir = self.dir / "outputs"
        self.log_name = f"{safe_name(job.job_uuid)}.{job.attempt}.log"
        self.log_path = self.dir / self.log_name
        self.stager = Stager(
            job,
            job_dir=self.dir,
            log_name=self.log_name,
            stage_in=stage_in,
            storage_roots=storage_roots,
        )

        self._lock = threading.RLock()
        self._kill = threading.Event()
        self._kill_reason = ""
        self._proc: subprocess.Popen | None = None
        self._seen: dict[int, psutil.Process] = {}
        self._started = 0.0
        self._ended = 0.0
        self._log_ident: tuple[int, int] = (0, 0)
        self._clock: PidClock | None = None  # the pid allocator just before the payload
        self._wake_fd: int | None = None  # written by kill(): wakes the watch at once
        self._cpu_time = 0.0
        self._rss = 0
        self._max_rss = 0

    # --- called from other threads -------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def ended(self) -> bool:
        """The process has exited (stage-out and the final report may still be on their way)."""
        return bool(self._ended)

    @property
    def kill_requested(self) -> bool:
        return self._kill.is_set()

    def kill(self, reason: str = "") -> None:
        """Ask for the kill: SIGTERM to the process group now, SIGKILL after the grace period."""
        with self._lock:
            if not self._kill.is_set():
                self._kill_reason = reason or "killed by the pilot"
                self._kill.set()
                if self._wake_fd is not None:
                    with contextlib.suppress(OSError):
                        os.eventfd_write(self._wake_fd, 1)

    def metrics(self) -> dict[str, Any]:
        with self._lock:
            end = self._ended or (time.monotonic() if self._started else 0.0)
            return {
                "cpu_time": round(self._cpu_time, 3),
                "rss_mb": round(self._rss / MB, 3),
                "max_rss_mb": round(self._max_rss / MB, 3),
                "wall_time": round(end - self._started, 3) if self._started else 0.0,
            }

    # --- the attempt, start to end -------------------------------------------------------------

    def run(self) -> JobResult:
        try:
            self.dir.mkdir()  # <work_dir>/jobs/ is the agent's: it exists
        except FileExistsError:  # a crashed run's: not this attempt's
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir()
        except FileNotFoundError:
            self.dir.mkdir(parents=True)
        if self.stager.stage_in_mode == "copy":  # inputs/ holds copies only
            self.inputs_dir.mkdir()
        self.outputs_dir.mkdir()
        self.stager.real_dir = self.dir.resolve()  # before the payload runs (it may move things)
        with open(self.log_path, "ab", buffering=0) as logfh:
            st = os.fstat(logfh.fileno())
            self._log_ident = (st.st_dev, st.st_ino)
            result = self._run(logfh)
            self.stager.stage_out(result, logfh)
            note(
                logfh,
                f"end state={result.state} exit_code={result.exit_code} "
                f"error_code={result.error_code or '-'} metrics={json.dumps(result.metrics)}",
            )
        self.stager.stage_out_log(result, self._log_ident)
        return result

    def _run(self, logfh: IO[bytes]) -> JobResult:
        job = self.job
        note(
            logfh,
            f"wms-pilot {__version__} on {socket.gethostname()}: job {job.job_uuid} "
            f"attempt {job.attempt} task {job.task_id} mode {job.mode}",
        )
        if self._kill.is_set():
            return self._failed(KILLED, f"killed before it started: {self._kill_reason}", logfh)
        try:
            inputs = self.stager.stage_in(logfh)
        except StageRefused as exc:
            log.warning(kv("stage_in_refused", job_uuid=job.job_uuid, error=exc))
            return self._failed(STAGE_IN_REFUSED, f"stage-in refused: {exc}", logfh)
        except (StageError, OSError) as exc:
            return self._failed(STAGE_IN_FAILED, f"stage-in failed: {exc}", logfh)
        try:
            argv = [job.executable, *shlex.split(job.args)]
        except ValueError as exc:
            return self._failed(EXEC_FAILED, f"cannot split args {job.args!r}: {exc}", logfh)
        job_vars = {
            "WMS_JOB_UUID": job.job_uuid,
            "WMS_ATTEMPT": str(job.attempt),
            "WMS_TASK_ID": str(job.task_id),
            "WMS_JOB_MODE": job.mode,
            "WMS_DEVICE_TYPE": job.device_type,
            "WMS_INPUT_FILES": json.dumps(inputs),
            "WMS_OUTPUT_DIR": str(self.outputs_dir),
            "WMS_JOB_DIR": str(self.dir),
        }
        if self.mark:
            job_vars[MARK_VAR] = self.mark
        sandbox = self.sandbox
        env = sandbox.process_environment(sandbox.environment(self.dir, job_vars, self.extra_env))
        argv = sandbox.command(argv, job_dir=self.dir, inputs=inputs)
        try:
            sandbox.hand_over(self.dir)
        except OSError as exc:
            return self._failed(EXEC_FAILED, f"cannot hand the work dir over: {exc}", logfh)
        note(logfh, f"command: {shlex.join(argv)}")
        note(logfh, f"inputs: {json.dumps(inputs)}")
        note(logfh, "--- job output below ---")
        with self._lock:
            if self._kill.is_set():
                return self._failed(KILLED, f"killed before it started: {self._kill_reason}", logfh)
            # every process of the job is born after this: the kill of what it left behind
            # looks at those only (pilots.agent.procs.born_since), not at every process
            self._clock = pid_clock() if self.mark else None
            try:
                self._proc = subprocess.Popen(
                    argv,
                    cwd=self.dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=logfh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    **sandbox.popen_kwargs(),
                )
            except OSError as exc:
                return self._failed(
                    EXEC_FAILED, f"cannot execute {job.executable!r}: {exc.strerror or exc}", logfh
                )
            self._started = time.monotonic()
            if self.guard is not None:
                self.guard.launched(
                    job_uuid=job.job_uuid, attempt=job.attempt, pid=self._proc.pid, mark=self.mark
                )
        log.info(
            kv(
                "job_process_started",
                job_uuid=job.job_uuid,
                attempt=job.attempt,
                pid=self._proc.pid,
                command=shlex.join(argv),
            )
        )
        try:
            returncode = self._watch(self._proc)
        finally:
            if self.guard is not None:  # every process of the job is dead by now
                self.guard.ended(job_uuid=job.job_uuid, attempt=job.attempt, mark=self.mark)
        note(logfh, "--- job output above ---")
        metrics = self.metrics()
        if self._kill.is_set():
            how = f"exit code {returncode}" if returncode >= 0 else _signal_name(returncode)
            return self._failed(
                KILLED, f"{self._kill_reason} ({how})", logfh, _exit_code(returncode), metrics
            )
        if returncode == 0:
            return JobResult(FINISHED, exit_code=0, metrics=metrics)
        why = (
            f"exit code {returncode}"
            if returncode > 0
            else f"killed by {_signal_name(returncode)} (not by the pilot)"
        )
        return self._failed(NONZERO_EXIT, why, logfh, _exit_code(returncode), metrics)

    def _failed(
        self,
        code: str,
        message: str,
        logfh: IO[bytes],
        exit_code: int | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> JobResult:
        note(logfh, f"FAILED {code}: {message}")
        return JobResult(
            FAILED,
            exit_code=exit_code,
            error_code=code,
            error_message=message,
            metrics=metrics if metrics is not None else self.metrics(),
        )

    # --- watching the process tree -------------------------------------------------------------

    def _watch(self, proc: subprocess.Popen) -> int:
        """Wait for the process (reaped with wait4 for the tree's exact CPU time), sampling
        its tree and obeying a kill request. Returns Popen's return code (-N: signal N)."""
        pid = proc.pid
        waiter = _ExitWaiter.open(pid, self)
        try:
            returncode, rusage = self._watch_loop(pid, waiter)
        finally:
            if waiter is not None:
                waiter.close(self)
        proc.returncode = returncode  # reaped here: tell Popen, or it would wait for nothing
        with self._lock:
            self._ended = time.monotonic()
            if rusage is not None:
                self._cpu_time = max(self._cpu_time, rusage.ru_utime + rusage.ru_stime)
                self._max_rss = max(self._max_rss, rusage.ru_maxrss * 1024)  # Linux: KiB
        # what the job left behind (daemons, background children) goes with it
        self._signal_tree(pid, signal.SIGKILL)
        return returncode

    def _watch_loop(self, pid: int, waiter: _ExitWaiter | None) -> tuple[int, Any]:
        term_at = kill_at = None
        # the first sample after one interval, not at the start: a walk of the process tree
        # costs ~2 ms of CPU (psutil reads every process of the node), and a job that ends
        # sooner is measured exactly by wait4 (CPU time, max RSS) anyway; at the start the
        # tree is the freshly exec'd process alone
        next_sample = time.monotonic() + self.sample_interval
        poll = 0.005  # without a pidfd: doubled up to KILL_CHECK, a short job seen within ms
        while True:
            try:
                done, status, rusage = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: should not happen
                done, status, rusage = pid, 0, None
            now = time.monotonic()
            if done:
                return os.waitstatus_to_exitcode(status), rusage
            if now >= next_sample:
                self._sample(pid)
                next_sample = now + self.sample_interval
            if self._kill.is_set():
                if term_at is None:
                    term_at = now
                    log.info(
                        kv(
                            "job_kill_sigterm",
                            job_uuid=self.job.job_uuid,
                            pid=pid,
                            reason=self._kill_reason,
                            grace=self.grace_period,
                        )
                    )
                    self._sample(pid)  # see every member before signalling them
                    self._signal_tree(pid, signal.SIGTERM)
                elif kill_at is None and now - term_at >= self.grace_period:
                    kill_at = now
                    log.warning(kv("job_kill_sigkill", job_uuid=self.job.job_uuid, pid=pid))
                    self._sample(pid)
                    self._signal_tree(pid, signal.SIGKILL)
                if waiter is not None:
                    waiter.wait(0.05, wake=False)
                else:
                    time.sleep(0.05)
            elif waiter is not None:
                # woken by the exit (pidfd), a kill (eventfd) or the next sample
                waiter.wait(max(0.0, next_sample - now), wake=True)
            else:
                self._kill.wait(min(poll, max(0.0, next_sample - now)))
                poll = min(KILL_CHECK, poll * 2)

    def _sample(self, pid: int) -> None:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        cpu = 0.0
        rss = 0
        for p in procs:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    mem = p.memory_info().rss
            except psutil.Error:
                continue
            self._seen.setdefault(p.pid, p)
            cpu += t.user + t.system + t.children_user + t.children_system
            rss += mem
        with self._lock:
            self._cpu_time = max(self._cpu_time, cpu)
            self._rss = rss
            self._max_rss = max(self._max_rss, rss)

    def _signal_tree(self, pid: int, sig: int) -> None:
        """The process group (the job's session), every member of the tree seen so far (one
        that left the group with setsid is still reached), and every process carrying the
        job's mark (one that double-forked away before it was seen)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        for p in list(self._seen.values()):
            with contextlib.suppress(psutil.Error):
                if p.pid != pid and p.is_running():  # is_running: not a recycled pid
                    p.send_signal(sig)
        if self.mark:
            signal_marked(self.mark, sig, since=self._clock)

    def cleanup(self) -> None:
        """Remove the work directory (called once the report is spooled, if the log is safe)."""
        try:  # the usual case, an empty outputs/ and no inputs/: three calls, without rmtree
            self.log_path.unlink()
            self.outputs_dir.rmdir()
            self.dir.rmdir()
        except OSError:  # anything else in it (outputs, scratch files, staged-in inputs)
            shutil.rmtree(self.dir, ignore_errors=True)


class _ExitWaiter:
    """Sleeps until a payload exits (its pidfd becomes readable) or the runner is asked to
    kill it (an eventfd :meth:`JobRunner.kill` writes): no polling, a short job is seen
    ending at once (Linux >= 5.3; elsewhere the runner polls)."""

    def __init__(self, pidfd: int, wake_fd: int) -> None:
        self.pidfd = pidfd
        self.wake_fd = wake_fd
        self.poller = select.poll()
        self.poller.register(pidfd, select.POLLIN)
        self.poller.register(wake_fd, select.POLLIN)
        self.woken = False

    @classmethod
    def open(cls, pid: int, runner: JobRunner) -> _ExitWaiter | None:
        if not (hasattr(os, "pidfd_open") and hasattr(os, "eventfd")):
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # an old kernel, or a seccomp filter: poll
            return None
        try:
            wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except OSError:
            os.close(pidfd)
            return None
        waiter = cls(pidfd, wake_fd)
        with runner._lock:
            runner._wake_fd = wake_fd
            if runner._kill.is_set():  # asked before the fd was there
                os.eventfd_write(wake_fd, 1)
        return waiter

    def wait(self, seconds: float, *, wake: bool) -> None:
        """Until the exit, ``seconds``, or (``wake``) a kill request."""
        if not wake and not self.woken:  # the kill is being handled: its fd stays readable
            self.poller.unregister(self.wake_fd)
            self.woken = True
        self.poller.poll(max(1, int(seconds * 1000 + 0.999)))

    def close(self, runner: JobRunner) -> None:
        with runner._lock:
            runner._wake_fd = None
        os.close(self.pidfd)
        os.close(self.wake_fd)
