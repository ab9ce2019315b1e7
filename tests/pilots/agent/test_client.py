"""The REST client: the environment's proxy and CA settings, read once per session."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from pilots.agent.client import OK, RETRY, PilotClient


@pytest.fixture
def proxy() -> Iterator[tuple[str, list[str]]]:
    """A stand-in HTTP proxy: records each request line and answers 200 itself."""
    lines: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            lines.append(self.requestline)
            data = json.dumps({"outcome": "applied"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", lines
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("name", ["HTTP_PROXY", "http_proxy"])
def test_requests_go_through_the_environment_s_proxy(monkeypatch, proxy, name):
    proxy_url, lines = proxy
    for var in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(name, proxy_url)
    client = PilotClient("http://wms.invalid", timeout=5, token="t", pilot_id=1)

    result = client.report("abc", {"state": "running"})
    client.report("abc", {"state": "running"})  # the same session, settings kept

    assert result.outcome == OK
    assert lines == ["POST http://wms.invalid/api/v1/jobs/abc/report/ HTTP/1.1"] * 2


def test_no_proxy_is_honoured(monkeypatch, proxy):
    proxy_url, lines = proxy
    monkeypatch.setenv("HTTP_PROXY", proxy_url)
    monkeypatch.setenv("NO_PROXY", "wms.invalid")
    client = PilotClient("http://wms.invalid", timeout=5, token="t", pilot_id=1)

    result = client.report("abc", {"state": "running"})

    assert result.outcome == RETRY and result.status is None  # went direct: no such host
    assert lines == []


def test_the_ca_bundle_of_the_environment_is_used(monkeypatch, tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    client = PilotClient("https://wms.invalid", timeout=5)

    assert client.session.verify == str(bundle)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    assert PilotClient("https://wms.invalid").session.verify is True
