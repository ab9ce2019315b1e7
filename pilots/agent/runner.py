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
  ``<output_url>/<job_uuid>/<name>``; the log to ``<output_url>/<job_uuid>/<attempt>/<log>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

import psutil

from pilots.agent import __version__
from pilots.agent.guard import MARK_VAR, PayloadGuard, signal_marked
from pilots.agent.logs import kv, log
from pilots.agent.sandbox import PayloadSandbox
from wms.checksums import bytes_checksum_stream, is_valid
from wms.contract import JobMessage
from wms.locations import LocationError, canonical_url, is_under, name_problem

FINISHED = "finished"
FAILED = "failed"

# error codes of a failed attempt (the server stores them as they are)
NONZERO_EXIT = "nonzero_exit"
EXEC_FAILED = "exec_failed"
KILLED = "killed"
STAGE_IN_FAILED = "stage_in_failed"
STAGE_OUT_FAILED = "stage_out_failed"
# the pilot's own rules on where data may live (docs/pilot.md, "Where data may live")
STAGE_IN_REFUSED = "stage_in_refused"  # an input outside the storage roots
STAGE_OUT_REFUSED = "stage_out_refused"  # an output escaping the job's directory or output URL

CHUNK = 1 << 20
MB = 1024 * 1024


class StageError(Exception):
    """A file could not be brought in or out; the message says which and why."""


class StageRefused(StageError):
    """A file the pilot refuses to bring in or out: it lies where data may not come from or
    go to (outside the storage roots, a symlink out of the job's directory, a place outside
    the job's output URL)."""


@dataclass
class JobResult:
    state: str  # finished | failed
    exit_code: int | None = None
    error_code: str = ""
    error_message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    log_staged: bool = False

    def report(self, attempt: int) -> dict[str, Any]:
        """The body of ``POST /jobs/{uuid}/report/`` (StatusEvent without pilot_id)."""
        return {
            "attempt": attempt,
            "state": self.state,
            "exit_code": self.exit_code,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "metrics": self.metrics,
            "outputs": self.outputs,
        }


# --- URLs and paths ---------------------------------------------------------------------------


def local_path(url: str, what: str) -> Path:
    """The local path of a ``file://`` URL or a plain path; anything else is a StageError."""
    if not url:
        raise StageError(f"{what}: no URL")
    parsed = urlparse(url)
    if parsed.scheme == "":
        return Path(url).expanduser().absolute()
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StageError(f"{what}: {url} names another host ({parsed.netloc})")
        return Path(unquote(parsed.path))
    raise StageError(
        f"{what}: URL scheme {parsed.scheme!r} is not supported by this pilot "
        f"(only file:// URLs and local paths): {url}"
    )


def _real_root(root: str) -> str:
    """A canonical ``file://`` root with its symlinks resolved (canonical again)."""
    return canonical_url(Path(unquote(urlparse(root).path)).resolve().as_uri())


def copy_with_checksum(
    src: Path, dst: Path, algorithm: str = "adler32", *, fin: IO[bytes] | None = None
) -> tuple[int, str]:
    """Copy ``src`` to ``dst`` (through a temporary file and a rename), reading it once;
    returns (size, checksum of the content). ``fin``: ``src`` already opened (by
    :func:`open_inside`), read instead of opening ``src`` by its name."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.part")
    size = 0
    try:
        with fin or open(src, "rb") as fin, open(tmp, "wb") as fout:

            def chunks() -> Iterator[bytes]:
                nonlocal size
                for chunk in iter(lambda: fin.read(CHUNK), b""):
                    fout.write(chunk)
                    size += len(chunk)
                    yield chunk

            checksum = bytes_checksum_stream(chunks(), algorithm)
            fout.flush()
            os.fsync(fout.fileno())
            os.chmod(tmp, stat.S_IMODE(os.fstat(fin.fileno()).st_mode))
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if dst.stat().st_size != size:
        raise OSError(f"{dst}: {dst.stat().st_size} bytes written, {size} read")
    return size, checksum


def open_inside(top: Path, path: Path) -> IO[bytes]:
    """Open the regular file ``path``, which lies under the directory ``top``, following no
    symlink on the way: each folder is opened relative to the one before with ``O_NOFOLLOW``
    and the file itself too. A payload still running (or a process it left) that swaps a
    folder or the file for a link after the pilot looked cannot make the pilot read
    elsewhere (``StageRefused``)."""
    try:
        parts = path.relative_to(top).parts
    except ValueError as exc:
        raise StageRefused(f"{path} is not under {top}") from exc
    if not parts:
        raise StageRefused(f"{path} is the job's directory, not a file")
    nofollow = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    dirfd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            try:
                nextfd = os.open(part, nofollow | os.O_DIRECTORY, dir_fd=dirfd)
            except OSError as exc:
                raise StageRefused(f"{path}: {part} is not a folder of the job: {exc}") from exc
            os.close(dirfd)
            dirfd = nextfd
        try:
            # O_NONBLOCK: a FIFO put in the file's place must not hang the pilot
            fd = os.open(parts[-1], nofollow | os.O_NONBLOCK, dir_fd=dirfd)
        except OSError as exc:
            raise StageRefused(f"{path} cannot be opened without following a link: {exc}") from exc
    finally:
        os.close(dirfd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StageRefused(f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _exit_code(returncode: int) -> int:
    """A signal death (Popen's -N) as the shell writes it: 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "_"


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
        # canonical URL prefixes inputs may come from (besides the job's own output URL)
        self.storage_roots = tuple(storage_roots)
        self.grace_period = grace_period
        self.stage_in_mode = stage_in
        self.sample_interval = sample_interval
        self.extra_env = extra_env or {}
        self.dir = Path(work_root) / "jobs" / f"{_safe(job.job_uuid)}.{job.attempt}"
        self.inputs_dir = self.dir / "inputs"
        self.outputs_dir = self.dir / "outputs"
        self.log_name = f"{_safe(job.job_uuid)}.{job.attempt}.log"
        self.log_path = self.dir / self.log_name
        self._real_dir: Path | None = None

        self._lock = threading.RLock()
        self._kill = threading.Event()
        self._kill_reason = ""
        self._proc: subprocess.Popen | None = None
        self._seen: dict[int, psutil.Process] = {}
        self._started = 0.0
        self._ended = 0.0
        self._log_ident: tuple[int, int] = (0, 0)
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
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        self.inputs_dir.mkdir(parents=True)
        self.outputs_dir.mkdir()
        self._real_dir = self.dir.resolve()  # before the payload runs (it may move things)
        with open(self.log_path, "ab", buffering=0) as logfh:
            st = os.fstat(logfh.fileno())
            self._log_ident = (st.st_dev, st.st_ino)
            result = self._run(logfh)
            self._stage_out(result, logfh)
            self._note(
                logfh,
                f"end state={result.state} exit_code={result.exit_code} "
                f"error_code={result.error_code or '-'} metrics={json.dumps(result.metrics)}",
            )
        self._stage_out_log(result)
        return result

    def _note(self, logfh: IO[bytes], text: str) -> None:
        logfh.write(f"[wms-pilot {_now()}] {text}\n".encode())

    def _run(self, logfh: IO[bytes]) -> JobResult:
        job = self.job
        self._note(
            logfh,
            f"wms-pilot {__version__} on {socket.gethostname()}: job {job.job_uuid} "
            f"attempt {job.attempt} task {job.task_id} mode {job.mode}",
        )
        if self._kill.is_set():
            return self._failed(KILLED, f"killed before it started: {self._kill_reason}", logfh)
        try:
            inputs = self._stage_in(logfh)
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
        self._note(logfh, f"command: {shlex.join(argv)}")
        self._note(logfh, f"inputs: {json.dumps(inputs)}")
        self._note(logfh, "--- job output below ---")
        with self._lock:
            if self._kill.is_set():
                return self._failed(KILLED, f"killed before it started: {self._kill_reason}", logfh)
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
        self._note(logfh, "--- job output above ---")
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
        self._note(logfh, f"FAILED {code}: {message}")
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
        term_at = kill_at = None
        # the first sample after one interval, not at the start: a walk of the process tree
        # costs ~2 ms of CPU (psutil reads every process of the node), and a job that ends
        # sooner is measured exactly by wait4 (CPU time, max RSS) anyway; at the start the
        # tree is the freshly exec'd process alone
        next_sample = time.monotonic() + self.sample_interval
        poll = 0.005  # doubled up to 0.1 s: a short job is seen ending within a few ms
        while True:
            try:
                done, status, rusage = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: should not happen
                done, status, rusage = pid, 0, None
            now = time.monotonic()
            if done:
                break
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
                time.sleep(0.05)
            else:
                self._kill.wait(poll)
                poll = min(0.1, poll * 2)
        returncode = os.waitstatus_to_exitcode(status)
        proc.returncode = returncode  # reaped here: tell Popen, or it would wait for nothing
        with self._lock:
            self._ended = time.monotonic()
            if rusage is not None:
                self._cpu_time = max(self._cpu_time, rusage.ru_utime + rusage.ru_stime)
                self._max_rss = max(self._max_rss, rusage.ru_maxrss * 1024)  # Linux: KiB
        # what the job left behind (daemons, background children) goes with it
        self._signal_tree(pid, signal.SIGKILL)
        return returncode

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
            signal_marked(self.mark, sig)

    # --- files in and out ----------------------------------------------------------------------

    def _place(self) -> str:
        """The job's output URL, canonical; one that cannot be read is refused."""
        try:
            return canonical_url(self.job.output_url)
        except LocationError as exc:
            raise StageRefused(f"output_url {self.job.output_url!r}: {exc}") from exc

    def _input_source(self, url: str, what: str) -> Path:
        """The local path of an input, once the pilot's rules allow it: its URL, and the file
        it really is (symlinks followed), under a storage root or the job's own output URL
        (a merge job reads its task's outputs); else ``StageRefused``."""
        if not url:
            raise StageError(f"{what}: no URL")
        try:
            canonical = canonical_url(url)
            place = self._place()
        except LocationError as exc:
            raise StageRefused(f"{what}: {url}: {exc}") from exc
        roots = (*self.storage_roots, place)
        if not any(is_under(canonical, r) for r in roots):
            raise StageRefused(
                f"{what}: {url} is not under the pilot's storage roots "
                f"({', '.join(self.storage_roots) or 'none configured'}) nor the job's "
                f"output URL"
            )
        src = local_path(url, what)
        real = src.resolve()
        # the roots as they really are too (a root may itself be reached through a link)
        real_roots = [*roots, *(_real_root(r) for r in roots if r.startswith("file:///"))]
        if not any(is_under(canonical_url(real.as_uri()), r) for r in real_roots):
            raise StageRefused(f"{what}: {src} is a link to {real}, outside the storage roots")
        return real

    def _stage_in(self, logfh: IO[bytes]) -> list[str]:
        paths: list[str] = []
        used: set[str] = set()
        for i, f in enumerate(self.job.inputs):
            what = f"input {f.name!r}"
            src = self._input_source(f.url, what)
            if not src.is_file() or not os.access(src, os.R_OK):
                raise StageError(f"{what}: {src} is not a readable file")
            if self.stage_in_mode != "copy":
                paths.append(str(src))
                continue
            name = _safe(f.name)
            if name in used:
                name = f"{i}.{name}"
            used.add(name)
            dst = self.inputs_dir / name
            algorithm = f.check_sum.split(":", 1)[0] if is_valid(f.check_sum) else "adler32"
            size, checksum = copy_with_checksum(src, dst, algorithm)
            if f.size and size != f.size:
                raise StageError(f"{what}: {size} bytes copied, the catalogue says {f.size}")
            if is_valid(f.check_sum) and checksum != f.check_sum:
                raise StageError(f"{what}: checksum {checksum}, the catalogue says {f.check_sum}")
            self._note(logfh, f"stage-in: {src} -> {dst} ({size} bytes, {checksum})")
            paths.append(str(dst))
        return paths

    def _output_root(self) -> Path:
        self._place()  # an output URL that cannot be normalised is refused
        return local_path(self.job.output_url, "output_url")

    def _destination(self, root: Path, name: str) -> Path:
        """Where an output (or the log) goes: ``root/name``, which must lie under the job's
        output URL, as written and as it really is (no link in the way); else refused."""
        problem = name_problem(name)
        if problem is not None:
            raise StageRefused(f"output {name!r}: {problem}")
        dst = root / name
        place = self._place()
        if not is_under(canonical_url(dst.as_uri()), place):
            raise StageRefused(f"output {name!r}: {dst} is not under the job's output URL")
        top = self._output_root().resolve()

        def inside(path: Path) -> bool:
            return path == top or top in path.parents

        # before making any folder: the deepest one that exists must not lead elsewhere
        existing = dst.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        real = existing.resolve()
        if not (inside(real) or real in top.parents):
            raise StageRefused(f"output {name!r}: {existing} leads out of the job's output URL")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not inside(dst.parent.resolve() / dst.name) or dst.is_symlink():
            raise StageRefused(f"output {name!r}: {dst} leads out of the job's output URL")
        return dst

    def _open_in_job(self, path: Path) -> IO[bytes]:
        """``path`` (under the job's directory, as named or as resolved) opened for reading
        without following any link (:func:`open_inside`)."""
        top = self._real_dir or self.dir.resolve()
        if top not in path.parents:
            try:  # named through the directory as configured, which may itself be a link
                path = top / path.relative_to(self.dir)
            except ValueError as exc:
                raise StageRefused(f"{path} is not in the job's directory") from exc
        return open_inside(top, path)

    def _output_files(self) -> list[tuple[str, Path]]:
        """(name, the file to copy) for every file under ``outputs/``, symlinks never
        followed out of the job's directory: a link to a file inside it is copied as that
        file, a link to a directory inside it is not entered, a link leading out of it (or
        dangling) is refused (``StageRefused``)."""
        top = self._real_dir or self.dir.resolve()
        if self.outputs_dir.is_symlink() or self.outputs_dir.resolve().parent != top:
            raise StageRefused(f"{self.outputs_dir} was replaced by a link out of the job's dir")
        found: list[tuple[str, Path]] = []
        for dirpath, dirnames, filenames in os.walk(self.outputs_dir, followlinks=False):
            base = Path(dirpath)
            for entry in [*dirnames, *filenames]:
                path = base / entry
                if not path.is_symlink():
                    if entry in filenames and path.is_file():
                        found.append((path.relative_to(self.outputs_dir).as_posix(), path))
                    continue
                real = path.resolve()
                name = path.relative_to(self.outputs_dir).as_posix()
                if top not in real.parents or not real.exists():
                    raise StageRefused(
                        f"output {name!r} is a symlink to {real}, outside the job's directory"
                    )
                if real.is_file():
                    found.append((name, real))
        return sorted(found)

    def _stage_out(self, result: JobResult, logfh: IO[bytes]) -> None:
        """Outputs of a finished attempt to ``<output_url>/<job_uuid>/<name>``. A failed
        attempt's outputs are left in its work directory: they are not results."""
        if result.state != FINISHED:
            return
        try:
            files = self._output_files()
            root = self._output_root() / _safe(self.job.job_uuid)
            for name, path in files:
                dst = self._destination(root, name)
                fin = self._open_in_job(path)
                size, checksum = copy_with_checksum(path, dst, fin=fin)
                url = dst.as_uri()
                entry = {"name": name, "type": "output", "size": size, "check_sum": checksum}
                result.outputs.append({**entry, "url": url})
                self._note(logfh, f"stage-out: {name} -> {url} ({size} bytes, {checksum})")
        except StageRefused as exc:
            self._refused(result, exc)
            self._note(logfh, f"FAILED {STAGE_OUT_REFUSED}: {exc}")
        except (StageError, OSError) as exc:
            result.state = FAILED
            result.error_code = STAGE_OUT_FAILED
            result.error_message = f"stage-out failed: {exc}"
            result.outputs = []
            self._note(logfh, f"FAILED {STAGE_OUT_FAILED}: {exc}")

    def _refused(self, result: JobResult, exc: StageRefused) -> None:
        """A stage-out the pilot's rules refuse fails the attempt, with no outputs."""
        log.warning(kv("stage_out_refused", job_uuid=self.job.job_uuid, error=exc))
        result.state = FAILED
        result.error_code = STAGE_OUT_REFUSED
        result.error_message = f"stage-out refused: {exc}"
        result.outputs = []

    def _stage_out_log(self, result: JobResult) -> None:
        """The log to ``<output_url>/<job_uuid>/<attempt>/<log>``, whatever the state; if that
        fails the log stays in the work directory (kept) and the report says where."""
        try:
            # the payload may own the work dir: the pilot copies the file it wrote, nothing
            # the payload put in its place (a symlink to a file of the pilot's)
            replaced = StageRefused(f"{self.log_path} was replaced by the job: not copied")
            try:
                fin = self._open_in_job(self.log_path)
            except StageRefused as exc:
                raise replaced from exc
            with fin:
                st = os.fstat(fin.fileno())
                if (st.st_dev, st.st_ino) != self._log_ident:
                    raise replaced
                root = self._output_root() / _safe(self.job.job_uuid)
                target = self._destination(root, f"{self.job.attempt}/{self.log_name}")
                dst = target.parent
                size, checksum = copy_with_checksum(self.log_path, target, fin=fin)
        except StageRefused as exc:
            self._refused(result, exc)
            return
        except (StageError, OSError) as exc:
            where = f"{socket.gethostname()}:{self.log_path}"
            log.warning(
                kv("log_stage_out_failed", job_uuid=self.job.job_uuid, kept=where, error=exc)
            )
            note = f"log not staged out ({exc}); kept at {where}"
            result.error_message = "; ".join(m for m in (result.error_message, note) if m)
            return
        result.outputs.append(
            {
                "name": self.log_name,
                "type": "log",
                "size": size,
                "check_sum": checksum,
                "url": (dst / self.log_name).as_uri(),
            }
        )
        result.log_staged = True

    def cleanup(self) -> None:
        """Remove the work directory (called once the report is spooled, if the log is safe)."""
        try:  # the usual case, empty inputs/ and outputs/: four calls, without rmtree's walk
            self.log_path.unlink()
            self.inputs_dir.rmdir()
            self.outputs_dir.rmdir()
            self.dir.rmdir()
        except OSError:  # anything else in it (outputs, scratch files, staged-in inputs)
            shutil.rmtree(self.dir, ignore_errors=True)
