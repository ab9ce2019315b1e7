"""A pilot's status events: their validation and the outcome of applying one.

One event (``wms.contract.StatusEvent``) says how one attempt of a job is doing: ``running``
with its metrics, or ended (``finished`` / ``failed``) with its exit code, error, metrics and
files. Events arrive by three doors, the REST ``report`` of one job, the bulk ``events``
endpoint and the bus (``<prefix>.events``); all three hand them to
``jobs.reports.job_events_apply``, which validates each with :func:`clean_event` here.

Validation is hand-written rather than a DRF serializer: the bus path takes tens of thousands
of events a second, and a bad event must cost the others nothing.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeGuard, cast

from wms import checksums
from wms.contract import EVENT, EVENT_OUTCOMES, FINAL_STATES, VERSION, StatusEvent
from wms.exceptions import ValidationFailed, WMSError
from wms.locations import LocationError, canonical_url, is_under, name_problem

EVENT_STATES = ("running", *FINAL_STATES)
OUTPUT_TYPES = ("output", "log")

OUTCOMES = EVENT_OUTCOMES  # the wire's words (wms.contract)
APPLIED, DUPLICATE, IGNORED = EVENT_OUTCOMES

MAX_OUTPUTS = 100
MAX_NAME = 200  # the DSM name adds "<job uuid>/<attempt>/" (at most 43 characters) in front
MAX_URL = 1024
MAX_ERROR_CODE = 64
MAX_ERROR_MESSAGE = 64 * 1024
MAX_METRICS_KEYS = 256
MAX_METRICS_BYTES = 64 * 1024
MAX_INT32 = 2**31 - 1
MAX_SIZE = 2**63 - 1  # a file's size column is a (positive) bigint
MAX_ID = 2**63 - 1  # a primary key (bigint)
MAX_ATTEMPT = 32767

EVENT_FIELDS = frozenset(
    {
        "v",
        "kind",
        "job_uuid",
        "attempt",
        "state",
        "pilot_id",
        "exit_code",
        "error_code",
        "error_message",
        "metrics",
        "outputs",
        "sent_at",
    }
)
OUTPUT_FIELDS = frozenset({"name", "type", "size", "check_sum", "url"})
CHECKSUM_MESSAGE = "Must be '<adler32|sha256|md5>:<hex>' in lower case."


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _uuid(value: Any) -> str | None:
    if isinstance(value, uuid.UUID):
        return str(value)
    if not isinstance(value, str):
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def _clean_metrics(value: Any, errors: dict[str, Any]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        errors["metrics"] = ["Must be an object."]
        return {}
    if len(value) > MAX_METRICS_KEYS:
        errors["metrics"] = [f"At most {MAX_METRICS_KEYS} keys."]
        return {}
    if not all(isinstance(k, str) for k in value):
        errors["metrics"] = ["Keys must be strings."]
        return {}
    if len(value) > 16:  # small objects are cheap; measure only the ones that may be big
        try:
            size = len(json.dumps(value, separators=(",", ":")))
        except (TypeError, ValueError):
            errors["metrics"] = ["Must be plain JSON."]
            return {}
        if size > MAX_METRICS_BYTES:
            errors["metrics"] = [f"At most {MAX_METRICS_BYTES} bytes of JSON."]
            return {}
    return value


def _clean_outputs(value: Any, errors: dict[str, Any]) -> list[dict[str, Any]]:
    """The files of a final report; errors as DRF lists them (one object per item)."""
    if value is None:
        return []
    if not isinstance(value, list):
        errors["outputs"] = ["Must be a list of objects."]
        return []
    if len(value) > MAX_OUTPUTS:
        errors["outputs"] = [f"At most {MAX_OUTPUTS} files."]
        return []
    out: list[dict[str, Any]] = []
    item_errors: list[Any] = []
    seen: set[tuple[str, str]] = set()
    for item in value:
        problems: dict[str, list[str]] = {}
        if not isinstance(item, dict):
            item_errors.append({"non_field_errors": ["Must be an object."]})
            continue
        for key in sorted(set(item) - OUTPUT_FIELDS):
            problems[key] = ["Unknown field."]
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            problems["name"] = ["A non-empty string is required."]
        elif len(name) > MAX_NAME or any(ord(c) < 32 for c in name):
            problems["name"] = [f"At most {MAX_NAME} printable characters."]
        elif (problem := name_problem(name.strip())) is not None:
            problems["name"] = [problem]
        ftype = item.get("type", "output")
        if ftype not in OUTPUT_TYPES:
            problems["type"] = [f"Must be one of {OUTPUT_TYPES}."]
        size = item.get("size", 0)
        if not _is_int(size) or not 0 <= size <= MAX_SIZE:
            problems["size"] = [f"Must be an integer from 0 to {MAX_SIZE}."]
        check_sum = item.get("check_sum", "") or ""
        if not isinstance(check_sum, str) or (check_sum and not checksums.is_valid(check_sum)):
            problems["check_sum"] = [CHECKSUM_MESSAGE]
        url = item.get("url", "") or ""
        if not isinstance(url, str) or not url or len(url) > MAX_URL:
            problems["url"] = [f"A URL of at most {MAX_URL} characters is required."]
        if not problems:
            key = (ftype, str(name).strip())
            if key in seen:
                problems["name"] = ["Repeats another file of this report."]
            seen.add(key)
        item_errors.append(problems)
        if not problems:
            out.append(
                {
                    "name": str(name).strip(),
                    "type": ftype,
                    "size": size,
                    "check_sum": check_sum,
                    "url": url,
                }
            )
    if any(item_errors):
        errors["outputs"] = item_errors
    return out


def clean_event(data: Any, *, pilot_id: int | None = None, job_uuid: Any = None) -> StatusEvent:
    """A valid :class:`StatusEvent` from a decoded JSON object, or ``ValidationFailed``.

    ``pilot_id`` is the authenticated pilot (REST): the event's own ``pilot_id``, if it has
    one, must be the same. Without it (the bus) the event must name its pilot. ``job_uuid``
    is the job of the URL (REST report): the event's own, if any, must be the same.
    """
    if isinstance(data, StatusEvent):
        data = asdict(data)
    if not isinstance(data, Mapping):
        raise ValidationFailed({"non_field_errors": ["An event must be a JSON object."]})
    errors: dict[str, Any] = {}
    for key in sorted(set(data) - EVENT_FIELDS):
        errors[key] = ["Unknown field."]
    if data.get("v", VERSION) != VERSION:
        errors["v"] = [f"Unsupported contract version; this server speaks {VERSION}."]
    if data.get("kind", EVENT) != EVENT:
        errors["kind"] = [f"Must be {EVENT!r}."]

    own_uuid = data.get("job_uuid")
    uid = _uuid(own_uuid) if own_uuid is not None else None
    if own_uuid is not None and uid is None:
        errors["job_uuid"] = ["Must be a UUID."]
    if job_uuid is not None:
        url_uid = _uuid(job_uuid)
        if uid is not None and uid != url_uid:
            errors["job_uuid"] = ["Must be the job of the URL."]
        uid = url_uid
    elif own_uuid is None:
        errors["job_uuid"] = ["This field is required."]

    attempt = data.get("attempt")
    if not _is_int(attempt) or not 0 <= attempt <= MAX_ATTEMPT:
        errors["attempt"] = ["An integer from 0 is required."]
    state = data.get("state")
    if state not in EVENT_STATES:
        errors["state"] = [f"Must be one of {EVENT_STATES}."]

    own_pilot = data.get("pilot_id")
    if own_pilot is not None and (not _is_int(own_pilot) or not 1 <= own_pilot <= MAX_ID):
        errors["pilot_id"] = [f"Must be an integer from 1 to {MAX_ID}."]
    elif pilot_id is not None:
        if own_pilot is not None and own_pilot != pilot_id:
            errors["pilot_id"] = ["Must be the id of the pilot that sends it."]
        own_pilot = pilot_id
    elif own_pilot is None:
        errors["pilot_id"] = ["This field is required."]

    exit_code = data.get("exit_code")
    if exit_code is not None and (not _is_int(exit_code) or abs(exit_code) > MAX_INT32):
        errors["exit_code"] = ["Must be a 32-bit integer or null."]
    error_code = data.get("error_code") or ""
    if not isinstance(error_code, str) or len(error_code) > MAX_ERROR_CODE:
        errors["error_code"] = [f"Must be a string of at most {MAX_ERROR_CODE} characters."]
    error_message = data.get("error_message") or ""
    if not isinstance(error_message, str) or len(error_message) > MAX_ERROR_MESSAGE:
        errors["error_message"] = [f"Must be a string of at most {MAX_ERROR_MESSAGE} characters."]
    sent_at = data.get("sent_at") or ""
    if not isinstance(sent_at, str):
        errors["sent_at"] = ["Must be a string."]
    metrics = _clean_metrics(data.get("metrics"), errors)
    outputs = _clean_outputs(data.get("outputs"), errors)
    if outputs and state == "running":
        errors["outputs"] = ["Only a final report (finished or failed) carries files."]
    if errors:
        raise ValidationFailed(errors)
    return StatusEvent(
        job_uuid=cast(str, uid),
        attempt=cast(int, attempt),
        state=cast(str, state),
        pilot_id=cast(int, own_pilot),
        exit_code=exit_code,
        error_code=error_code,
        error_message=error_message,
        metrics=metrics,
        outputs=outputs,
        sent_at=sent_at,
    )


def outputs_outside(ev: StatusEvent, place: str) -> ValidationFailed | None:
    """The refusal of a final report some of whose files' URLs do not lie under its job's
    output URL ``place`` (canonical; ``""`` when it has none), or None when all do.
    Names were checked by :func:`clean_event` (plain relative names)."""
    errors: list[dict[str, list[str]]] = []
    for out in ev.outputs:
        url = out["url"]
        try:
            inside = bool(place) and is_under(canonical_url(url), place)
            problem = f"{url} is not under the job's output URL ({place or 'none'})."
        except LocationError as exc:
            inside, problem = False, f"Not a usable URL: {exc}"
        errors.append({} if inside else {"url": [problem]})
    if any(errors):
        return ValidationFailed({"outputs": errors})
    return None


@dataclass(frozen=True)
class EventOutcome:
    """What became of one event: an ``outcome`` with the job's state, or an ``error``."""

    job_uuid: str
    attempt: int | None
    outcome: str = ""  # applied | duplicate | ignored; "" when refused
    job_state: str = ""
    error: str = ""  # the error code when refused (validation_failed, not_found, ...)
    detail: Any = None
    status: int = 200

    @classmethod
    def refused(cls, raw: Any, exc: WMSError) -> EventOutcome:
        job_uuid, attempt = "", None
        if isinstance(raw, Mapping):
            job_uuid = str(raw.get("job_uuid") or "")
            attempt = raw.get("attempt") if _is_int(raw.get("attempt")) else None
        elif isinstance(raw, StatusEvent):
            job_uuid, attempt = raw.job_uuid, raw.attempt
        return cls(job_uuid, attempt, error=exc.code, detail=exc.detail, status=exc.status)

    @property
    def ok(self) -> bool:
        return not self.error

    def as_dict(self) -> dict[str, Any]:
        if self.error:
            return {
                "job_uuid": self.job_uuid,
                "attempt": self.attempt,
                "error": self.error,
                "detail": self.detail,
            }
        return {
            "job_uuid": self.job_uuid,
            "attempt": self.attempt,
            "outcome": self.outcome,
            "job_state": self.job_state,
        }
