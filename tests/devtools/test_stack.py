"""The process orchestration of ``manage.py up`` (devtools/stack.py), on the embedded default:
real child processes (web app, worker with beat), real SQLite and filesystem broker in a
temporary var dir. What is checked: the web app becomes healthy, the worker takes work published
by another process, and nothing is left running afterwards, on a normal stop as on SIGTERM."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from devtools.stack import Stack, StackConfig, StackError, free_port
from payloads import histo

ROOT = Path(__file__).resolve().parents[2]
UNSET = (
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "WMS_ENV_FILE",
    "DJANGO_SETTINGS_MODULE",
    "WMS_DSM_BACKEND",
    "WMS_DSM_URL",
)


class Lines(io.TextIOBase):
    """A thread-safe sink for the children's prefixed output."""

    def __init__(self) -> None:
        self._buf: list[str] = []
        self._lock = threading.Lock()

    def write(self, s: str) -> int:
        with self._lock:
            self._buf.append(s)
        return len(s)

    def text(self) -> str:
        with self._lock:
            return "".join(self._buf)

    def wait_for(self, needle: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not seen in:\n{self.text()[-4000:]}")
            time.sleep(0.2)


@pytest.fixture
def embedded(tmp_path, monkeypatch):
    for key in UNSET:
        monkeypatch.delenv(key, raising=False)
    var = tmp_path / "var"
    monkeypatch.setenv("WMS_VAR_DIR", str(var))
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v0"],
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    return var


def gone(pids: list[int]) -> list[int]:
    """The pids still alive (zombies count as gone)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def tree(pid: int) -> list[int]:
    try:
        proc = psutil.Process(pid)
        return [pid, *(c.pid for c in proc.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_stack_runs_web_and_worker_across_processes_and_stops_everything(embedded):
    out = Lines()
    config = StackConfig(
        var_dir=embedded,
        broker_url="filesystem://",
        register_token="unused",
        broker_options={},
        devices=(),
        stop_timeout=20,
    )
    stack = Stack(config, out=out)
    pids: list[int] = []
    with stack:
        stack.start(healthy_timeout=90)
        out.wait_for("ready.", timeout=90)  # the worker
        pids = [p for c in stack.children for p in tree(c.proc.pid)]
        # another process publishes a task; the worker (and only it) consumes it
        code = stack.run_child(
            "kick",
            [
                sys.executable,
                "-c",
                "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', "
                "'config.settings'); django.setup(); from config.celery import app; "
                "app.send_task('wms.reconcile_queued')",
            ],
            timeout=60,
        )
        assert code == 0
        out.wait_for("wms.reconcile_queued", timeout=30)
        out.wait_for("succeeded", timeout=30)
        assert stack.dead() == []

    text = out.text()
    assert "[web]" in text and "[worker]" in text
    assert "[up] stopping worker" in text and "[up] stopping web" in text
    assert gone(pids) == []


@pytest.mark.slow
def test_wait_healthy_reports_a_web_app_that_died(embedded, tmp_path):
    config = StackConfig(
        var_dir=embedded,
        broker_url="filesystem://",
        register_token="unused",
        devices=(),
        python=sys.executable,
    )
    stack = Stack(config, out=Lines())
    with stack:
        stack.spawn("web", [sys.executable, "-c", "raise SystemExit(3)"])
        with pytest.raises(StackError, match="web exited with code 3"):
            stack.wait_healthy(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 0), (signal.SIGTERM, 143)])
def test_up_without_demo_stops_every_child_on_ctrl_c_or_sigterm(embedded, sig, status):
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    up = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "up",
            "--no-demo",
            "--addr",
            f"127.0.0.1:{port}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 120
        assert up.stdout is not None
        for line in up.stdout:
            seen.append(line)
            if "WMS up:" in line or time.monotonic() > deadline:
                break
        assert any(f"http://127.0.0.1:{port}/admin/" in line for line in seen), "".join(seen)
        children = tree(up.pid)[1:]
        assert len(children) >= 4  # web, worker (and its pool), a CPU and a GPU pilot

        up.send_signal(sig)  # Ctrl-C reaches up alone: its children are in their own sessions
        rest, _ = up.communicate(timeout=90)
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode == status, "".join(seen) + rest
    assert "stopping pilot-cpu, pilot-gpu" in rest
    assert "stopping worker" in rest and "stopping web" in rest
    assert gone(children) == []


@pytest.mark.slow
def test_up_runs_the_whole_demo_and_exits_0_on_the_embedded_default(embedded):
    """The README's first command (on a var dir of its own): everything up, the demo's jobs
    through real pilots, outputs checked, everything down, exit 0."""
    proc = subprocess.run(
        [sys.executable, "manage.py", "up", "--addr", f"127.0.0.1:{free_port()}"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )

    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "[demo] demo OK: every job finished, every output checked" in out
    # development mode switched on explicitly (the settings' default is production's)
    assert "development operator account created: admin / admin" in out
    assert "24 finished, 0 failed" in out and "6 finished, 0 failed" in out
    assert "stopping pilot-cpu, pilot-gpu" in out
    merged = sorted((embedded / "demo").glob("*/merged-cpu.json"))
    assert len(merged) == 1
    assert histo.load(merged[0]).entries == 24 * 50_000


def test_pilots_get_their_secrets_on_standard_input_only(tmp_path):
    """The registration token and the broker's password are neither on a pilot's command line
    nor in its environment (docs/pilot.md "Secrets"); they are written to its stdin."""
    config = StackConfig(
        var_dir=tmp_path,
        broker_url="amqp://pilot:s3cr%40t@mq.example:5672/wms",
        register_token="tok-123",
    )
    stack = Stack(config, env={"DATABASE_URL": "postgres://u:dbpw@db/wms", "OTHER": "kept"})

    argv = stack.pilot_argv("cpu", 0)
    env = stack.pilot_child_env()

    shown = " ".join(argv) + " " + " ".join(f"{k}={v}" for k, v in env.items())
    assert "tok-123" not in shown and "s3cr" not in shown and "dbpw" not in shown
    assert env["OTHER"] == "kept" and env["WMS_SERVER_URL"] == stack.server_url
    assert argv[argv.index("--broker-url") + 1] == "amqp://pilot@mq.example:5672/wms"
    assert argv[argv.index("--register-token-file") + 1] == "-"
    assert argv[argv.index("--broker-password-file") + 1] == "-"
    assert stack.pilot_secrets() == "tok-123\ns3cr@t\n"  # the pilot quotes it back
    assert ("--payload-user" in argv) == (os.geteuid() == 0)  # as root: said explicitly
