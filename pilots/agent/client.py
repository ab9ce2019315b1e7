"""The pilot's side of the REST protocol (docs/pilot-api.md), with retries and backoff.

Every answer is classified the way the contract says a pilot must treat it:

- ``ok`` (2xx): done;
- ``conflict`` (409): final, nothing to retry;
- ``rejected`` (other 4xx): a bug on the pilot's side, logged, the request is dropped;
- ``retry`` (5xx, connection errors, time-outs): try again later, with backoff.

Every POST carries an ``Idempotency-Key`` (docs/pilot-api.md): a uuid4 made once per logical
call and sent again with each of its retries (``key=``; :meth:`PilotClient.post_retrying`
makes one for all its tries), so a call whose answer was lost can be sent again without
doing twice what it did. Every request has a (connect, read) time-out.

The bodies are built by the caller with ``wms.contract`` (``pilots.agent.session``: every
body is a contract object's ``to_dict()``); the spool's sender re-sends the report bodies it
stored.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import requests

from pilots.agent import __version__
from pilots.agent.logs import kv, log

OK = "ok"
CONFLICT = "conflict"
REJECTED = "rejected"
RETRY = "retry"

API = "/api/v1"
IDEMPOTENCY_HEADER = "Idempotency-Key"


def new_key() -> str:
    """A new idempotency key: one per logical call, reused by its retries."""
    return str(uuid.uuid4())


@dataclass
class ApiResult:
    outcome: str  # ok | conflict | rejected | retry
    status: int | None  # None: no HTTP answer (connection refused, time-out)
    body: Any = field(default=None)
    error: str = ""  # the "error" code of a 4xx/5xx body, or the exception text

    @property
    def ok(self) -> bool:
        return self.outcome == OK

    def describe(self) -> str:
        if self.status is None:
            return f"no answer ({self.error})"
        return f"HTTP {self.status}" + (f" {self.error}" if self.error else "")


def classify(status: int) -> str:
    if 200 <= status < 300:
        return OK
    if status == 409:
        return CONFLICT
    if 400 <= status < 500:
        return REJECTED
    return RETRY


class Backoff:
    """Exponential backoff with jitter: first, 2*first, ... capped at ``maximum``."""

    def __init__(self, first: float = 1.0, maximum: float = 60.0) -> None:
        self.first = first
        self.maximum = maximum
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    def next(self) -> float:
        delay = min(self.maximum, self.first * (2 ** min(self.failures, 30)))
        self.failures += 1
        return delay * random.uniform(0.8, 1.0)


def _settle_environment(session: requests.Session, server_url: str) -> None:
    """Read the environment's proxies and CA bundle once, for the one server this session
    talks to, instead of at every request: with ``trust_env`` a request walks the whole
    environment for proxies (~1/4 of its CPU) and looks for a ``~/.netrc``. The same settings
    as requests would find (``HTTP(S)_PROXY``/``NO_PROXY``, ``REQUESTS_CA_BUNDLE``,
    ``CURL_CA_BUNDLE``); a ``.netrc`` is not read (every call sends its own Authorization)."""
    session.proxies.update(requests.utils.get_environ_proxies(server_url))
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    session.trust_env = False


class PilotClient:
    """REST calls of one pilot. ``token`` is the pilot's own token, set after registration."""

    def __init__(
        self,
        server_url: str,
        *,
        timeout: float = 30.0,
        token: str = "",
        pilot_id: int | None = None,
    ) -> None:
        self.server_url = server_url.rstrip("/")
        self.timeout = (min(timeout, 10.0), timeout)  # (connect, read)
        self.token = token
        self.pilot_id = pilot_id
        self._local = threading.local()  # requests.Session is not thread-safe: one per thread

    @property
    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = f"wms-pilot/{__version__}"
            _settle_environment(session, self.server_url)
            self._local.session = session
        return session

    def close(self) -> None:
        session = getattr(self._local, "session", None)
        if session is not None:
            session.close()
            self._local.session = None

    # --- plumbing ------------------------------------------------------------------------------

    def post(
        self, path: str, payload: dict[str, Any], *, auth: str, key: str | None = None
    ) -> ApiResult:
        """One POST with its idempotency ``key`` (a new one if None); never raises for HTTP or
        network trouble (the result says what happened)."""
        url = f"{self.server_url}{API}{path}"
        headers = {"Authorization": auth, IDEMPOTENCY_HEADER: key or new_key()}
        try:
            response = self.session.post(url, json=payload, headers=headers, timeout=self.timeout)
        except requests.RequestException as exc:
            return ApiResult(RETRY, None, None, f"{type(exc).__name__}: {exc}")
        try:
            body = response.json() if response.content else None
        except ValueError:
            body = response.text[:500]
        error = ""
        if response.status_code >= 400:
            error = str(body.get("error", "")) if isinstance(body, dict) else ""
        return ApiResult(classify(response.status_code), response.status_code, body, error)

    def post_retrying(
        self,
        path: str,
        payload: dict[str, Any],
        *,
        auth: str,
        retries: int,
        backoff: Backoff | None = None,
        stop: threading.Event | None = None,
    ) -> ApiResult:
        """POST, retried on ``retry`` outcomes up to ``retries`` more times (or until ``stop``),
        every try with the same idempotency key."""
        backoff = backoff or Backoff(1.0, 30.0)
        key = new_key()
        result = self.post(path, payload, auth=auth, key=key)
        for _ in range(retries):
            if result.outcome != RETRY:
                break
            delay = backoff.next()
            log.warning(kv("api_retry", path=path, answer=result.describe(), wait=f"{delay:.1f}"))
            if stop is not None:
                if stop.wait(delay):
                    break
            else:
                time.sleep(delay)
            result = self.post(path, payload, auth=auth, key=key)
        return result

    def _pilot_auth(self, token: str | None = None) -> str:
        return f"Pilot {token or self.token}"

    # --- the endpoints -------------------------------------------------------------------------

    def register(
        self,
        payload: dict[str, Any],
        *,
        register_token: str,
        retries: int = 0,
        stop: threading.Event | None = None,
    ) -> ApiResult:
        return self.post_retrying(
            "/pilots/register/",
            payload,
            auth=f"Token {register_token}",
            retries=retries,
            backoff=Backoff(1.0, 60.0),
            stop=stop,
        )

    def heartbeat(self, payload: dict[str, Any]) -> ApiResult:
        return self.post(f"/pilots/{self.pilot_id}/heartbeat/", payload, auth=self._pilot_auth())

    def terminate(self, payload: dict[str, Any], *, retries: int = 2) -> ApiResult:
        return self.post_retrying(
            f"/pilots/{self.pilot_id}/terminate/",
            payload,
            auth=self._pilot_auth(),
            retries=retries,
            backoff=Backoff(0.5, 5.0),
        )

    def start(self, job_uuid: str, payload: dict[str, Any], *, key: str | None = None) -> ApiResult:
        """One try; the caller sends it again with the same ``key`` while its outcome is
        unknown (``retry``), then requeues the message."""
        return self.post(f"/jobs/{job_uuid}/start/", payload, auth=self._pilot_auth(), key=key)

    def starts(self, payload: dict[str, Any], *, key: str | None = None) -> ApiResult:
        """Several starts in one call (``POST /pilots/{id}/starts/``); one try, as
        :meth:`start`."""
        return self.post(
            f"/pilots/{self.pilot_id}/starts/", payload, auth=self._pilot_auth(), key=key
        )

    def report(
        self,
        job_uuid: str,
        payload: dict[str, Any],
        *,
        token: str | None = None,
        key: str | None = None,
    ) -> ApiResult:
        """One try; final reports are retried by the spool's sender, with the token and the
        key stored there."""
        return self.post(
            f"/jobs/{job_uuid}/report/", payload, auth=self._pilot_auth(token), key=key
        )

    def events(
        self,
        pilot_id: int,
        payload: dict[str, Any],
        *,
        token: str | None = None,
        key: str | None = None,
    ) -> ApiResult:
        """Several reports in one call (``POST /pilots/{id}/events/``); one try, as
        :meth:`report`."""
        return self.post(
            f"/pilots/{pilot_id}/events/", payload, auth=self._pilot_auth(token), key=key
        )
