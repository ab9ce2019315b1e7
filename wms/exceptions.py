"""The WMS's own exceptions (seed Milestone 1: "own exception classes").

Every error a boundary can answer with derives from :class:`WMSError`. Each class carries its
wire ``code`` and HTTP ``status``; ``wms.api.exception_handler`` turns any of them into
``{"error": code, "detail": ...}``.
"""

from __future__ import annotations

from typing import Any


class WMSError(Exception):
    code = "wms_error"
    status = 500
    default_detail = "Internal error."
    # A refusal that still changed something which must be kept (the job a refused start put
    # back to wait): the idempotency wrapper commits the change with the refusal's answer.
    keeps_changes = False

    def __init__(self, detail: Any = None, *, code: str | None = None) -> None:
        # A message, or a mapping of field -> messages (ValidationFailed) as the API renders it.
        self.detail: Any = self.default_detail if detail is None else detail
        if code is not None:
            self.code = code
        super().__init__(self.detail)


class ValidationFailed(WMSError):
    code = "validation_failed"
    status = 400
    default_detail = "The request is not valid."


class Unauthenticated(WMSError):
    code = "not_authenticated"
    status = 401
    default_detail = "Authentication credentials were not provided or are not valid."


class Forbidden(WMSError):
    code = "permission_denied"
    status = 403
    default_detail = "You may not do this."


class NotFound(WMSError):
    code = "not_found"
    status = 404
    default_detail = "Not found."


class Conflict(WMSError):
    code = "conflict"
    status = 409
    default_detail = "The request conflicts with the current state."


class InvalidTransition(Conflict):
    code = "invalid_transition"
    default_detail = "This state change is not allowed."

    def __init__(
        self,
        *,
        entity: str,
        pk: Any,
        current: str | None,
        target: str,
        detail: Any = None,
    ) -> None:
        self.entity, self.pk, self.current, self.target = entity, pk, current, target
        if detail is None:
            detail = f"{entity} {pk} cannot go from '{current}' to '{target}'."
        super().__init__(detail)


class DatasetClosed(Conflict):
    code = "dataset_closed"
    default_detail = "The dataset is closed and takes no more files."


class JobNotQueued(Conflict):
    """A pilot's start of a job that is not ``queued`` (started elsewhere, cancelled, ...)."""

    code = "job_not_queued"
    default_detail = "The job is not queued: it was cancelled, finished or started elsewhere."


class StaleAttempt(Conflict):
    """A pilot's start with a message of another attempt than the job's current one."""

    code = "stale_attempt"
    default_detail = "The message is of an older attempt of the job."


class WrongDevice(Conflict):
    """A pilot's start of a job of another device type than its own."""

    code = "wrong_device"
    default_detail = "The job needs another device type than this pilot's."


class TaskPaused(Conflict):
    """A pilot's start of a job whose task is paused: refused, and the job goes back to
    ``defined`` (it is dispatched again once the task is resumed)."""

    code = "task_paused"
    default_detail = "The job's task is paused: the job went back to wait for its resume."
    keeps_changes = True


class PilotNotLive(Conflict):
    """A call of a pilot that is terminated or lost: it may not take new work."""

    code = "pilot_not_live"
    default_detail = "This pilot is terminated or lost; register again."


class ReportConflict(Conflict):
    """A pilot's final report of an attempt that already ended with another report (other
    files, sizes, checksums or URLs, another state, exit code or error code)."""

    code = "report_conflict"
    default_detail = "The attempt already ended with another final report."


class DSMError(WMSError):
    code = "dsm_error"
    status = 502
    default_detail = "The Data Storage Manager failed."


class BrokerError(WMSError):
    """The broker cannot be reached or did not confirm; the API answers 503 with
    ``Retry-After`` (``wms.api``)."""

    code = "broker_unavailable"
    status = 503
    default_detail = "The message broker is unavailable."
