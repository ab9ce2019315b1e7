"""A fake external DSM: the REST contract of docs/dsm.md, in memory, on a real socket.

Pure stdlib (``http.server``): a ``ThreadingHTTPServer`` on 127.0.0.1, on a free port, served
from a background thread. Tests drive failures through :meth:`FakeDSM.inject`::

    server.inject("status", times=2, status=503)   # the next 2 requests answer 503
    server.inject("status", times=math.inf)         # every request answers 503
    server.inject("slow", delay=1.0)                # sleep before handling (nothing applied)
    server.inject("slow_after", delay=1.0)          # apply, then sleep before answering
    server.inject("drop")                           # close the connection without an answer
    server.inject("body", status=200, payload=b"{not json")   # answer this body instead

A fault may be narrowed to requests whose path contains ``match``. Every request is recorded
(``server.requests``) with its method, path, query and headers.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

ROLES = ("input", "output")
CHECKSUM_RE = re.compile(r"^(adler32:[0-9a-f]{8}|sha256:[0-9a-f]{64}|md5:[0-9a-f]{32})$")
MAX_LIMIT = 10_000


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: Any) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


@dataclass
class Fault:
    kind: str
    times: float = 1
    status: int = 503
    delay: float = 0.0
    payload: Any = None
    match: str | None = None


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any = None


@dataclass
class _Dataset:
    uid: str
    name: str
    role: str
    location: str
    state: str = "open"
    files: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "name": self.name,
            "role": self.role,
            "state": self.state,
            "file_count": len(self.files),
            "total_size": sum(f["size"] for f in self.files),
            "location": self.location,
        }


class FakeDSM:
    """The in-memory DSM and its HTTP server. ``start()`` / ``stop()``, or use as a context."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self.datasets: dict[str, _Dataset] = {}
        self.replies: dict[str, tuple[int, Any]] = {}  # Idempotency-Key → the first answer
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._next_file_id = 1
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.fake = self  # type: ignore[attr-defined]
        self._httpd.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_port}"

    def start(self) -> FakeDSM:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()  # wakes every handler sleeping in a "slow" fault
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeDSM:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- test helpers -----------------------------------------------------------------------

    def inject(self, kind: str, *, times: float = 1, **kwargs: Any) -> None:
        assert kind in ("status", "slow", "slow_after", "drop", "body"), kind
        with self.lock:
            self.faults.append(Fault(kind=kind, times=times, **kwargs))

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def count(self, method: str | None = None, path: str | None = None) -> int:
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method) and (path is None or r.path == path)
        )

    def _take_fault(self, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.times > 0 and (fault.match is None or fault.match in path):
                    fault.times -= 1
                    return fault
        return None

    # --- the contract (called with self.lock held) ---------------------------------------------

    def _dataset(self, uid: str) -> _Dataset:
        ds = self.datasets.get(uid)
        if ds is None:
            raise ApiError(404, "not_found", f"Dataset {uid} does not exist.")
        return ds

    def _clean_dataset(self, spec: Any, taken_names: set[str], taken_uids: set[str]) -> _Dataset:
        if not isinstance(spec, dict):
            raise ApiError(400, "validation_failed", "A dataset must be a JSON object.")
        name = spec.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ApiError(400, "validation_failed", {"name": ["This field is required."]})
        role = spec.get("role", "input")
        if role not in ROLES:
            raise ApiError(400, "validation_failed", {"role": [f"Must be one of {ROLES}."]})
        raw_uid = spec.get("uid")
        try:
            uid = str(uuid.UUID(raw_uid)) if raw_uid is not None else str(uuid.uuid4())
        except (ValueError, TypeError, AttributeError) as exc:
            raise ApiError(400, "validation_failed", {"uid": ["Must be a UUID."]}) from exc
        name = name.strip()
        if name in taken_names or uid in taken_uids:
            raise ApiError(409, "conflict", f"A dataset named {name!r} (or this uid) exists.")
        taken_names.add(name)
        taken_uids.add(uid)
        return _Dataset(uid=uid, name=name, role=role, location=str(spec.get("location") or ""))

    def _taken(self) -> tuple[set[str], set[str]]:
        return {d.name for d in self.datasets.values()}, set(self.datasets)

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any):
        parts = [p for p in path.split("/") if p]
        if method == "POST" and parts == ["datasets"]:
            ds = self._clean_dataset(body, *self._taken())
            self.datasets[ds.uid] = ds
            return 201, ds.as_json()
        if method == "GET" and parts == ["datasets"]:
            return 200, {"datasets": self._find(query)}
        if method == "POST" and parts == ["datasets", "bulk"]:
            specs = body.get("datasets") if isinstance(body, dict) else None
            if not isinstance(specs, list) or not specs:
                raise ApiError(400, "validation_failed", {"datasets": ["A non-empty list."]})
            names, uids = self._taken()
            new = [self._clean_dataset(s, names, uids) for s in specs]  # all or none
            for ds in new:
                self.datasets[ds.uid] = ds
            return 201, {"datasets": [ds.as_json() for ds in new]}
        if len(parts) == 2 and parts[0] == "datasets" and method == "GET":
            return 200, self._dataset(parts[1]).as_json()
        if len(parts) == 3 and parts[0] == "datasets" and parts[2] == "close":
            if method != "POST":
                raise ApiError(405, "method_not_allowed", "Use POST.")
            ds = self._dataset(parts[1])
            ds.state = "closed"
            return 200, ds.as_json()
        if len(parts) == 3 and parts[0] == "datasets" and parts[2] == "files":
            ds = self._dataset(parts[1])
            if method == "GET":
                return 200, self._list(ds, query)
            if method == "POST":
                return 201, {"files": self._add(ds, body)}
        raise ApiError(404, "not_found", f"No route for {method} {path}.")

    def _list(self, ds: _Dataset, query: dict[str, list[str]]) -> dict[str, Any]:
        try:
            after = int(query["after"][0]) if "after" in query else 0
            limit = int(query.get("limit", ["1000"])[0])
        except ValueError as exc:
            raise ApiError(400, "validation_failed", "after and limit are integers.") from exc
        if not 1 <= limit <= MAX_LIMIT or after < 0:
            raise ApiError(400, "validation_failed", {"limit": [f"1 to {MAX_LIMIT}."]})
        rest = [f for f in ds.files if f["id"] > after]
        page = rest[:limit]
        return {"files": page, "next_cursor": page[-1]["id"] if len(rest) > limit else None}

    def _find(self, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        """``GET /datasets?name=<glob>&role=&limit=``: a glob over the whole name, by name."""
        errors: dict[str, list[str]] = {}
        name = query.get("name", [""])[0]
        if not name.strip() or len(name) > 255 or not name.strip("*?"):
            errors["name"] = ["A glob of 1 to 255 characters, not wildcards only."]
        role = query.get("role", [None])[0]
        if role is not None and role not in ROLES:
            errors["role"] = [f"One of {list(ROLES)}."]
        try:
            limit = int(query.get("limit", ["1000"])[0])
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_LIMIT:
            errors["limit"] = [f"1 to {MAX_LIMIT}."]
        if errors:
            raise ApiError(400, "validation_failed", errors)
        # Written apart from files.dsm.glob_regex on purpose: the fake checks the client.
        regex = re.compile(
            "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in name),
            re.DOTALL,
        )
        found = [
            d
            for d in self.datasets.values()
            if regex.fullmatch(d.name) and (role is None or d.role == role)
        ]
        return [d.as_json() for d in sorted(found, key=lambda d: d.name)[:limit]]

    def _add(self, ds: _Dataset, body: Any) -> list[dict[str, Any]]:
        files = body.get("files") if isinstance(body, dict) else None
        if not isinstance(files, list) or not files:
            raise ApiError(400, "validation_failed", {"files": ["A non-empty list."]})
        if ds.state != "open":
            raise ApiError(409, "dataset_closed", f"Dataset {ds.name} is closed.")
        existing = {f["name"] for f in ds.files}
        new = []
        for i, f in enumerate(files):
            name = f.get("name") if isinstance(f, dict) else None
            size = f.get("size", 0) if isinstance(f, dict) else None
            check_sum = (f.get("check_sum") or "") if isinstance(f, dict) else ""
            if not isinstance(name, str) or not name or not isinstance(size, int) or size < 0:
                raise ApiError(400, "validation_failed", {f"files[{i}]": "name, size >= 0"})
            if check_sum and not CHECKSUM_RE.match(check_sum):
                raise ApiError(400, "validation_failed", {f"files[{i}]": {"check_sum": "bad"}})
            if name in existing:
                raise ApiError(409, "conflict", f"File {name} already in dataset {ds.name}.")
            existing.add(name)
            new.append(
                {"name": name, "size": size, "check_sum": check_sum, "url": f.get("url") or ""}
            )
        for f in new:
            f["id"] = self._next_file_id
            self._next_file_id += 1
        ds.files.extend(new)
        return [{k: f[k] for k in ("id", "name", "size", "check_sum", "url")} for f in new]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real server: the client's pool is exercised
    server_version = "FakeDSM/1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _send(self, status: int, payload: Any) -> None:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        except OSError:  # the client gave up (read timeout) and closed the socket
            self.close_connection = True

    def _serve(self, method: str) -> None:
        fake: FakeDSM = self.server.fake  # type: ignore[attr-defined]
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = ...
        with fake.lock:
            fake.requests.append(
                Recorded(method, split.path, parse_qs(split.query), dict(self.headers), body)
            )
        fault = fake._take_fault(split.path)
        if fault is not None:
            if fault.kind == "status":
                self._send(fault.status, {"error": "unavailable", "detail": "Injected failure."})
                return
            if fault.kind == "body":
                self._send(fault.status, fault.payload)
                return
            if fault.kind == "drop":
                self.close_connection = True
                return
            if fault.kind == "slow":
                fake.stopping.wait(fault.delay)
        if fake.token is not None and self.headers.get("Authorization") != f"Bearer {fake.token}":
            self._send(401, {"error": "not_authenticated", "detail": "Bad or missing token."})
            return
        if body is ...:
            self._send(400, {"error": "validation_failed", "detail": "The body is not JSON."})
            return
        key = self.headers.get("Idempotency-Key") if method == "POST" else None
        with fake.lock:
            if key is not None and key in fake.replies:
                status, payload = fake.replies[key]
            else:
                try:
                    status, payload = fake.handle(method, split.path, parse_qs(split.query), body)
                except ApiError as exc:
                    status, payload = exc.status, {"error": exc.code, "detail": exc.detail}
                if key is not None:
                    fake.replies[key] = (status, payload)
        if fault is not None and fault.kind == "slow_after":
            fake.stopping.wait(fault.delay)
        self._send(status, payload)


__all__ = ["FakeDSM", "Fault", "Recorded"]
