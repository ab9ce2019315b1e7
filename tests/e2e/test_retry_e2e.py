"""Issue 13, "every pilot call can be retried", with real processes: the answers of the first
``start`` calls are lost on their way back (a proxy between the pilot and the web app forwards
the call, the server commits, the proxy closes the connection instead of passing the answer
on). The pilot sends the same start again with the same idempotency key, gets the job message,
and the task finishes with no manual step: every job finished in exactly one attempt."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

import pytest

from jobs.models import AttemptState, Job, JobState
from tasks.models import TaskState
from tests.e2e.conftest import wait_until
from tests.e2e.test_pilots_e2e import FINAL, _dataset, _task
from tests.factories import UserFactory
from wms.models import IdempotentRequest

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class AnswerDroppingProxy:
    """An HTTP/1.1 proxy to ``upstream``: every request is forwarded and answered, except the
    first ``drop`` calls to a ``.../start/`` path, whose answer is read from the server and
    then thrown away, the pilot's connection closed without a byte."""

    def __init__(self, upstream: str, *, drop: int) -> None:
        self.upstream = urlparse(upstream)
        self.drop = drop
        self.dropped: list[str] = []  # the paths whose answers were lost
        self.forwarded = 0
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _lose(self, path: str) -> bool:
        with self.lock:
            self.forwarded += 1
            if path.endswith("/start/") and len(self.dropped) < self.drop:
                self.dropped.append(path)
                return True
            return False

    def start(self) -> AnswerDroppingProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # the pilot's session keeps its connection

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream = http.client.HTTPConnection(
                    proxy.upstream.hostname or "127.0.0.1", proxy.upstream.port, timeout=30
                )
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                finally:
                    upstream.close()
                if proxy._lose(self.path):  # the server answered; the pilot never hears it
                    self.close_connection = True
                    return
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def proxy_to():
    proxies: list[AnswerDroppingProxy] = []

    def make(upstream: str, *, drop: int) -> AnswerDroppingProxy:
        proxies.append(AnswerDroppingProxy(upstream, drop=drop).start())
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.stop()


def test_lost_start_answers_heal_and_the_task_finishes(make_stack, proxy_to, tmp_path):
    owner = UserFactory()
    uid = _dataset(tmp_path, "e2e.lost-answers", 6)
    # the web app and the worker; the one pilot is started below, talking through the proxy
    stack, out = make_stack(cpu=0, gpu=0, env={"WMS_FINALIZE_EVERY": "1"})
    proxy = proxy_to(stack.server_url, drop=3)
    argv = [*stack.pilot_argv("cpu", 0), "--server-url", proxy.url, "--slots", "2"]
    stack.spawn(
        "pilot-cpu",
        argv,
        whole_env=stack.pilot_child_env(),
        stdin_text=stack.pilot_secrets(),
    )
    task = _task(owner, uid, tmp_path, "lost-answers")

    wait_until(
        lambda: (
            Job.objects.filter(task=task).count() == 6
            and not Job.objects.filter(task=task).exclude(state__in=FINAL).exists()
        ),
        timeout=180,
        what="every job to end",
        out=out,
    )
    wait_until(
        lambda: task.__class__.objects.get(pk=task.pk).state == TaskState.FINISHED,
        timeout=60,
        what="the task to finish",
        out=out,
    )

    assert len(proxy.dropped) == 3  # three start answers were lost
    for job in Job.objects.filter(task=task):
        assert job.state == JobState.FINISHED, out.text()[-4000:]
        # one attempt, finished: the lost answers did not make the job run twice or wait
        assert [(a.number, a.state) for a in job.attempts.all()] == [(0, AttemptState.FINISHED)]
    # each lost answer was healed by the same call sent again: replayed from the key store
    text = out.text()
    assert text.count("job_start_retry") >= 3, text[-4000:]
    assert text.count("idempotent_replay") >= 3, text[-4000:]
    assert IdempotentRequest.objects.filter(key__isnull=False).count() > 0
    stack.check_alive()
