"""The spool: final reports kept on local disk until the WMS has acknowledged them.

A final report is written here (temporary file, fsync, rename: atomic) *before* it is sent, and
deleted only when the server answered 2xx, 409 or another 4xx (the contract's "done" and "final,
nothing to retry"; the last two are logged). The reports that wait together (those of one
pilot) go in one call, ``POST /pilots/{id}/events/``, answered report by report; a report alone
goes as ``POST /jobs/{uuid}/report/``. On 5xx, time-outs or a refused connection it stays,
and :class:`ReportSender` sends it again with backoff, in the background, and at the next start
of a pilot that uses the same spool directory. So a WMS outage loses no result.

Each entry holds what is needed to send it again later, even by another run of the pilot: the
server URL, the pilot id and the pilot token the attempt was started with (an attempt belongs to
the pilot that started it, so a report sent with a newer pilot's token would be refused), and
the report's idempotency key, made when it is spooled: every resend, by this run or the next,
is the same call to the server, which answers it once. The files are therefore readable by
their owner only (mode 0600, directory 0700).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pilots.agent.client import CONFLICT, OK, REJECTED, ApiResult, Backoff, PilotClient, new_key
from pilots.agent.logs import kv, log
from wms.contract import (
    MAX_EVENTS,
    ContractError,
    EventsBody,
    ReportBody,
    decode_events_answer,
)

SUFFIX = ".report.json"
#: One call carries at most this many reports, and about this many bytes of them: well under
#: the server's limits (``MAX_EVENTS``, ``WMS_API_MAX_BODY``).
BATCH_REPORTS = min(200, MAX_EVENTS)
BATCH_BYTES = 1 << 20
SETTLED = (OK, CONFLICT, REJECTED)  # the WMS took the report, or refused it for good
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class SpoolEntry:
    path: Path
    job_uuid: str
    attempt: int
    pilot_id: int | None
    server_url: str
    token: str
    report: dict[str, Any]
    key: str = ""  # the report's idempotency key


class Spool:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)  # it holds pilot tokens, whoever made it before
        # the entries this process wrote, by file name, with the file's identity (inode, size,
        # mtime) then: read back from memory while the file is still that one (no read and
        # parse of a file the sender takes a moment after it was written)
        self._written: dict[str, tuple[tuple[int, int, int], SpoolEntry]] = {}

    def _name(self, job_uuid: str, attempt: int) -> str:
        return f"{_SAFE.sub('_', job_uuid)}.{int(attempt)}{SUFFIX}"

    def put(
        self,
        *,
        job_uuid: str,
        attempt: int,
        report: dict[str, Any],
        pilot_id: int | None,
        server_url: str,
        token: str,
        key: str | None = None,
    ) -> Path:
        """Write one final report atomically (tmp + fsync + rename + fsync of the directory),
        with its idempotency ``key`` (a new one if None)."""
        document = {
            "job_uuid": job_uuid,
            "attempt": attempt,
            "pilot_id": pilot_id,
            "server_url": server_url,
            "token": token,
            "idempotency_key": key or new_key(),
            "spooled_at": datetime.now(UTC).isoformat(),
            "report": report,
        }
        final = self.directory / self._name(job_uuid, attempt)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        data = json.dumps(document, separators=(",", ":")).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:  # one write for a report (json.dump to a file: one per token)
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
                ident = _ident(os.fstat(fd))
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._fsync_dir()
        entry = SpoolEntry(
            path=final,
            job_uuid=job_uuid,
            attempt=int(attempt),
            pilot_id=pilot_id,
            server_url=server_url,
            token=token,
            report=report,
            key=str(document["idempotency_key"]),
        )
        self._written[final.name] = (ident, entry)
        return final

    def _known(self, path: Path) -> SpoolEntry | None:
        """The entry this process wrote at ``path``, if the file is still the one it wrote
        (raises FileNotFoundError when the file is gone)."""
        known = self._written.get(path.name)
        if known is None or path.parent != self.directory:
            return None
        try:
            ident = _ident(os.stat(path))
        except FileNotFoundError:
            self._written.pop(path.name, None)
            raise
        if ident != known[0]:
            self._written.pop(path.name, None)
            return None
        return known[1]

    def _fsync_dir(self) -> None:
        try:
            fd = os.open(self.directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _names(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return [n for n in names if n.endswith(SUFFIX) and not n.startswith(".")]

    def paths(self) -> list[Path]:
        """The spooled reports, oldest first (temporary files are not reports yet)."""
        found = []
        for name in self._names():
            path = self.directory / name
            with contextlib.suppress(FileNotFoundError):
                found.append((os.stat(path).st_mtime, path))
        return [p for _, p in sorted(found)]

    def read(self, path: Path) -> SpoolEntry | None:
        """An entry, or None if it is gone (sent by someone else) or unreadable (set aside)."""
        try:
            known = self._known(path)
            if known is not None:
                return known
            data = json.loads(path.read_text())
            return SpoolEntry(
                path=path,
                job_uuid=str(data["job_uuid"]),
                attempt=int(data["attempt"]),
                pilot_id=data.get("pilot_id"),
                server_url=str(data["server_url"]),
                token=str(data.get("token", "")),
                report=dict(data["report"]),
                # a spool written before keys: one derived from the entry, stable across runs
                key=str(data.get("idempotency_key") or _legacy_key(path)),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            bad = path.with_name(path.name + ".bad")
            with contextlib.suppress(OSError):
                path.rename(bad)
            log.error(kv("spool_entry_unreadable", path=path, moved_to=bad, error=exc))
            return None

    def attempts(self, pilot_id: int | None = None) -> list[tuple[str, int]]:
        """(job uuid, attempt) of the spooled reports (of ``pilot_id`` only, if given): what
        the heartbeat names as ``reporting``, so the server neither fails them as gone nor
        forgets that their pilot still holds their ends."""
        found = []
        for path in self.paths():
            try:
                known = self._known(path)
                if known is not None:
                    if pilot_id is None or known.pilot_id == pilot_id:
                        found.append((known.job_uuid, known.attempt))
                    continue
                data = json.loads(path.read_text())
                if pilot_id is not None and data.get("pilot_id") != pilot_id:
                    continue
                found.append((str(data["job_uuid"]), int(data["attempt"])))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # gone meanwhile, or unreadable: the sender sets it aside
        return found

    def remove(self, path: Path) -> None:
        if path.parent == self.directory:
            self._written.pop(path.name, None)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def __len__(self) -> int:
        return len(self._names())


class ReportSender:
    """Sends the spooled reports, in a background thread, with backoff while the WMS is away."""

    def __init__(
        self,
        spool: Spool,
        *,
        timeout: float = 30.0,
        first_backoff: float = 1.0,
        max_backoff: float = 60.0,
        gather: float = 0.0,
        on_result: Callable[[SpoolEntry, ApiResult], None] | None = None,
    ) -> None:
        self.spool = spool
        self.timeout = timeout
        # woken by a new report, the thread waits this long for more before it sends: the
        # reports of jobs that end close together go in one call (a slot is not held by it)
        self.gather = gather
        self.backoff = Backoff(first_backoff, max_backoff)
        self.on_result = on_result
        self._clients: dict[str, PilotClient] = {}
        self._lock = threading.Lock()  # one pass at a time (the thread, or a final flush)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _client(self, server_url: str) -> PilotClient:
        client = self._clients.get(server_url)
        if client is None:
            client = self._clients[server_url] = PilotClient(server_url, timeout=self.timeout)
        return client

    def send_one(self, entry: SpoolEntry) -> ApiResult:
        result = self._client(entry.server_url).report(
            entry.job_uuid, entry.report, token=entry.token, key=entry.key
        )
        context = {
            "job_uuid": entry.job_uuid,
            "attempt": entry.attempt,
            "state": entry.report.get("state"),
            "answer": result.describe(),
        }
        if result.outcome == OK:
            self.spool.remove(entry.path)
            body = result.body if isinstance(result.body, dict) else {}
            log.info(kv("report_sent", **context, outcome=body.get("outcome", "")))
        elif result.outcome in (CONFLICT, REJECTED):
            self.spool.remove(entry.path)
            log.warning(kv("report_refused_dropped", **context, detail=_detail(result)))
        else:
            log.warning(kv("report_kept_in_spool", **context))
        if self.on_result is not None:
            self.on_result(entry, result)
        return result

    def send_batch(self, batch: list[SpoolEntry]) -> bool:
        """Several reports of one pilot in one call; each is settled by its own result. A
        call refused as a whole (its envelope, its size) sends them one by one instead.
        Returns whether the WMS took the call."""
        first = batch[0]
        assert first.pilot_id is not None
        try:
            body = EventsBody(tuple((e.job_uuid, ReportBody.from_dict(e.report)) for e in batch))
        except ContractError:  # a report the contract refuses: each alone, as the WMS answers
            return all(self.send_one(e).outcome in SETTLED for e in batch)
        # the same reports sent again are the same call (its answer is replayed)
        key = str(
            uuid.uuid5(
                uuid.NAMESPACE_URL, "wms-pilot-events:" + ",".join(sorted(e.key for e in batch))
            )
        )
        result = self._client(first.server_url).events(
            first.pilot_id, body.to_dict(), token=first.token, key=key
        )
        if result.outcome in (CONFLICT, REJECTED):
            log.warning(
                kv(
                    "report_batch_refused",
                    reports=len(batch),
                    answer=result.describe(),
                    detail=_detail(result),
                )
            )
            return all(self.send_one(e).outcome in SETTLED for e in batch)
        if result.outcome != OK:
            log.warning(
                kv("report_batch_kept_in_spool", reports=len(batch), answer=result.describe())
            )
            return False
        try:
            answers = decode_events_answer(result.body, len(batch))
        except ContractError as exc:
            log.warning(kv("report_batch_answer_unreadable", reports=len(batch), error=exc))
            return False
        sent = 0
        for entry, answer in zip(batch, answers, strict=True):
            self.spool.remove(entry.path)
            if answer.ok:
                sent += 1
            else:
                log.warning(
                    kv(
                        "report_refused_dropped",
                        job_uuid=entry.job_uuid,
                        attempt=entry.attempt,
                        state=entry.report.get("state"),
                        answer=answer.error,
                        detail=str(answer.detail)[:300],
                    )
                )
            if self.on_result is not None:
                status = 200 if answer.ok else 400
                self.on_result(entry, ApiResult(OK if answer.ok else REJECTED, status, answer))
        log.info(kv("reports_sent", reports=sent, refused=len(batch) - sent))
        return True

    def flush(self) -> int:
        """One pass over the spool: the reports of one pilot together (:meth:`send_batch`),
        a report alone on its own; stops at the first call the WMS could not take. Returns
        the number of reports still spooled."""
        with self._lock:
            entries = [e for e in map(self.spool.read, self.spool.paths()) if e is not None]
            for batch in _batches(entries):
                if len(batch) == 1 or batch[0].pilot_id is None:
                    taken = all(self.send_one(e).outcome in SETTLED for e in batch)
                else:
                    taken = self.send_batch(batch)
                if not taken:
                    break
            return len(self.spool)

    def flush_until(self, deadline: float) -> int:
        """Passes with backoff until the spool is empty or ``deadline`` (time.monotonic) passes."""
        backoff = Backoff(0.5, 5.0)
        left = self.flush()
        while left and time.monotonic() < deadline:
            time.sleep(min(backoff.next(), max(0.0, deadline - time.monotonic())))
            left = self.flush()
        return left

    def wake(self) -> None:
        """A new report was spooled: send it now (and reset the backoff)."""
        self._wake.set()

    def _run(self) -> None:
        delay = 0.0
        while not self._stop.is_set():
            woken = self._wake.wait(delay) if delay else self._wake.is_set()
            if self._stop.is_set():
                break
            if woken:
                self._wake.clear()
                self.backoff.reset()
                if self.gather > 0 and self._stop.wait(self.gather):
                    break
            try:
                left = self.flush()
            except Exception as exc:  # keep the thread alive whatever one pass hits
                log.exception(kv("spool_pass_failed", error=exc))
                left = 1
            if left:
                delay = self.backoff.next()
                log.info(kv("spool_retry_later", reports=left, wait=f"{delay:.1f}"))
            else:
                self.backoff.reset()
                delay = 3600.0  # nothing to do until woken

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pilot-spool", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for client in self._clients.values():
            client.close()


def _batches(entries: list[SpoolEntry]) -> list[list[SpoolEntry]]:
    """The entries, oldest first, cut into calls: those of one pilot (server, id and token)
    together, at most ``BATCH_REPORTS`` and about ``BATCH_BYTES`` each."""
    groups: dict[tuple[str, int | None, str], list[SpoolEntry]] = {}
    for entry in entries:
        groups.setdefault((entry.server_url, entry.pilot_id, entry.token), []).append(entry)
    batches: list[list[SpoolEntry]] = []
    for group in groups.values():
        batch: list[SpoolEntry] = []
        size = 0
        for entry in group:
            cost = _size(entry.path)  # the spool file: the report and a few fields more
            if batch and (len(batch) >= BATCH_REPORTS or size + cost > BATCH_BYTES):
                batches.append(batch)
                batch, size = [], 0
            batch.append(entry)
            size += cost
        batches.append(batch)
    return batches


def _ident(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _detail(result: ApiResult) -> str:
    body = result.body
    if isinstance(body, dict):
        return str(body.get("detail", body.get("error", "")))[:300]
    return str(body or "")[:300]


def _legacy_key(path: Path) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"wms-pilot-spool:{path.name}"))
