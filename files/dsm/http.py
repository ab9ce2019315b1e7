"""The ``http`` DSM backend: a client for an external DSM speaking the REST contract of docs/dsm.md.

- ``Authorization: Bearer <token>`` on every request (omitted when no token is configured).
- Per-request timeouts ``(connect, read)``.
- Retries, with exponential backoff (``backoff * 2**n``, capped), on 5xx and 429 answers,
  connection errors and timeouts; at most ``retries`` retries after the first attempt, then
  ``DSMError``. Every POST carries an ``Idempotency-Key`` that stays the same across the retries
  of one call, so a write whose answer was lost (read timeout) is not applied twice by a DSM
  that honours the key (see docs/dsm.md).
- 4xx answers map to the WMS's exceptions: 400/422 → ``ValidationFailed``, 404 → ``NotFound``,
  409 → ``DatasetClosed`` (error ``dataset_closed``) or ``Conflict``; 401/403 and anything
  else → ``DSMError`` (a WMS misconfiguration, not the caller's fault).
- A body that is not JSON or lacks a field → ``DSMError`` naming the request and the field;
  so is a ``find_datasets`` answer with a dataset that does not match the query, out of name
  order, or more of them than the limit.

Django-free: configured by arguments (``files.dsm.get_dsm`` passes the settings).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import requests
import structlog

from files.dsm.base import (
    DEFAULT_PAGE_SIZE,
    ROLES,
    STATES,
    ClientBase,
    DatasetInfo,
    DatasetSpec,
    FileInfo,
    FilePage,
    UIDLike,
    check_file_specs,
    check_file_urls,
    check_find_args,
    check_page_args,
    glob_regex,
)
from wms.exceptions import Conflict, DatasetClosed, DSMError, NotFound, ValidationFailed

log = structlog.get_logger(__name__)

USER_AGENT = "wms-dsm-client/1"
BACKOFF_MAX = 30.0
_RETRY_EXCEPTIONS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
)
_SNIPPET = 200


def _normalise_timeout(timeout: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(timeout, int | float):
        values = [float(timeout)] * 2
    else:
        values = [float(t) for t in timeout]
        if len(values) == 1:
            values *= 2
    if len(values) != 2 or min(values) <= 0:
        raise ValueError(f"timeout must be seconds > 0, one value or (connect, read): {timeout!r}")
    return values[0], values[1]


def _snippet(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _SNIPPET else text[:_SNIPPET] + "…"


def _uid_path(uid: UIDLike) -> str:
    return quote(str(uid), safe="")


class _Reader:
    """Checks an answer's fields, naming the request and the field when one is wrong."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, what: str) -> DSMError:
        return DSMError(f"The DSM answered {self.where} with {what}.")

    def obj(self, value: Any, what: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(f"{what} that is not a JSON object")
        return value

    def field(self, obj: Mapping[str, Any], key: str, kind: type, what: str) -> Any:
        if key not in obj:
            raise self.fail(f"{what} missing field '{key}'")
        value = obj[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            raise self.fail(f"{what} whose field '{key}' is not a {kind.__name__}: {value!r}")
        return value

    def count(self, obj: Mapping[str, Any], key: str, what: str) -> int:
        value = self.field(obj, key, int, what)
        if value < 0:
            raise self.fail(f"{what} whose field '{key}' is negative: {value}")
        return value

    def choice(self, obj: Mapping[str, Any], key: str, choices: Sequence[str], what: str) -> str:
        value = self.field(obj, key, str, what)
        if value not in choices:
            raise self.fail(f"{what} whose field '{key}' is not one of {list(choices)}: {value!r}")
        return value

    def dataset(self, value: Any) -> DatasetInfo:
        what = "a dataset"
        obj = self.obj(value, what)
        raw_uid = self.field(obj, "uid", str, what)
        try:
            uid = uuid.UUID(raw_uid)
        except ValueError as exc:
            raise self.fail(f"a dataset whose uid is not a UUID: {raw_uid!r}") from exc
        location = obj.get("location", "")
        if not isinstance(location, str):
            raise self.fail(f"a dataset whose field 'location' is not a str: {location!r}")
        return DatasetInfo(
            uid=uid,
            name=self.field(obj, "name", str, what),
            role=self.choice(obj, "role", ROLES, what),
            state=self.choice(obj, "state", STATES, what),
            file_count=self.count(obj, "file_count", what),
            total_size=self.count(obj, "total_size", what),
            location=location,
        )

    def file(self, value: Any) -> FileInfo:
        what = "a file"
        obj = self.obj(value, what)
        return FileInfo(
            id=self.count(obj, "id", what),
            name=self.field(obj, "name", str, what),
            size=self.count(obj, "size", what),
            check_sum=self.field(obj, "check_sum", str, what),
            url=self.field(obj, "url", str, what),
        )

    def items(self, body: Any, key: str) -> list[Any]:
        obj = self.obj(body, "a body")
        return self.field(obj, key, list, "a body")


class HTTPDSMClient(ClientBase):
    """An external DSM over REST (``WMS_DSM_BACKEND=http``). One client per thread."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str = "",
        timeout: float | Sequence[float] = (3.05, 30.0),
        retries: int = 3,
        backoff: float = 0.5,
        backoff_max: float = BACKOFF_MAX,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        url_roots: Sequence[str] | None = None,
    ) -> None:
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"The DSM base URL must be http(s)://..., not {base_url!r}.")
        if retries < 0 or backoff < 0:
            raise ValueError("retries and backoff must not be negative.")
        self.base_url = base_url.rstrip("/")
        # canonical URL prefixes every registered file's URL must lie under (None: no check)
        self.url_roots = tuple(url_roots) if url_roots is not None else None
        self.timeout = _normalise_timeout(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.backoff_max = float(backoff_max)
        self._sleep = sleep
        self.session = session or requests.Session()
        self.session.headers.update({"Accept": "application/json", "User-Agent": USER_AGENT})
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        self.session.close()

    # --- transport ------------------------------------------------------------------------------

    def _delay(self, attempt: int) -> float:
        return min(self.backoff * (2**attempt), self.backoff_max)

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
    ) -> Any:
        """Send one call (with its retries) and return the decoded JSON of a 2xx answer."""
        where = f"{method} {path}"
        headers: dict[str, str] = {}
        data: bytes | None = None
        if body is not None:
            data = json.dumps(body, default=str).encode()
            headers["Content-Type"] = "application/json"
        if method != "GET":
            # The same key on every retry: the DSM applies the call once and replays its answer.
            headers["Idempotency-Key"] = str(uuid.uuid4())
        attempts = self.retries + 1
        failure = ""
        for attempt in range(attempts):
            try:
                resp = self.session.request(
                    method,
                    self.base_url + path,
                    params=params,
                    data=data,
                    headers=headers,
                    timeout=self.timeout,
                    allow_redirects=False,
                )
            except _RETRY_EXCEPTIONS as exc:
                failure = f"{type(exc).__name__}: {exc}"
            except requests.RequestException as exc:
                raise DSMError(f"The DSM request {where} failed: {exc}") from exc
            else:
                if resp.status_code < 500 and resp.status_code != 429:
                    return self._answer(resp, where)
                failure = f"HTTP {resp.status_code}: {_snippet(resp.text)}"
            if attempt + 1 < attempts:
                delay = self._delay(attempt)
                log.warning(
                    "dsm_request_retry",
                    request=where,
                    attempt=attempt + 1,
                    attempts=attempts,
                    delay=delay,
                    error=failure,
                )
                self._sleep(delay)
        log.error("dsm_request_failed", request=where, attempts=attempts, error=failure)
        raise DSMError(f"The DSM request {where} failed after {attempts} attempt(s): {failure}")

    def _answer(self, resp: requests.Response, where: str) -> Any:
        status = resp.status_code
        if 200 <= status < 300:
            try:
                return resp.json()
            except ValueError as exc:
                raise DSMError(
                    f"The DSM answered {where} (HTTP {status}) with a body that is not JSON: "
                    f"{_snippet(resp.text)!r}"
                ) from exc
        code, detail = self._error_body(resp)
        if status in (400, 422):
            raise ValidationFailed(detail)
        if status == 404:
            raise NotFound(detail)
        if status == 409:
            if code == DatasetClosed.code:
                raise DatasetClosed(detail)
            raise Conflict(detail)
        if status in (401, 403):
            raise DSMError(
                f"The DSM refused the WMS's credentials for {where} (HTTP {status}): {detail} "
                "(check WMS_DSM_TOKEN)."
            )
        raise DSMError(f"The DSM answered {where} with HTTP {status}: {detail}")

    @staticmethod
    def _error_body(resp: requests.Response) -> tuple[str, Any]:
        """``(code, detail)`` of an error answer; a body of another shape is kept as it is."""
        try:
            body = resp.json()
        except ValueError:
            return "", _snippet(resp.text) or f"HTTP {resp.status_code} with no body."
        if isinstance(body, Mapping) and "detail" in body:
            code = body.get("error")
            return (code if isinstance(code, str) else ""), body["detail"]
        return "", body

    # --- the DSM interface ----------------------------------------------------------------------

    def register_dataset(
        self,
        name: str,
        *,
        role: str = "input",
        uid: UIDLike | None = None,
        location: str = "",
    ) -> DatasetInfo:
        payload: dict[str, Any] = {"name": name, "role": role, "location": location}
        if uid is not None:
            payload["uid"] = str(uid)
        body = self._request("POST", "/datasets", body=payload)
        return _Reader("POST /datasets").dataset(body)

    def register_datasets(
        self, specs: Sequence[DatasetSpec | Mapping[str, Any]]
    ) -> list[DatasetInfo]:
        plain = [s.as_dict() if isinstance(s, DatasetSpec) else dict(s) for s in specs]
        body = self._request("POST", "/datasets/bulk", body={"datasets": plain})
        reader = _Reader("POST /datasets/bulk")
        out = [reader.dataset(d) for d in reader.items(body, "datasets")]
        if len(out) != len(plain):
            raise reader.fail(f"{len(out)} datasets for the {len(plain)} registered")
        return out

    def register_files(
        self, dataset_uid: UIDLike, files: Sequence[Mapping[str, Any]]
    ) -> list[FileInfo]:
        path = f"/datasets/{_uid_path(dataset_uid)}/files"
        plain = [dict(f) for f in check_file_specs(files)]
        if self.url_roots is not None:
            check_file_urls(plain, self.url_roots)
        body = self._request("POST", path, body={"files": plain})
        reader = _Reader(f"POST {path}")
        out = [reader.file(f) for f in reader.items(body, "files")]
        if len(out) != len(plain):
            raise reader.fail(f"{len(out)} files for the {len(plain)} registered")
        return out

    def list_files(
        self, dataset_uid: UIDLike, *, after: int | None = None, limit: int = DEFAULT_PAGE_SIZE
    ) -> FilePage:
        check_page_args(after, limit)
        path = f"/datasets/{_uid_path(dataset_uid)}/files"
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after"] = after
        body = self._request("GET", path, params=params)
        reader = _Reader(f"GET {path}")
        files = [reader.file(f) for f in reader.items(body, "files")]
        if "next_cursor" not in body:
            raise reader.fail("a body missing field 'next_cursor'")
        cursor = body["next_cursor"]
        if cursor is not None:
            cursor = reader.count(body, "next_cursor", "a body")
        if len(files) > limit:
            raise reader.fail(f"{len(files)} files for a page of at most {limit}")
        return FilePage(files=files, next_cursor=cursor)

    def get_dataset(self, dataset_uid: UIDLike) -> DatasetInfo:
        path = f"/datasets/{_uid_path(dataset_uid)}"
        return _Reader(f"GET {path}").dataset(self._request("GET", path))

    def close_dataset(
        self, dataset_uid: UIDLike, *, source: str = "dsm", reason: str = ""
    ) -> DatasetInfo:
        path = f"/datasets/{_uid_path(dataset_uid)}/close"
        body = self._request("POST", path, body={"source": source, "reason": reason})
        return _Reader(f"POST {path}").dataset(body)

    def find_datasets(
        self, pattern: str, *, role: str | None = "input", limit: int = DEFAULT_PAGE_SIZE
    ) -> list[DatasetInfo]:
        check_find_args(pattern, role, limit)
        params: dict[str, Any] = {"name": pattern, "limit": limit}
        if role is not None:
            params["role"] = role
        body = self._request("GET", "/datasets", params=params)
        reader = _Reader("GET /datasets")
        out = [reader.dataset(d) for d in reader.items(body, "datasets")]
        # The selection feeds tasks: a DSM answering another one than asked is not trusted.
        if len(out) > limit:
            raise reader.fail(f"{len(out)} datasets for a limit of {limit}")
        match = re.compile(glob_regex(pattern)).search
        for i, ds in enumerate(out):
            if not match(ds.name):
                raise reader.fail(f"dataset {ds.name!r}, which does not match {pattern!r}")
            if role is not None and ds.role != role:
                raise reader.fail(f"dataset {ds.name!r} of role {ds.role!r}, not {role!r}")
            if i and not out[i - 1].name < ds.name:
                raise reader.fail(f"datasets out of name order ({out[i - 1].name!r}, {ds.name!r})")
        return out
