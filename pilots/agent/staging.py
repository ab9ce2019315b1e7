"""Files in and out of one attempt, and what the attempt comes to (:class:`JobResult`).

:class:`Stager` brings a job's inputs in (in place, or copied with their size and checksum
checked against the catalogue's) and its outputs and log out (copied with their size and
adler32 checksum to ``<output_url>/<job_uuid>/``), under the pilot's rules on where data may
live (docs/pilot.md, "Where data may live"): inputs from the storage roots or the job's own
output URL only, outputs never through a link out of the job's directory nor outside its
output URL. The process side is ``pilots.agent.runner``.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

from pilots.agent.logs import kv, log
from wms.checksums import bytes_checksum_stream, is_valid
from wms.contract import JobMessage, ReportBody
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

    def report(self, attempt: int) -> ReportBody:
        """The final report of this attempt (``POST /jobs/{uuid}/report/``)."""
        return ReportBody(
            attempt=attempt,
            state=self.state,
            exit_code=self.exit_code,
            error_code=self.error_code,
            error_message=self.error_message,
            metrics=self.metrics,
            outputs=self.outputs,
        )


def note(logfh: IO[bytes], text: str) -> None:
    """One line of the pilot's own in the job's log."""
    logfh.write(f"[wms-pilot {_now()}] {text}\n".encode())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def safe_name(text: str) -> str:
    """``text`` with every character but letters, digits, ``-``, ``_`` and ``.`` as ``_``."""
    if _SAFE_NAME.fullmatch(text):  # a uuid, a plain file name: as it is
        return text
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "_"


_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


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
    src: Path,
    dst: Path,
    algorithm: str = "adler32",
    *,
    fin: IO[bytes] | None = None,
    make_parent: bool = True,
) -> tuple[int, str]:
    """Copy ``src`` to ``dst`` (through a temporary file and a rename), reading it once;
    returns (size, checksum of the content). ``fin``: ``src`` already opened (by
    :func:`open_inside`), read instead of opening ``src`` by its name. ``make_parent``:
    False when the caller made ``dst``'s folder (:meth:`Stager.destination`)."""
    if make_parent:
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


# --- one attempt's files ---------------------------------------------------------------------


class Stager:
    """The files of one attempt: its inputs in, its outputs and log out."""

    def __init__(
        self,
        job: JobMessage,
        *,
        job_dir: Path,
        log_name: str,
        stage_in: str = "inplace",
        storage_roots: tuple[str, ...] = (),
    ) -> None:
        self.job = job
        self.dir = job_dir
        self.inputs_dir = job_dir / "inputs"
        self.outputs_dir = job_dir / "outputs"
        self.log_name = log_name
        self.log_path = job_dir / log_name
        self.stage_in_mode = stage_in
        # canonical URL prefixes inputs may come from (besides the job's own output URL)
        self.storage_roots = tuple(storage_roots)
        self.real_dir: Path | None = None  # the job's directory resolved before the payload ran
        self._place: str | None = None

    def place(self) -> str:
        """The job's output URL, canonical; one that cannot be read is refused."""
        if self._place is None:
            try:
                self._place = canonical_url(self.job.output_url)
            except LocationError as exc:
                raise StageRefused(f"output_url {self.job.output_url!r}: {exc}") from exc
        return self._place

    def input_source(self, url: str, what: str) -> Path:
        """The local path of an input, once the pilot's rules allow it: its URL, and the file
        it really is (symlinks followed), under a storage root or the job's own output URL
        (a merge job reads its task's outputs); else ``StageRefused``."""
        if not url:
            raise StageError(f"{what}: no URL")
        try:
            canonical = canonical_url(url)
            place = self.place()
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
        real_url = canonical_url(real.as_uri())
        # under a root as written, or under one as it really is (a root may itself be reached
        # through a link: resolved only then)
        if not any(is_under(real_url, r) for r in roots) and not any(
            is_under(real_url, _real_root(r)) for r in roots if r.startswith("file:///")
        ):
            raise StageRefused(f"{what}: {src} is a link to {real}, outside the storage roots")
        return real

    def stage_in(self, logfh: IO[bytes]) -> list[str]:
        paths: list[str] = []
        used: set[str] = set()
        for i, f in enumerate(self.job.inputs):
            what = f"input {f.name!r}"
            src = self.input_source(f.url, what)
            if not src.is_file() or not os.access(src, os.R_OK):
                raise StageError(f"{what}: {src} is not a readable file")
            if self.stage_in_mode != "copy":
                paths.append(str(src))
                continue
            name = safe_name(f.name)
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
            note(logfh, f"stage-in: {src} -> {dst} ({size} bytes, {checksum})")
            paths.append(str(dst))
        return paths

    def output_root(self) -> Path:
        self.place()  # an output URL that cannot be normalised is refused
        return local_path(self.job.output_url, "output_url")

    def destination(self, root: Path, name: str) -> Path:
        """Where an output (or the log) goes: ``root/name``, which must lie under the job's
        output URL, as written and as it really is (no link in the way); else refused."""
        problem = name_problem(name)
        if problem is not None:
            raise StageRefused(f"output {name!r}: {problem}")
        dst = root / name
        place = self.place()
        if not is_under(canonical_url(dst.as_uri()), place):
            raise StageRefused(f"output {name!r}: {dst} is not under the job's output URL")
        output_root = self.output_root()
        top = output_root.resolve()

        def inside(path: Path) -> bool:
            return path == top or top in path.parents

        # before making any folder: the deepest one that exists must not lead elsewhere
        existing = dst.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        real = top if existing == output_root else existing.resolve()
        if not (inside(real) or real in top.parents):
            raise StageRefused(f"output {name!r}: {existing} leads out of the job's output URL")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not inside(dst.parent.resolve() / dst.name) or dst.is_symlink():
            raise StageRefused(f"output {name!r}: {dst} leads out of the job's output URL")
        return dst

    def open_in_job(self, path: Path) -> IO[bytes]:
        """``path`` (under the job's directory, as named or as resolved) opened for reading
        without following any link (:func:`open_inside`)."""
        top = self.real_dir or self.dir.resolve()
        if top not in path.parents:
            try:  # named through the directory as configured, which may itself be a link
                path = top / path.relative_to(self.dir)
            except ValueError as exc:
                raise StageRefused(f"{path} is not in the job's directory") from exc
        return open_inside(top, path)

    def output_files(self) -> list[tuple[str, Path]]:
        """(name, the file to copy) for every file under ``outputs/``, symlinks never
        followed out of the job's directory: a link to a file inside it is copied as that
        file, a link to a directory inside it is not entered, a link leading out of it (or
        dangling) is refused (``StageRefused``)."""
        top = self.real_dir or self.dir.resolve()
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

    def stage_out(self, result: JobResult, logfh: IO[bytes]) -> None:
        """Outputs of a finished attempt to ``<output_url>/<job_uuid>/<name>``. A failed
        attempt's outputs are left in its work directory: they are not results."""
        if result.state != FINISHED:
            return
        try:
            files = self.output_files()
            root = self.output_root() / safe_name(self.job.job_uuid)
            for name, path in files:
                dst = self.destination(root, name)
                fin = self.open_in_job(path)
                size, checksum = copy_with_checksum(path, dst, fin=fin, make_parent=False)
                url = dst.as_uri()
                entry = {"name": name, "type": "output", "size": size, "check_sum": checksum}
                result.outputs.append({**entry, "url": url})
                note(logfh, f"stage-out: {name} -> {url} ({size} bytes, {checksum})")
        except StageRefused as exc:
            self.refused(result, exc)
            note(logfh, f"FAILED {STAGE_OUT_REFUSED}: {exc}")
        except (StageError, OSError) as exc:
            result.state = FAILED
            result.error_code = STAGE_OUT_FAILED
            result.error_message = f"stage-out failed: {exc}"
            result.outputs = []
            note(logfh, f"FAILED {STAGE_OUT_FAILED}: {exc}")

    def refused(self, result: JobResult, exc: StageRefused) -> None:
        """A stage-out the pilot's rules refuse fails the attempt, with no outputs."""
        log.warning(kv("stage_out_refused", job_uuid=self.job.job_uuid, error=exc))
        result.state = FAILED
        result.error_code = STAGE_OUT_REFUSED
        result.error_message = f"stage-out refused: {exc}"
        result.outputs = []

    def stage_out_log(self, result: JobResult, log_ident: tuple[int, int]) -> None:
        """The log to ``<output_url>/<job_uuid>/<attempt>/<log>``, whatever the state; if that
        fails the log stays in the work directory (kept) and the report says where."""
        try:
            # the payload may own the work dir: the pilot copies the file it wrote, nothing
            # the payload put in its place (a symlink to a file of the pilot's)
            replaced = StageRefused(f"{self.log_path} was replaced by the job: not copied")
            try:
                fin = self.open_in_job(self.log_path)
            except StageRefused as exc:
                raise replaced from exc
            with fin:
                st = os.fstat(fin.fileno())
                if (st.st_dev, st.st_ino) != log_ident:
                    raise replaced
                root = self.output_root() / safe_name(self.job.job_uuid)
                target = self.destination(root, f"{self.job.attempt}/{self.log_name}")
                dst = target.parent
                size, checksum = copy_with_checksum(
                    self.log_path, target, fin=fin, make_parent=False
                )
        except StageRefused as exc:
            self.refused(result, exc)
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
