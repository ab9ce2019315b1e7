"""The wire contract between the WMS and its pilots: job message, status event, heartbeat, command.

Django-free on purpose: the pilot agent (``pilots/agent/``) imports this module, and so does the
server. Every message is a JSON object with a ``v`` (contract version) and a ``kind``; ``decode_*``
functions validate what arrives and raise ``ContractError`` with a clear reason.

A status event published to the bus is signed by its pilot (:func:`event_headers`): an
HMAC-SHA256 of the exact body bytes with the pilot's bus key (returned by its registration),
and the pilot's id, in two message headers. The server's consumer checks them with
:func:`event_signature_valid` before it applies anything.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import asdict, dataclass, field
from typing import Any

VERSION = 1

JOB = "job"
EVENT = "event"
COMMAND = "command"

DEVICE_TYPES = ("cpu", "gpu")
COMMANDS = ("kill_job", "drain", "shutdown")
FINAL_STATES = ("finished", "failed")


_encoder = json.JSONEncoder(separators=(",", ":"))


def _dumps(data: dict[str, Any]) -> bytes:
    return _encoder.encode(data).encode()


# --- signed status events on the bus ----------------------------------------------------------

EVENT_PILOT_HEADER = "wms-pilot-id"
EVENT_SIGNATURE_HEADER = "wms-signature"


def _key_bytes(key: str | bytes) -> bytes:
    return key if isinstance(key, bytes) else key.encode()


def sign_event_body(body: bytes, key: str | bytes) -> str:
    """The signature of an event message: HMAC-SHA256 of the exact body bytes, in hex."""
    return hmac.digest(_key_bytes(key), body, hashlib.sha256).hex()


def event_headers(body: bytes, *, pilot_id: int, key: str | bytes) -> dict[str, str | int]:
    """The headers a pilot publishes ``body`` (one encoded :class:`StatusEvent`) with."""
    return {EVENT_PILOT_HEADER: pilot_id, EVENT_SIGNATURE_HEADER: sign_event_body(body, key)}


def event_signature_valid(body: bytes, signature: object, key: str | bytes) -> bool:
    """Whether ``signature`` (a header's value) signs ``body`` with ``key``; constant time."""
    return event_signed_by_any(body, signature, (_key_bytes(key),))


def event_signed_by_any(body: bytes, signature: object, keys: tuple[bytes, ...]) -> bool:
    """Whether ``signature`` signs ``body`` with one of ``keys`` (a pilot's key, and the keys
    it had under the server's previous secrets); constant time for each. The consumer's hot
    path: the signature is read once, each key costs one HMAC."""
    if type(signature) is not str:
        if not isinstance(signature, bytes | str):
            return False
        try:
            signature = signature.decode("ascii") if isinstance(signature, bytes) else signature
        except UnicodeDecodeError:
            return False
    if len(signature) != 64 or not signature.isascii():
        return False  # compare_digest takes ASCII strings only
    for key in keys:
        if hmac.compare_digest(hmac.digest(key, body, hashlib.sha256).hex(), signature):
            return True
    return False


class ContractError(ValueError):
    """A message that does not follow the contract."""


@dataclass(frozen=True)
class InputFile:
    name: str
    dataset_uid: str
    url: str = ""
    size: int = 0
    check_sum: str = ""


@dataclass(frozen=True)
class JobMessage:
    """What a pilot receives from ``wms.jobs.<device_type>``."""

    job_uuid: str
    attempt: int
    task_id: int
    executable: str
    args: str
    device_type: str
    mode: str
    inputs: list[InputFile]
    output_url: str
    output_dataset_uid: str
    server_url: str
    rank: int = 0
    v: int = VERSION
    kind: str = JOB

    def to_dict(self) -> dict[str, Any]:
        # By hand, not dataclasses.asdict: the executor encodes 10^4 of these per second.
        return {
            "v": self.v,
            "kind": self.kind,
            "job_uuid": self.job_uuid,
            "attempt": self.attempt,
            "task_id": self.task_id,
            "executable": self.executable,
            "args": self.args,
            "device_type": self.device_type,
            "mode": self.mode,
            "rank": self.rank,
            "inputs": [
                {
                    "name": f.name,
                    "dataset_uid": f.dataset_uid,
                    "url": f.url,
                    "size": f.size,
                    "check_sum": f.check_sum,
                }
                for f in self.inputs
            ],
            "output_url": self.output_url,
            "output_dataset_uid": self.output_dataset_uid,
            "server_url": self.server_url,
        }

    def encode(self) -> bytes:
        return _dumps(self.to_dict())


@dataclass(frozen=True)
class StatusEvent:
    """A pilot's report on one attempt: running metrics or its final state."""

    job_uuid: str
    attempt: int
    state: str  # running | finished | failed
    pilot_id: int
    exit_code: int | None = None
    error_code: str = ""
    error_message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    sent_at: str = ""
    v: int = VERSION
    kind: str = EVENT

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    def report_body(self) -> ReportBody:
        """The same report as the body of ``POST /jobs/{uuid}/report/``."""
        return ReportBody.from_event(self)


@dataclass(frozen=True)
class Command:
    """An order to a pilot: kill one job's attempt, drain, or shut down."""

    command: str
    pilot_id: int
    id: str = ""
    job_uuid: str = ""
    attempt: int | None = None
    reason: str = ""
    v: int = VERSION
    kind: str = COMMAND

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()


def _load(raw: bytes | str | dict) -> dict[str, Any]:
    if isinstance(raw, dict):
        data = raw
    else:
        try:
            data = json.loads(raw)
        except (TypeError, ValueError) as exc:
            raise ContractError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ContractError("a message must be a JSON object")
    if data.get("v") != VERSION:
        raise ContractError(f"unsupported contract version {data.get('v')!r} (want {VERSION})")
    return data


def _req(data: dict[str, Any], key: str, typ: type | tuple[type, ...]) -> Any:
    if key not in data:
        raise ContractError(f"missing field {key!r}")
    value = data[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ContractError(f"field {key!r} has the wrong type")
    return value


def decode_job(raw: bytes | str | dict) -> JobMessage:
    data = _load(raw)
    if data.get("kind") != JOB:
        raise ContractError(f"expected kind {JOB!r}, got {data.get('kind')!r}")
    inputs = []
    for i, item in enumerate(_req(data, "inputs", list)):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ContractError(f"inputs[{i}] must be an object with a name")
        inputs.append(
            InputFile(
                name=item["name"],
                dataset_uid=str(item.get("dataset_uid", "")),
                url=str(item.get("url", "")),
                size=int(item.get("size") or 0),
                check_sum=str(item.get("check_sum", "")),
            )
        )
    device_type = _req(data, "device_type", str)
    if device_type not in DEVICE_TYPES:
        raise ContractError(f"unknown device_type {device_type!r}")
    return JobMessage(
        job_uuid=_req(data, "job_uuid", str),
        attempt=_req(data, "attempt", int),
        task_id=_req(data, "task_id", int),
        executable=_req(data, "executable", str),
        args=_req(data, "args", str),
        device_type=device_type,
        mode=_req(data, "mode", str),
        inputs=inputs,
        output_url=_req(data, "output_url", str),
        output_dataset_uid=_req(data, "output_dataset_uid", str),
        server_url=_req(data, "server_url", str),
        rank=int(data.get("rank", 0)),
    )


def decode_command(raw: bytes | str | dict) -> Command:
    data = _load(raw)
    command = _req(data, "command", str)
    if command not in COMMANDS:
        raise ContractError(f"unknown command {command!r}")
    attempt = data.get("attempt")
    if attempt is not None and (not isinstance(attempt, int) or isinstance(attempt, bool)):
        raise ContractError("field 'attempt' has the wrong type")
    return Command(
        command=command,
        pilot_id=_req(data, "pilot_id", int),
        id=str(data.get("id", "")),
        job_uuid=str(data.get("job_uuid", "")),
        attempt=attempt,
        reason=str(data.get("reason", "")),
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


@dataclass(frozen=True)
class TerminateBody:
    """The body of ``POST /pilots/{id}/terminate/``."""

    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason}
