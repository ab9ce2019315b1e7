"""The pilot's session with the WMS: its registration, its token, its calls, its spool.

:class:`Session` owns the REST client (``pilots.agent.client``) and the spool of final reports
with its sender (``pilots.agent.spool``). It registers the pilot (user token, retried with the
same idempotency key), and from then on speaks for it with the pilot's own token: start,
heartbeat, report, terminate. Every body it sends is built, and every answer it reads is
checked, by ``wms.contract`` (its methods take contract objects only). A final report is
spooled (atomically) before it is sent, so a WMS outage loses no result.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from pilots.agent import __version__, host
from pilots.agent.client import ApiResult, PilotClient
from pilots.agent.config import PilotConfig
from pilots.agent.guard import MAX_REPORTED_PIDS, Orphan
from pilots.agent.logs import kv, log
from pilots.agent.spool import ReportSender, Spool
from pilots.agent.staging import JobResult
from wms.contract import (
    ContractError,
    HeartbeatBody,
    JobMessage,
    OrphanReport,
    Registration,
    RegistrationAnswer,
    ReportBody,
    StartBody,
    StartsBody,
    TerminateBody,
)


class StartupError(RuntimeError):
    """The pilot cannot start (registration refused, broker unreachable, work dir in use)."""


class Session:
    """The pilot as the WMS knows it: its id and token once registered."""

    def __init__(self, config: PilotConfig) -> None:
        self.cfg = config
        self.client = PilotClient(config.server_url, timeout=config.http_timeout)
        self.spool: Spool | None = None
        self.sender: ReportSender | None = None
        self.pilot_id: int | None = None

    # --- the spool -------------------------------------------------------------------------------

    def open_spool(self) -> None:
        try:
            self.spool = Spool(self.cfg.spool_path)
        except OSError as exc:
            raise StartupError(f"spool dir {self.cfg.spool_path}: {exc}") from exc
        self.sender = ReportSender(
            self.spool, timeout=self.cfg.http_timeout, gather=self.cfg.report_gather
        )
        left = len(self.spool)
        if left:
            log.info(kv("spool_has_reports_from_before", reports=left, spool=self.spool.directory))

    def spooled(self) -> int:
        """Reports the WMS has not taken yet."""
        return len(self.spool) if self.spool is not None else 0

    def reporting(self) -> list[tuple[str, int]]:
        """(job uuid, attempt) of this pilot's spooled reports."""
        return self.spool.attempts(self.pilot_id) if self.spool is not None else []

    # --- registration ----------------------------------------------------------------------------

    def register(
        self, orphans: list[Orphan], stop: threading.Event
    ) -> tuple[Registration, RegistrationAnswer]:
        """Register (retried while the WMS does not answer, until ``stop``); the pilot id and
        token are kept. Returns what was sent and the answer."""
        gpus = self.cfg.gpus if self.cfg.gpus >= 0 else host.gpus()
        sent = Registration(
            hostname=self.cfg.hostname or host.hostname(),
            site=self.cfg.site,
            device_type=self.cfg.device_type,
            cores=host.cores(),
            memory_mb=host.memory_mb(),
            gpus=gpus,
            slots=self.cfg.slots,
            version=__version__,
            orphans=[
                OrphanReport(o.job_uuid, o.attempt, o.pilot_id, o.pids[:MAX_REPORTED_PIDS])
                for o in orphans
            ],
        )
        if not self.cfg.register_token:
            raise StartupError(
                "no register token (--register-token-file FILE, - for standard input, "
                "or register_token in a config file of mode 0600)"
            )
        result = self.client.register(
            sent.to_dict(),
            register_token=self.cfg.register_token,
            retries=self.cfg.register_retries,
            stop=stop,
        )
        if result.status == 400 and sent.orphans and "orphans" in str(result.body):
            # a server older than the field: register without it, the log has said it all
            log.warning(kv("orphans_report_refused_by_server", answer=head(result.body)))
            sent = dataclasses.replace(sent, orphans=[])
            result = self.client.register(
                sent.to_dict(),
                register_token=self.cfg.register_token,
                retries=self.cfg.register_retries,
                stop=stop,
            )
        if not result.ok:
            raise StartupError(
                f"registration at {self.cfg.server_url} failed: {result.describe()}"
                f" {result.body if result.status else ''}".rstrip()
            )
        try:
            answer = RegistrationAnswer.from_dict(
                result.body if isinstance(result.body, dict) else {}
            )
        except ContractError as exc:
            raise StartupError(str(exc)) from exc
        self.pilot_id = answer.pilot_id
        self.client.pilot_id = answer.pilot_id
        self.client.token = answer.token
        return sent, answer

    # --- calls with the pilot's token ------------------------------------------------------------

    def start(self, job: JobMessage, key: str) -> ApiResult:
        return self.client.start(job.job_uuid, StartBody(job.attempt).to_dict(), key=key)

    def starts(self, jobs: list[JobMessage], key: str) -> ApiResult:
        body = StartsBody(tuple((job.job_uuid, job.attempt) for job in jobs))
        return self.client.starts(body.to_dict(), key=key)

    def heartbeat(self, body: HeartbeatBody) -> ApiResult:
        return self.client.heartbeat(body.to_dict())

    def report(self, job_uuid: str, report: ReportBody) -> ApiResult:
        return self.client.report(job_uuid, report.to_dict())

    def final_report(self, job: JobMessage, result: JobResult) -> None:
        """Spool first (atomically), then let the sender send it."""
        assert self.spool is not None and self.sender is not None
        report = result.report(job.attempt)
        try:
            self.spool.put(
                job_uuid=job.job_uuid,
                attempt=job.attempt,
                report=report.to_dict(),
                pilot_id=self.pilot_id,
                server_url=self.client.server_url,
                token=self.client.token,
            )
        except OSError as exc:  # a full or broken disk: sending directly is all that is left
            log.error(kv("report_spool_failed_sending_directly", job_uuid=job.job_uuid, error=exc))
            answer = self.report(job.job_uuid, report)
            log.info(kv("report_sent_unspooled", job_uuid=job.job_uuid, answer=answer.describe()))
            return
        self.sender.wake()

    def terminate(self, reason: str) -> None:
        result = self.client.terminate(TerminateBody(reason).to_dict())
        if result.ok:
            log.info(kv("pilot_terminated", pilot_id=self.pilot_id, reason=reason))
        else:
            log.warning(kv("terminate_failed", pilot_id=self.pilot_id, answer=result.describe()))

    def close(self) -> None:
        if self.sender is not None:
            self.sender.stop()
        self.client.close()


def head(body: Any, limit: int = 200) -> str:
    """The start of an answer's body, for a log line."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    text = str(body)
    return text if len(text) <= limit else text[:limit] + "..."
