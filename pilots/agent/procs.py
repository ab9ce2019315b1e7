"""Finding and killing a pilot's payload processes (``pilots.agent.guard`` uses them).

A payload is found by its mark (``WMS_PAYLOAD_MARK=<run id>:<job uuid>:<attempt>`` in its
environment, inherited by its descendants, read from ``/proc/<pid>/environ``), or by the pid,
session and start time recorded when it started. A process is signalled only if it proves it
is the one meant (same pid *and* start time, same boot; a member of the recorded session while
its leader is the recorded process; or the mark), through a pidfd where the kernel has them,
so a reused pid is never hit. Linux only.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

MARK_VAR = "WMS_PAYLOAD_MARK"
_MARK_BYTES = MARK_VAR.encode()
LINUX = sys.platform.startswith("linux")
PROC = Path("/proc")
KILL_ROUNDS = 5  # SIGKILL sweeps (a payload forking while it is killed is caught by the next)


# --- /proc ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    state: str
    sid: int
    start: int  # clock ticks after boot (field 22 of /proc/<pid>/stat)

    @property
    def dead(self) -> bool:
        return self.state in ("Z", "X", "x")


def _read(path: str) -> bytes | None:
    """A whole (small, /proc) file with plain system calls; None if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def proc_stat(pid: int, proc: Path = PROC) -> ProcInfo | None:
    """The process ``pid`` as ``/proc/<pid>/stat`` tells it; None if there is none."""
    data = _read(f"{proc}/{pid}/stat")
    if data is None:
        return None
    raw = data.decode("utf-8", "replace")
    # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses
    rest = raw[raw.rfind(")") + 2 :].split()
    try:
        return ProcInfo(pid=pid, state=rest[0], sid=int(rest[3]), start=int(rest[19]))
    except (IndexError, ValueError):
        return None


def proc_marks(pid: int, proc: Path = PROC) -> list[str]:
    """The payload marks in the environment of ``pid`` (``WMS_PAYLOAD_MARK``, or a container
    runtime's prefixed copy such as ``APPTAINERENV_WMS_PAYLOAD_MARK``); [] if unreadable."""
    raw = _read(f"{proc}/{pid}/environ")
    if raw is None or _MARK_BYTES not in raw:
        return []
    marks = []
    for entry in raw.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if sep and name.endswith(_MARK_BYTES):
            marks.append(value.decode("utf-8", "replace"))
    return marks


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pids(proc: Path = PROC) -> list[int]:
    try:
        return [int(name) for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        return []


# --- the processes born since a moment --------------------------------------------------------
#
# The kernel hands out pids in increasing order, wrapping round at ``pid_max`` to
# ``RESERVED_PIDS``, and skipping the pids in use (``alloc_pid``: ``idr_alloc_cyclic``). So
# every process created after a moment has a pid in the cyclic range (the last pid allocated
# then, the last pid allocated now], unless the allocator has gone all the way round since,
# which takes more than ``pid_max - RESERVED_PIDS`` allocations: more forks than that (the
# kernel's count of forks since boot, ``/proc/stat``'s ``processes``, threads included) and
# the range says nothing. A job's processes are all born after its payload was started: at
# the job's end the pilot reads the few files of the pids in that range instead of every
# process of the node (~2.5 ms of CPU on a node of 100 processes, ~25 us a process).

RESERVED_PIDS = 300  # the kernel's: the allocator starts again there after pid_max
PROBE_AT_MOST = 64  # pids in the range tried one by one; more: the listing of /proc filtered
_FORKS = b"\nprocesses "


@dataclass(frozen=True)
class PidClock:
    """A moment of the pid allocator: the last pid allocated, and the forks since boot."""

    last_pid: int
    forks: int


def pid_clock(proc: Path = PROC) -> PidClock | None:
    """Now (``/proc/loadavg``'s last field, ``/proc/stat``'s ``processes``); None where it
    cannot be read, or when ``proc`` is not this process's pid namespace."""
    if not _own_namespace(str(proc)):
        return None
    loadavg, stat = _read(f"{proc}/loadavg"), _read(f"{proc}/stat")
    if loadavg is None or stat is None:
        return None
    at = stat.find(_FORKS)
    try:
        last_pid = int(loadavg.split()[4])
        forks = int(stat[at + len(_FORKS) : stat.index(b"\n", at + 1)]) if at >= 0 else -1
    except (IndexError, ValueError):
        return None
    return PidClock(last_pid, forks) if forks >= 0 else None


_namespaces: dict[str, bool] = {}


def _own_namespace(proc: str) -> bool:
    """Whether ``proc`` shows this process's pid namespace (its ``self`` is this pid): the
    last pid of ``loadavg`` is the reader's namespace's."""
    known = _namespaces.get(proc)
    if known is None:
        try:
            known = os.readlink(f"{proc}/self") == str(os.getpid())
        except OSError:
            known = False
        _namespaces[proc] = known
    return known


def born_since(since: PidClock | None, proc: Path = PROC) -> list[int] | None:
    """The pids to look at for the processes created after ``since``: a superset of them
    (every pid of the range when it is short, some maybe of no process or of a thread; the
    live processes in it otherwise). None when it cannot be told (no clock, or the allocator
    may have gone round): then every process."""
    if since is None:
        return None
    now = pid_clock(proc)
    raw = _read(f"{proc}/sys/kernel/pid_max")
    try:
        pid_max = int(raw) if raw is not None else 0
    except ValueError:
        pid_max = 0
    if now is None or not pid_max or now.forks - since.forks >= pid_max - RESERVED_PIDS:
        return None
    low, high = since.last_pid, now.last_pid
    if 0 <= high - low <= PROBE_AT_MOST:
        # a few pids: each is tried as it is, without listing /proc (one that is a thread
        # of a marked process is that process: a signal to it is one to the process)
        return list(range(low + 1, high + 1))
    pids = _pids(proc)  # those born after ``now`` are not in the range: as with a listing
    if low <= high:
        return [p for p in pids if low < p <= high]
    return [p for p in pids if p > low or p <= high]  # wrapped round pid_max


# --- marks and targets ------------------------------------------------------------------------


def new_run_id() -> str:
    return secrets.token_hex(8)


def make_mark(run_id: str, job_uuid: str, attempt: int) -> str:
    return f"{run_id}:{job_uuid}:{attempt}"


def parse_mark(mark: str) -> tuple[str, str, int] | None:
    """(run id, job uuid, attempt) of a mark; None if it is not one."""
    parts = mark.split(":")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return None
    try:
        return parts[0], parts[1], int(parts[2])
    except ValueError:
        return None


@dataclass(frozen=True)
class Target:
    """What to kill: the processes of one payload (``mark``: its exact mark, with the leader's
    ``pid``/``sid``/``start`` when known), or of a whole pilot run (``mark`` ending in ``:``,
    every mark that starts with it)."""

    mark: str
    pid: int | None = None
    sid: int | None = None
    start: int | None = None

    @property
    def is_run(self) -> bool:
        return self.mark.endswith(":")

    def matches_mark(self, mark: str) -> bool:
        return mark.startswith(self.mark) if self.is_run else mark == self.mark


def find(
    targets: Sequence[Target], *, exclude: Iterable[int] = (), proc: Path = PROC
) -> dict[int, tuple[ProcInfo, str]]:
    """The live processes the targets name: pid -> (its /proc info, the mark it is killed
    for: its own mark, or its target's). One walk of ``/proc``; the environment of a process
    is read only when neither its pid nor its session settles it."""
    skip = {1, os.getpid(), *exclude}
    leaders: dict[int, tuple[int, str]] = {}  # sid -> (leader's start, mark), leader verified
    for t in targets:
        if t.pid is None or t.start is None:
            continue
        info = proc_stat(t.pid, proc)
        if info is not None and info.start == t.start and not info.dead:
            leaders[t.sid if t.sid is not None else t.pid] = (t.start, t.mark)
    by_pid = {t.pid: t for t in targets if t.pid is not None and t.start is not None}
    found: dict[int, tuple[ProcInfo, str]] = {}
    for pid in _pids(proc):
        if pid in skip:
            continue
        info = proc_stat(pid, proc)
        if info is None or info.dead:
            continue
        own = by_pid.get(pid)
        if own is not None and own.start == info.start:
            found[pid] = (info, own.mark)
            continue
        leader = leaders.get(info.sid)
        if leader is not None and info.start >= leader[0]:
            found[pid] = (info, leader[1])
            continue
        for mark in proc_marks(pid, proc):
            target = next((t for t in targets if t.matches_mark(mark)), None)
            if target is not None:
                found[pid] = (info, mark)
                break
    return found


def _send(info: ProcInfo, sig: int, proc: Path = PROC) -> bool:
    """Signal the process ``info`` names, if it is still that one (pid and start time)."""
    fd = None
    opener = getattr(os, "pidfd_open", None)
    if opener is not None:
        try:
            fd = opener(info.pid)
        except OSError:
            fd = None  # gone, or a kernel without pidfds: the plain kill below
    try:
        now = proc_stat(info.pid, proc)
        if now is None or now.start != info.start:
            return False  # gone, or its pid is another process's now
        if fd is not None:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(info.pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    except OSError:
        return False
    finally:
        if fd is not None:
            os.close(fd)


def _alive(info: ProcInfo, proc: Path = PROC) -> bool:
    now = proc_stat(info.pid, proc)
    return now is not None and now.start == info.start and not now.dead


def terminate(
    targets: Sequence[Target],
    *,
    grace: float,
    exclude: Iterable[int] = (),
    proc: Path = PROC,
) -> dict[str, list[int]]:
    """Kill what the targets name: SIGTERM, up to ``grace`` seconds to exit, then SIGKILL
    sweeps until nothing is left (a process forked meanwhile is found by the next sweep).
    Returns mark -> the pids signalled for it."""
    exclude = set(exclude)
    killed: dict[str, set[int]] = {}
    if not targets or not LINUX:
        return {}
    found = find(targets, exclude=exclude, proc=proc)
    for info, mark in found.values():
        if _send(info, signal.SIGTERM, proc):
            killed.setdefault(mark, set()).add(info.pid)
    deadline = time.monotonic() + max(0.0, grace)
    while found and time.monotonic() < deadline:
        found = {pid: v for pid, v in found.items() if _alive(v[0], proc)}
        if found:
            time.sleep(0.05)
    for _ in range(KILL_ROUNDS):
        found = find(targets, exclude=exclude, proc=proc)
        if not found:
            break
        for info, mark in found.values():
            if _send(info, signal.SIGKILL, proc):
                killed.setdefault(mark, set()).add(info.pid)
        end = time.monotonic() + 2.0
        while time.monotonic() < end and any(_alive(v[0], proc) for v in found.values()):
            time.sleep(0.02)
    return {mark: sorted(pids) for mark, pids in killed.items()}


def signal_marked(
    mark: str,
    sig: int,
    *,
    exclude: Iterable[int] = (),
    since: PidClock | None = None,
    proc: Path = PROC,
) -> list[int]:
    """One signal to every live process carrying ``mark`` (the runner's kill of one job:
    reaches what left the job's session). ``since``: the moment before the job's first
    process was started; only the processes born after it are looked at (:func:`born_since`),
    else every process. Returns the pids signalled."""
    if not LINUX:
        return []
    target = Target(mark)
    skip = {1, os.getpid(), *exclude}
    candidates = born_since(since, proc)
    signalled = []
    for pid in _pids(proc) if candidates is None else candidates:
        if pid in skip or not any(map(target.matches_mark, proc_marks(pid, proc))):
            continue
        info = proc_stat(pid, proc)
        if info is not None and not info.dead and _send(info, sig, proc):
            signalled.append(pid)
    return sorted(signalled)
