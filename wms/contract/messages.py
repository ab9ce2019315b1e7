"""The wire contract's bus messages (``wms.contract``): job message, status event, command, and
the signature of status events.

Django-free on purpose: the pilot agent (``pilots/agent/``) imports this module (through
``wms.contract``), and so does the server. Every message is a JSON object with a ``v``
(contract version) and a ``kind``; ``decode_*`` functions validate what arrives and raise
``ContractError`` with a clear reason.

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
