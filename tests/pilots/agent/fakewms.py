"""A tiny stand-in for the WMS's pilot endpoints (docs/pilot-api.md), stdlib http.server only.

It checks the authentication the way the contract says (a user token to register, the pilot's
own token afterwards), records every request, and answers what the test tells it to.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REGISTER_TOKEN = "user-token-for-tests"


@dataclass
class Call:
    path: str
    auth: str
    body: Any
    at: float = field(default_factory=time.monotonic)
    key: str = ""  # the Idempotency-Key header
    spooled: list[str] = field(default_factory=list)  # spool files at the moment of the call


Answer = tuple[int, Any]


class FakeWMS:
    def __init__(
        self,
        *,
        bus_prefix: str = "wms",
        pilot_id: int = 7,
        heartbeat_interval: float = 0.2,
        spool_dir: Any = None,
    ) -> None:
        self.bus_prefix = bus_prefix
        self.queue_type: str | None = None  # named in the registration answer when set
        self.next_pilot_id = pilot_id
        self.heartbeat_interval = heartbeat_interval
        self.spool_dir = spool_dir
        self.tokens: dict[str, int] = {}  # pilot token -> pilot id
        self.calls: list[Call] = []
        self.jobs: dict[str, dict] = {}  # job uuid -> message dict, returned by start's 200
        self.start_answer: Callable[[str, dict], Answer] = lambda uuid, body: (
            200,
            self.jobs.get(uuid, {}),
        )
        self.report_answer: Callable[[str, dict], Answer] = lambda uuid, body: (
            200,
            {"job_state": body.get("state"), "outcome": "applied"},
        )
        self.heartbeat_answer: Callable[[dict], Answer] | None = None
        self.commands: list[dict] = []  # handed out by the next heartbeat, once
        self.running_now = 0  # jobs started and not yet finally reported
        self.max_running = 0
        self.starts_calls: list[int] = []  # the size of each batched starts call
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- the server ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def start(self) -> FakeWMS:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    body = None
                status, answer = fake.dispatch(
                    self.path,
                    self.headers.get("Authorization", ""),
                    body,
                    key=self.headers.get("Idempotency-Key", ""),
                )
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # --- the endpoints ---------------------------------------------------------------------------

    def dispatch(self, path: str, auth: str, body: Any, *, key: str = "") -> Answer:
        call = Call(path, auth, body, key=key)
        if self.spool_dir is not None:
            call.spooled = sorted(p.name for p in self.spool_dir.glob("*.report.json"))
        with self.lock:
            self.calls.append(call)
        parts = [p for p in path.split("/") if p]  # api v1 <pilots|jobs> <id> <verb>
        if parts[:2] != ["api", "v1"] or body is None:
            return 400, {"error": "bad_request", "detail": path}
        if parts[2:] == ["pilots", "register"]:
            if auth != f"Token {REGISTER_TOKEN}":
                return 401, {"error": "not_authenticated", "detail": "bad user token"}
            with self.lock:
                pilot_id = self.next_pilot_id
                self.next_pilot_id += 1
                token = f"pilot-token-{pilot_id}"
                self.tokens[token] = pilot_id
            return 201, {
                "pilot_id": pilot_id,
                "token": token,
                "device_type": body.get("device_type", "cpu"),
                "job_queue": f"{self.bus_prefix}.jobs.{body.get('device_type', 'cpu')}",
                "command_queue": f"{self.bus_prefix}.pilot.{pilot_id}",
                "bus_prefix": self.bus_prefix,
                **({"queue_type": self.queue_type} if self.queue_type else {}),
                "heartbeat_interval": self.heartbeat_interval,
            }
        scheme, _, token = auth.partition(" ")
        if scheme != "Pilot" or token not in self.tokens:
            return 401, {"error": "not_authenticated", "detail": "bad pilot token"}
        kind, ident, verb = parts[2], parts[3], parts[4]
        if kind == "pilots":
            if str(self.tokens[token]) != ident:
                return 403, {"error": "forbidden", "detail": "not this pilot"}
            if verb == "heartbeat":
                if self.heartbeat_answer is not None:
                    return self.heartbeat_answer(body)
                with self.lock:
                    commands, self.commands = self.commands, []
                return 200, {"commands": commands, "heartbeat_interval": self.heartbeat_interval}
            if verb == "terminate":
                return 200, {"state": "terminated"}
            if verb == "events":
                return self._events(auth, body, call)
            if verb == "starts":
                return self._starts(auth, body, call)
        if kind == "jobs" and verb == "start":
            status, answer = self.start_answer(ident, body)
            if status == 200:
                with self.lock:
                    self.running_now += 1
                    self.max_running = max(self.max_running, self.running_now)
            return status, answer
        if kind == "jobs" and verb == "report":
            status, answer = self.report_answer(ident, body)
            if status == 200 and body.get("state") in ("finished", "failed"):
                with self.lock:
                    self.running_now -= 1
            return status, answer
        return 404, {"error": "not_found", "detail": path}

    def _starts(self, auth: str, body: Any, call: Call) -> Answer:
        """The batched starts: each answered by ``start_answer`` as its own ``start`` would be
        (and recorded as one, so ``calls_to("start")`` sees it); a 5xx of any answers the whole
        call. ``starts_calls`` counts the calls."""
        starts = body.get("starts") if isinstance(body, dict) else None
        if not isinstance(starts, list) or not starts:
            return 400, {"error": "validation_failed", "detail": "starts"}
        with self.lock:
            self.starts_calls.append(len(starts))
        results = []
        for entry in starts:
            ident = str(entry.get("job_uuid", ""))
            start = {k: v for k, v in entry.items() if k != "job_uuid"}
            with self.lock:
                self.calls.append(Call(f"/api/v1/jobs/{ident}/start/", auth, start, key=call.key))
            status, answer = self.start_answer(ident, start)
            if status >= 500:
                return status, answer
            head = {"job_uuid": ident, "attempt": start.get("attempt")}
            if status == 200:
                with self.lock:
                    self.running_now += 1
                    self.max_running = max(self.max_running, self.running_now)
                results.append({**head, "outcome": "started", "job": answer})
            else:
                results.append(
                    {
                        **head,
                        "error": answer.get("error", "refused"),
                        "detail": answer.get("detail"),
                    }
                )
        return 200, {"results": results}

    def _events(self, auth: str, body: Any, call: Call) -> Answer:
        """The bulk reports: each event answered by ``report_answer`` as its own ``report``
        would be (and recorded as one, so ``final_reports`` sees it); a 5xx of any answers the
        whole call."""
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list) or not events:
            return 400, {"error": "validation_failed", "detail": "events"}
        results = []
        for event in events:
            ident = str(event.get("job_uuid", ""))
            report = {k: v for k, v in event.items() if k != "job_uuid"}
            with self.lock:
                self.calls.append(
                    Call(
                        f"/api/v1/jobs/{ident}/report/",
                        auth,
                        report,
                        key=call.key,
                        spooled=call.spooled,
                    )
                )
            status, answer = self.report_answer(ident, report)
            if status >= 500:
                return status, answer
            head = {"job_uuid": ident, "attempt": report.get("attempt")}
            if status == 200:
                if report.get("state") in ("finished", "failed"):
                    with self.lock:
                        self.running_now -= 1
                results.append({**head, "outcome": "applied", "job_state": "", **answer})
            else:
                results.append(
                    {
                        **head,
                        "error": answer.get("error", "refused"),
                        "detail": answer.get("detail"),
                    }
                )
        return 200, {"results": results}

    # --- what the tests read ---------------------------------------------------------------------

    def calls_to(self, verb: str, ident: str | None = None) -> list[Call]:
        with self.lock:
            calls = list(self.calls)
        out = []
        for c in calls:
            parts = [p for p in c.path.split("/") if p]
            if parts and parts[-1] == verb and (ident is None or ident in parts):
                out.append(c)
        return out

    def final_reports(self, job_uuid: str | None = None) -> list[Call]:
        return [
            c
            for c in self.calls_to("report", job_uuid)
            if isinstance(c.body, dict) and c.body.get("state") in ("finished", "failed")
        ]


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)
