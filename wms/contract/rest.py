"""The wire contract's bodies of the pilot's REST calls (``wms.contract``; docs/pilot-api.md).

Django-free, as ``wms.contract.messages``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from wms.contract.messages import (
    DEVICE_TYPES,
    FINAL_STATES,
    JOB,
    VERSION,
    ContractError,
    JobMessage,
    StatusEvent,
    _req,
    decode_job,
)


def decode_start_answer(raw: bytes | str | dict) -> JobMessage:
    """The answer to ``POST /jobs/{uuid}/start/``: the job message to run, which may leave
    ``v`` and ``kind`` out."""
    data = _load_unversioned(raw)
    return decode_job({"v": VERSION, "kind": JOB, **data})


# --- the bodies of the pilot's REST calls (docs/pilot-api.md) ---------------------------------
#
# The pilot builds every body it sends with one of these (``to_dict``) and reads every answer
# with ``from_dict``; the server checks the same bodies with its DRF serializers
# (pilots/api/pilot_serializers.py). These bodies carry no ``v``/``kind``: the URL says what
# they are. Field names and order are the wire format: change them with the serializers.

PILOT_STATES = ("idle", "busy", "draining")  # what a pilot reports of itself
REPORT_STATES = ("running", *FINAL_STATES)


def _load_unversioned(raw: bytes | str | dict) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    try:
        data = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise ContractError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ContractError("a message must be a JSON object")
    return data


def _attempt(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ContractError(f"attempt {value!r} is not a non-negative integer")
    return value


def _interval(value: Any) -> float | None:
    """A positive number of seconds, or None (absent or unusable: the pilot keeps its own)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


@dataclass(frozen=True)
class OrphanReport:
    """What a dead pilot left of one job (killed at start-up), told at registration."""

    job_uuid: str
    attempt: int
    pilot_id: int | None
    pids: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_uuid": self.job_uuid,
            "attempt": _attempt(self.attempt),
            "pilot_id": self.pilot_id,
            "pids": list(self.pids),
        }


@dataclass(frozen=True)
class Registration:
    """The body of ``POST /pilots/register/``."""

    hostname: str
    site: str
    device_type: str
    cores: int
    memory_mb: int
    gpus: int
    slots: int
    version: str
    orphans: list[OrphanReport] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.device_type not in DEVICE_TYPES:
            raise ContractError(f"unknown device_type {self.device_type!r}")
        if self.slots < 1:
            raise ContractError("slots must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "hostname": self.hostname,
            "site": self.site,
            "device_type": self.device_type,
            "cores": self.cores,
            "memory_mb": self.memory_mb,
            "gpus": self.gpus,
            "slots": self.slots,
            "version": self.version,
        }
        if self.orphans:  # left out when empty: a server older than the field takes the rest
            body["orphans"] = [o.to_dict() for o in self.orphans]
        return body


@dataclass(frozen=True)
class RegistrationAnswer:
    """The answer to a registration: the pilot's id and token, and the server's settings
    (which win over the pilot's own). A setting the answer leaves out or gets wrong is empty
    (or None): the pilot keeps its own."""

    pilot_id: int
    token: str
    bus_key: str = ""
    device_type: str = ""
    job_queue: str = ""
    command_queue: str = ""
    bus_prefix: str = ""
    queue_type: str = ""
    heartbeat_interval: float | None = None

    @classmethod
    def from_dict(cls, raw: Any) -> RegistrationAnswer:
        data = raw if isinstance(raw, dict) else {}
        pilot_id, token = data.get("pilot_id"), data.get("token")
        if not isinstance(pilot_id, int) or isinstance(pilot_id, bool):
            raise ContractError(f"registration answer without pilot_id/token: {raw!r}")
        if not isinstance(token, str) or not token:
            raise ContractError(f"registration answer without pilot_id/token: {raw!r}")

        def text(key: str) -> str:
            value = data.get(key)
            return value if isinstance(value, str) else ""

        device_type = text("device_type")
        return cls(
            pilot_id=pilot_id,
            token=token,
            bus_key=text("bus_key"),
            device_type=device_type if device_type in DEVICE_TYPES else "",
            job_queue=text("job_queue"),
            command_queue=text("command_queue"),
            bus_prefix=text("bus_prefix"),
            queue_type=text("queue_type"),
            heartbeat_interval=_interval(data.get("heartbeat_interval")),
        )


@dataclass(frozen=True)
class HeartbeatJob:
    """One attempt a pilot runs, with its metrics, in a heartbeat."""

    job_uuid: str
    attempt: int
    cpu_time: float
    rss_mb: float
    wall_time: float
    max_rss_mb: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_uuid": self.job_uuid,
            "attempt": _attempt(self.attempt),
            "cpu_time": self.cpu_time,
            "rss_mb": self.rss_mb,
            "wall_time": self.wall_time,
            "max_rss_mb": self.max_rss_mb,
        }


@dataclass(frozen=True)
class HeartbeatBody:
    """The body of ``POST /pilots/{id}/heartbeat/``.

    ``reporting``: the attempts whose final report waits in the pilot's spool; None leaves
    the field out (a list too long to send whole: a partial one would mislead the server)."""

    state: str
    status: str
    metrics: dict[str, Any]
    jobs: list[HeartbeatJob]
    acked_commands: list[str]
    reporting: list[tuple[str, int]] | None = None

    def __post_init__(self) -> None:
        if self.state not in PILOT_STATES:
            raise ContractError(f"unknown pilot state {self.state!r}")

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "state": self.state,
            "status": self.status,
            "metrics": self.metrics,
            "jobs": [j.to_dict() for j in self.jobs],
            "acked_commands": list(self.acked_commands),
        }
        if self.reporting is not None:
            body["reporting"] = [{"job_uuid": u, "attempt": a} for u, a in self.reporting]
        return body


@dataclass(frozen=True)
class HeartbeatReply:
    """The answer to a heartbeat. ``commands`` are raw: each is checked on its own
    (:func:`decode_command`, by the pilot's dispatcher), one bad command spoils no other."""

    heartbeat_interval: float | None = None
    state: str = ""
    commands: list[Any] = field(default_factory=list)

    @classmethod
    def from_dict(cls, raw: Any) -> HeartbeatReply:
        data = raw if isinstance(raw, dict) else {}
        commands = data.get("commands")
        state = data.get("state")
        return cls(
            heartbeat_interval=_interval(data.get("heartbeat_interval")),
            state=state if isinstance(state, str) else "",
            commands=list(commands) if isinstance(commands, list) else [],
        )


@dataclass(frozen=True)
class StartBody:
    """The body of ``POST /jobs/{uuid}/start/``."""

    attempt: int

    def to_dict(self) -> dict[str, Any]:
        return {"attempt": _attempt(self.attempt)}


MAX_STARTS = 1000


@dataclass(frozen=True)
class StartsBody:
    """The body of ``POST /pilots/{id}/starts/``: the starts of several job messages' attempts
    at once (the batched form of :class:`StartBody`), as (job uuid, attempt) pairs."""

    starts: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.starts) <= MAX_STARTS:
            raise ContractError(f"a starts body holds 1 to {MAX_STARTS} starts")

    def to_dict(self) -> dict[str, Any]:
        return {
            "starts": [
                {"job_uuid": str(job_uuid), "attempt": _attempt(attempt)}
                for job_uuid, attempt in self.starts
            ]
        }


@dataclass(frozen=True)
class StartResult:
    """What became of one start of a :class:`StartsBody`: started (``job``, the job message
    to run: ``None`` when the server's copy could not be read, and the pilot's own copy is
    run), or refused (``error`` code and its ``detail``; the message is dropped, except
    ``pilot_not_live``)."""

    job_uuid: str
    attempt: int | None
    job: JobMessage | None = None
    error: str = ""
    detail: Any = None

    @property
    def ok(self) -> bool:
        return not self.error


def decode_starts_answer(raw: bytes | str | dict, expected: int) -> list[StartResult]:
    """The answer of ``POST /pilots/{id}/starts/``: one result per start sent, in order."""
    data = _load_unversioned(raw)
    results = data.get("results")
    if not isinstance(results, list) or len(results) != expected:
        raise ContractError(f"a starts answer holds one result per start ({expected})")
    decoded = []
    for item in results:
        if not isinstance(item, dict):
            raise ContractError("a start result is an object")
        attempt = item.get("attempt")
        if attempt is not None and (not isinstance(attempt, int) or isinstance(attempt, bool)):
            raise ContractError("field 'attempt' has the wrong type")
        error = str(item.get("error") or "")
        job: JobMessage | None = None
        if not error:
            if item.get("outcome") != "started":
                raise ContractError(f"unknown start outcome {item.get('outcome')!r}")
            try:
                job = decode_start_answer(item.get("job") or {})
            except ContractError:
                job = None
        decoded.append(
            StartResult(
                job_uuid=str(item.get("job_uuid") or ""),
                attempt=attempt,
                job=job,
                error=error,
                detail=item.get("detail"),
            )
        )
    return decoded


@dataclass(frozen=True)
class ReportBody:
    """The body of ``POST /jobs/{uuid}/report/``: a :class:`StatusEvent` without what the URL
    and the token say (job uuid, pilot id) and without its envelope."""

    attempt: int
    state: str  # running | finished | failed
    exit_code: int | None = None
    error_code: str = ""
    error_message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _attempt(self.attempt)
        if self.state not in REPORT_STATES:
            raise ContractError(f"unknown report state {self.state!r}")

    @classmethod
    def from_event(cls, event: StatusEvent) -> ReportBody:
        return cls(
            attempt=event.attempt,
            state=event.state,
            exit_code=event.exit_code,
            error_code=event.error_code,
            error_message=event.error_message,
            metrics=event.metrics,
            outputs=event.outputs,
        )

    @classmethod
    def from_dict(cls, raw: Any) -> ReportBody:
        data = _load_unversioned(raw)
        exit_code = data.get("exit_code")
        if exit_code is not None and (
            not isinstance(exit_code, int) or isinstance(exit_code, bool)
        ):
            raise ContractError("field 'exit_code' has the wrong type")
        metrics, outputs = data.get("metrics", {}), data.get("outputs", [])
        if not isinstance(metrics, dict) or not isinstance(outputs, list):
            raise ContractError("fields 'metrics'/'outputs' have the wrong type")
        return cls(
            attempt=_req(data, "attempt", int),
            state=_req(data, "state", str),
            exit_code=exit_code,
            error_code=str(data.get("error_code", "")),
            error_message=str(data.get("error_message", "")),
            metrics=metrics,
            outputs=outputs,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "state": self.state,
            "exit_code": self.exit_code,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "metrics": self.metrics,
            "outputs": self.outputs,
        }


#: The most events one ``POST /pilots/{id}/events/`` carries.
MAX_EVENTS = 1000
EVENT_OUTCOMES = ("applied", "duplicate", "ignored")


@dataclass(frozen=True)
class EventsBody:
    """The body of ``POST /pilots/{id}/events/``: final (or running) reports of several jobs,
    each a :class:`ReportBody` with its job's uuid."""

    reports: tuple[tuple[str, ReportBody], ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.reports) <= MAX_EVENTS:
            raise ContractError(f"an events body holds 1 to {MAX_EVENTS} reports")

    def to_dict(self) -> dict[str, Any]:
        return {
            "events": [
                {"job_uuid": str(job_uuid), **report.to_dict()} for job_uuid, report in self.reports
            ]
        }


@dataclass(frozen=True)
class EventResult:
    """What became of one event of an :class:`EventsBody`: an ``outcome`` (applied,
    duplicate, ignored) with the job's state, or an ``error`` code and its ``detail``."""

    job_uuid: str
    attempt: int | None
    outcome: str = ""
    job_state: str = ""
    error: str = ""
    detail: Any = None

    @property
    def ok(self) -> bool:
        return not self.error


def decode_events_answer(raw: bytes | str | dict, expected: int) -> list[EventResult]:
    """The answer of ``POST /pilots/{id}/events/``: one result per event sent, in order."""
    data = _load_unversioned(raw)
    results = data.get("results")
    if not isinstance(results, list) or len(results) != expected:
        raise ContractError(f"an events answer holds one result per event ({expected})")
    decoded = []
    for item in results:
        if not isinstance(item, dict):
            raise ContractError("an event result is an object")
        attempt = item.get("attempt")
        if attempt is not None and (not isinstance(attempt, int) or isinstance(attempt, bool)):
            raise ContractError("field 'attempt' has the wrong type")
        error = str(item.get("error") or "")
        outcome = str(item.get("outcome") or "")
        if not error and outcome not in EVENT_OUTCOMES:
            raise ContractError(f"unknown event outcome {outcome!r}")
        decoded.append(
            EventResult(
                job_uuid=str(item.get("job_uuid") or ""),
                attempt=attempt,
                outcome=outcome,
                job_state=str(item.get("job_state") or ""),
                error=error,
                detail=item.get("detail"),
            )
        )
    return decoded


@dataclass(frozen=True)
class TerminateBody:
    """The body of ``POST /pilots/{id}/terminate/``."""

    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason}
