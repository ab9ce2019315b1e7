"""The whole WMS as child processes: web app, Celery worker with beat, local pilots.

``manage.py up`` uses it, and so can end-to-end tests::

    stack = Stack(StackConfig(var_dir=..., broker_url=..., register_token=...), env={...})
    with stack:                      # stop() on the way out, whatever happens
        stack.start()                # web on a free port, worker + beat, /healthz answers 200,
                                     # then one pilot per device type
        code = stack.run_child("demo", [*stack.manage, "demo"])   # or anything else

Every child runs in its own process group (session), its output is copied line by line to
``out`` prefixed with its name (``[web]``, ``[worker]``, ``[pilot-cpu]``, ...). :meth:`stop`
ends them in order (pilots first, so they can still tell the web app they are leaving; then the
worker; then the web app): SIGTERM to the child, SIGKILL to its process group after
``stop_timeout`` seconds, and any descendant left behind (a payload in a session of its own) is
killed too.

Django-free apart from :meth:`StackConfig.from_settings`, so a test can drive it with explicit
values.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil

from wms.contract import DEVICE_TYPES
from wms.topology import split_password

BASE_DIR = Path(__file__).resolve().parent.parent

_COLORS = ("36", "33", "35", "32", "34", "31", "96", "93", "95", "92")


class TextSink(Protocol):
    """Where the children's output is copied: ``sys.stdout``, a file, an ``io.TextIOBase``..."""

    def write(self, s: str, /) -> int: ...

    def flush(self) -> None: ...


class StackError(RuntimeError):
    """A child could not start, died, or the web app never became healthy."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """Nobody listens on it. SO_REUSEADDR as the web servers set it: connections of a server
    that just stopped (TIME_WAIT) do not make the port taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


@dataclass(frozen=True)
class StackConfig:
    """What the children need to know; see :meth:`from_settings` for the usual values."""

    var_dir: Path
    broker_url: str
    register_token: str
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    control_queue: str = "wms.control"
    broker_options: Mapping[str, str] = field(default_factory=dict)  # filesystem folders
    web: str = "runserver"  # "runserver" (serves the admin's static files in DEBUG) | "gunicorn"
    worker_concurrency: int = 2
    # a production-like layout (docs/deployment.md): several web processes (pilot i reports
    # to web i mod n), several workers, and beat as processes of their own (0: beat runs in
    # the first worker, ``-B``)
    web_processes: int = 1
    workers: int = 1
    beats: int = 0
    pilots_per_device: int = 1
    devices: tuple[str, ...] = DEVICE_TYPES
    pilot_slots: int = 1
    pilot_args: tuple[str, ...] = ()  # extra flags for every pilot
    # where the pilots may stage inputs in from (--storage-roots); empty: the children's
    # WMS_STORAGE_ROOTS if the stack's environment sets it, else their default (<var>/demo)
    storage_roots: tuple[str, ...] = ()
    site: str = "local"
    python: str = sys.executable
    cwd: Path = BASE_DIR
    stop_timeout: float = 20.0

    @classmethod
    def from_settings(cls, **overrides) -> StackConfig:
        """The values of this Django project's settings (``manage.py up``)."""
        from django.conf import settings

        options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}) or {}
        values = {
            "var_dir": Path(settings.VAR_DIR),
            "broker_url": settings.CELERY_BROKER_URL,
            "control_queue": settings.CELERY_TASK_DEFAULT_QUEUE,
            "storage_roots": tuple(settings.WMS_STORAGE_ROOTS),
            "broker_options": {
                k: str(v)
                for k, v in options.items()
                if k.endswith(("_folder", "_folder_in", "_folder_out"))
            },
        }
        values.update(overrides)
        return cls(**values)


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen
    reader: threading.Thread
    expected_exit: bool = False  # a one-shot child (the demo) may exit; a service may not
    descendants: list[psutil.Process] = field(default_factory=list)

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()


class Stack:
    """Starts and stops the WMS's processes; see the module docstring."""

    def __init__(
        self,
        config: StackConfig,
        *,
        env: Mapping[str, str] | None = None,
        out: TextSink | None = None,
    ) -> None:
        self.config = config
        self.port = config.port or free_port(config.host)
        # the other web processes' ports (the first is ``port``)
        self.ports = [self.port] + [free_port(config.host) for _ in range(config.web_processes - 1)]
        self.out = out or sys.stdout
        self._env_overrides = dict(env or {})
        self._lock = threading.Lock()
        self.children: list[Child] = []
        self._color = hasattr(self.out, "isatty") and self.out.isatty()

    # --- what the children get ---------------------------------------------------------------

    @property
    def addr(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def server_url(self) -> str:
        return f"http://{self.addr}"

    @property
    def server_urls(self) -> list[str]:
        """Every web process's URL (the first is :attr:`server_url`)."""
        return [f"http://{self.config.host}:{p}" for p in self.ports]

    @property
    def manage(self) -> list[str]:
        """The argv prefix of a management command in a child."""
        return [self.config.python, str(self.config.cwd / "manage.py")]

    def child_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        bin_dir = str(Path(self.config.python).parent)  # the venv's console scripts
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        env["WMS_VAR_DIR"] = str(self.config.var_dir)
        env["WMS_SERVER_URL"] = self.server_url
        env["CELERY_BROKER_URL"] = self.config.broker_url
        env.update(self._env_overrides)
        env.update(extra or {})
        return env

    def web_argv(self, index: int = 0) -> list[str]:
        addr = f"{self.config.host}:{self.ports[index]}"
        if self.config.web == "gunicorn":
            return [
                self.config.python,
                "-m",
                "gunicorn",
                "config.wsgi:application",
                "--bind",
                addr,
                "--workers",
                "2",
                "--access-logfile",
                "-",
            ]
        return [*self.manage, "runserver", "--noreload", addr]

    def worker_argv(self, index: int = 0) -> list[str]:
        beat = self.config.beats == 0 and index == 0
        return [
            self.config.python,
            "-m",
            "celery",
            "-A",
            "config",
            "worker",
            *(
                ["-B", "--schedule", str(self.config.var_dir / "celerybeat-schedule")]
                if beat
                else []
            ),
            "-Q",
            self.config.control_queue,
            "--concurrency",
            str(self.config.worker_concurrency),
            "--loglevel",
            "INFO",
            "--hostname",
            f"wms-{self.port}{f'-{index + 1}' if index else ''}@%h",
        ]

    def beat_argv(self, index: int = 0) -> list[str]:
        """A beat of its own (``beats`` > 0), with its own schedule file."""
        return [
            self.config.python,
            "-m",
            "celery",
            "-A",
            "config",
            "beat",
            "--loglevel",
            "INFO",
            "--schedule",
            str(self.config.var_dir / f"celerybeat-schedule-{index + 1}"),
        ]

    @staticmethod
    def _nth(name: str, index: int) -> str:
        return name if index == 0 else f"{name}-{index + 1}"

    def pilot_name(self, device_type: str, index: int) -> str:
        suffix = f"-{index + 1}" if self.config.pilots_per_device > 1 else ""
        return f"pilot-{device_type}{suffix}"

    def pilot_argv(self, device_type: str, index: int) -> list[str]:
        """``python -m pilots.agent`` with this stack's server and broker. The secrets (the
        registration token, the broker's password) are not on it: they go to the pilot's
        standard input (:meth:`pilot_secrets`). The flag names are pilots/agent/config.py's
        (``wms-pilot --help``).
        """
        name = self.pilot_name(device_type, index)
        work = self.config.var_dir / "pilots" / name
        broker_url, password = split_password(self.config.broker_url)
        secrets = ["--register-token-file", "-"]
        if password:
            secrets += ["--broker-password-file", "-"]
        if os.geteuid() == 0 and "--payload-user" not in self.config.pilot_args:
            # a development stack run as root: its payloads too (a site names an account)
            secrets += ["--payload-user", "root"]
        return [
            self.config.python,
            "-m",
            "pilots.agent",
            *secrets,
            "--server-url",
            self.server_urls[index % len(self.server_urls)],
            "--broker-url",
            broker_url,
            "--device-type",
            device_type,
            "--site",
            self.config.site,
            "--work-dir",
            str(work),
            "--slots",
            str(self.config.pilot_slots),
            "--storage-roots",
            ",".join(self.storage_roots()),
            *self.config.pilot_args,
        ]

    def pilot_child_env(self) -> dict[str, str]:
        """A pilot's whole environment: the children's, less the server's settings and
        anything named like a secret (``DATABASE_URL`` and ``CELERY_BROKER_URL`` carry
        passwords, ``DJANGO_SECRET_KEY``...): a pilot reads none of them, and its environment
        holds no secret (docs/pilot.md "Secrets")."""
        env = self.child_env(self.pilot_env())
        return {
            k: v
            for k, v in env.items()
            if not k.startswith(("DATABASE_", "CELERY_", "DJANGO_"))
            and not any(word in k.upper() for word in ("SECRET", "PASSWORD", "TOKEN"))
        }

    def pilot_secrets(self) -> str:
        """What a pilot reads on standard input: one line per secret, the registration token
        first, then the broker's password if its URL has one (docs/pilot.md)."""
        _, password = split_password(self.config.broker_url)
        return "".join(f"{line}\n" for line in (self.config.register_token, password) if line)

    def storage_roots(self) -> tuple[str, ...]:
        """The storage roots of the stack's pilots: the server's (what its children read)."""
        if self.config.storage_roots:
            return tuple(self.config.storage_roots)
        configured = self._env_overrides.get("WMS_STORAGE_ROOTS", "")
        if configured.strip():
            return tuple(r.strip() for r in configured.split(",") if r.strip())
        return ((self.config.var_dir / "demo").resolve().as_uri(),)

    def pilot_env(self) -> dict[str, str]:
        """The filesystem broker's folders (pilots read no Django settings). No secret: a
        pilot's environment is not the place for them."""
        options = dict(self.config.broker_options)
        if not options and self.config.broker_url.startswith("filesystem://"):
            # the folders config/settings.py derives from WMS_VAR_DIR, which the children get
            broker = self.config.var_dir / "broker"
            options = {
                "data_folder_in": str(broker / "out"),
                "data_folder_out": str(broker / "out"),
                "processed_folder": str(broker / "processed"),
                "control_folder": str(broker / "control"),
            }
        return {f"WMS_PILOT_BROKER_{k.upper()}": v for k, v in options.items()}

    # --- starting ----------------------------------------------------------------------------

    def _write(self, name: str, line: str) -> None:
        prefix = f"[{name}]"
        if self._color:
            color = _COLORS[sum(map(ord, name)) % len(_COLORS)]
            prefix = f"\x1b[{color}m{prefix}\x1b[0m"
        with self._lock:
            try:
                self.out.write(f"{prefix} {line.rstrip()}\n")
                self.out.flush()
            except (ValueError, OSError):  # our own output is gone (closed pipe): keep draining
                pass

    def say(self, line: str) -> None:
        """A line of the orchestrator itself, prefixed ``[up]``."""
        self._write("up", line)

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        expected_exit: bool = False,
        stdin_text: str | None = None,
        whole_env: Mapping[str, str] | None = None,
    ) -> Child:
        """Start one child in its own session, its output copied to ``out`` with ``[name]``;
        ``stdin_text`` is written to its standard input, which is then closed; ``whole_env``
        replaces :meth:`child_env` (``env`` is added to it)."""
        try:
            proc = subprocess.Popen(
                list(argv),
                cwd=self.config.cwd,
                env=self.child_env(env) if whole_env is None else dict(whole_env),
                stdin=subprocess.DEVNULL if stdin_text is None else subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
            )
        except OSError as exc:
            raise StackError(f"cannot start {name}: {exc}") from exc
        if stdin_text is not None:
            assert proc.stdin is not None
            try:
                proc.stdin.write(stdin_text)
                proc.stdin.close()
            except OSError as exc:  # it died at once: check_alive() says so
                self.say(f"{name}: its standard input is closed ({exc})")

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self._write(name, line)

        reader = threading.Thread(target=pump, name=f"stack-{name}", daemon=True)
        reader.start()
        child = Child(name, list(argv), proc, reader, expected_exit=expected_exit)
        self.children.append(child)
        return child

    def start_web(self) -> list[Child]:
        for port in self.ports:
            if not port_is_free(self.config.host, port):
                raise StackError(f"{self.config.host}:{port} is already in use")
        return [
            self.spawn(self._nth("web", i), self.web_argv(i))
            for i in range(self.config.web_processes)
        ]

    def start_worker(self) -> list[Child]:
        """The workers, and the beats of their own if ``beats`` > 0."""
        return [
            *(
                self.spawn(self._nth("worker", i), self.worker_argv(i))
                for i in range(self.config.workers)
            ),
            *(
                self.spawn(self._nth("beat", i), self.beat_argv(i))
                for i in range(self.config.beats)
            ),
        ]

    def start_pilots(self) -> list[Child]:
        return [
            self.spawn(
                self.pilot_name(d, i),
                self.pilot_argv(d, i),
                whole_env=self.pilot_child_env(),
                stdin_text=self.pilot_secrets(),
            )
            for d in self.config.devices
            for i in range(self.config.pilots_per_device)
        ]

    def start(
        self, *, pilots: bool = True, worker: bool = True, healthy_timeout: float = 60.0
    ) -> None:
        """Web app and worker with beat (unless ``worker=False``); once ``/healthz`` answers,
        the pilots (unless ``pilots=False``), so that they register at once."""
        self.start_web()
        if worker:
            self.start_worker()
        self.wait_healthy(timeout=healthy_timeout)
        if pilots:
            self.start_pilots()

    # --- watching ----------------------------------------------------------------------------

    def dead(self) -> list[Child]:
        """Children that exited although they should run until stopped."""
        return [c for c in self.children if not c.expected_exit and c.returncode is not None]

    def check_alive(self) -> None:
        dead = self.dead()
        if dead:
            raise StackError(", ".join(f"{c.name} exited with code {c.returncode}" for c in dead))

    def wait_healthy(self, timeout: float = 60.0, path: str = "/healthz") -> None:
        """Until ``GET /healthz`` answers 200 on every web process; StackError if a child dies
        or time runs out."""
        deadline = time.monotonic() + timeout
        for base in self.server_urls:
            self._wait_healthy(base + path, deadline, timeout)

    def _wait_healthy(self, url: str, deadline: float, timeout: float) -> None:
        last = ""
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - http://host
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError) as exc:
                last = str(getattr(exc, "reason", exc))
            time.sleep(0.25)
        raise StackError(f"{url} not healthy after {timeout:g} s (last: {last})")

    def wait_for(
        self,
        child: Child,
        *,
        timeout: float | None = None,
        poll: float = 0.5,
        also: Callable[[], None] | None = None,
    ) -> int:
        """Wait for a one-shot child to exit and return its code, watching the others.

        StackError if another child dies first (``also`` is called each round, for extra
        checks); on timeout the child is stopped and StackError raised.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            code = child.returncode
            if code is not None:
                child.reader.join(timeout=5)
                return code
            self.check_alive()
            if also is not None:
                also()
            if deadline is not None and time.monotonic() >= deadline:
                self._stop_group([child])
                raise StackError(f"{child.name} did not finish in {timeout:g} s")
            time.sleep(poll)

    def run_child(self, name: str, argv: Sequence[str], *, timeout: float | None = None) -> int:
        """Run a one-shot child (a management command, a test driver) to its end."""
        return self.wait_for(self.spawn(name, argv, expected_exit=True), timeout=timeout)

    # --- stopping ----------------------------------------------------------------------------

    @staticmethod
    def _signal_group(child: Child, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, sig)  # the child leads its own session/group

    @staticmethod
    def _snapshot(child: Child) -> None:
        with contextlib.suppress(psutil.Error):
            if child.returncode is None:
                known = {p.pid for p in child.descendants}
                child.descendants += [
                    p
                    for p in psutil.Process(child.proc.pid).children(recursive=True)
                    if p.pid not in known
                ]

    def _stop_group(self, group: list[Child]) -> None:
        """SIGTERM to each child's main process (it stops its own workers: a Celery worker
        whose pool processes are signalled directly hangs), SIGKILL to its whole group after
        ``stop_timeout``; then whatever is left of its group or its descendants is killed."""
        running = [c for c in group if c.returncode is None]
        for c in running:
            self._snapshot(c)
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.stop_timeout
        while any(c.returncode is None for c in running) and time.monotonic() < deadline:
            time.sleep(0.1)
        for c in running:
            if c.returncode is None:
                self.say(f"{c.name} did not stop in {self.config.stop_timeout:g} s: SIGKILL")
                self._signal_group(c, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(timeout=5)
        for c in group:
            self._signal_group(c, signal.SIGKILL)  # orphans left in the child's group
            # what ran in a session of its own (a pilot's payload) and outlived its parent
            leftovers = [p for p in c.descendants if _alive(p)]
            for p in leftovers:
                with contextlib.suppress(psutil.Error):
                    p.terminate()
            _gone, alive = psutil.wait_procs(leftovers, timeout=3)
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            c.reader.join(timeout=2)

    def stop(self) -> None:
        """Stop every child: pilots and one-shot children, then the beats and workers, then
        the web app."""

        def kind(child: Child) -> str:
            return child.name.split("-")[0]

        first = [c for c in self.children if kind(c) not in ("worker", "beat", "web")]
        order = [
            first,
            [c for c in self.children if kind(c) in ("worker", "beat")],
            [c for c in self.children if kind(c) == "web"],
        ]
        for group in order:
            if any(c.returncode is None for c in group):
                self.say("stopping " + ", ".join(c.name for c in group if c.returncode is None))
            self._stop_group(group)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
