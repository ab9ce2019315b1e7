"""A RabbitMQ cluster of three nodes on this machine, for benchmarks/cluster.py.

Each node is a ``rabbitmq-server`` process of its own: node name ``<name><i>@localhost``, AMQP
on ``127.0.0.1:<port>``, Erlang distribution on ``<dist port>``, its database, logs, config
and an empty plugin list (no management, no prometheus) in a folder of the run, and ``HOME``
there too, so its Erlang cookie is the run's own. The machine's own node
(``/etc/rabbitmq``, port 5672) is never read nor touched: every file it would read is
replaced by the run's (``RABBITMQ_CONF_ENV_FILE``, ``RABBITMQ_CONFIG_FILE``,
``RABBITMQ_ENABLED_PLUGINS_FILE``). The nodes 2 and 3 join node 1 with ``rabbitmqctl -n``
(``stop_app``, ``join_cluster``, ``start_app``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

SBIN = Path("/usr/lib/rabbitmq/bin")  # the scripts themselves, not the wrappers in /usr/sbin


def _tool(name: str) -> str:
    path = SBIN / name
    return str(path) if path.exists() else name


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@dataclass
class Node:
    name: str  # wms1@localhost
    port: int
    dist_port: int
    base: Path
    proc: subprocess.Popen | None = None
    log: IO[str] | None = None
    killed: bool = False

    @property
    def pid_file(self) -> Path:
        return self.base / "mnesia" / f"{self.name}.pid"

    def beam_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.pid_file.read_text().strip())
        return None


@dataclass
class Cluster:
    work: Path
    ports: tuple[int, ...] = (5681, 5682, 5683)
    name: str = "wms"
    user: str = "guest"
    password: str = "guest"  # noqa: S105 - RabbitMQ's own guest account, loopback only
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.home = self.work / "home"
        self.cookie = secrets.token_hex(16)
        self.nodes = [
            Node(
                name=f"{self.name}{i + 1}@localhost",
                port=port,
                dist_port=port + 20_000,
                base=self.work / f"{self.name}{i + 1}",
            )
            for i, port in enumerate(self.ports)
        ]

    # --- environment ---------------------------------------------------------------------------

    def _env(self, node: Node | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["HOME"] = str(self.home)  # the run's own Erlang cookie
        env["RABBITMQ_CONF_ENV_FILE"] = str(self.work / "rabbitmq-env.conf")
        env["ERL_EPMD_ADDRESS"] = "127.0.0.1"
        if node is not None:
            env.update(
                {
                    "RABBITMQ_NODENAME": node.name,
                    "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                    "RABBITMQ_NODE_PORT": str(node.port),
                    "RABBITMQ_DIST_PORT": str(node.dist_port),
                    "RABBITMQ_MNESIA_BASE": str(node.base / "mnesia"),
                    "RABBITMQ_LOG_BASE": str(node.base / "log"),
                    "RABBITMQ_CONFIG_FILE": str(node.base / "rabbitmq.conf"),
                    "RABBITMQ_ADVANCED_CONFIG_FILE": str(node.base / "advanced.config"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.work / "enabled_plugins"),
                    "RABBITMQ_PID_FILE": str(node.pid_file),
                    # two schedulers at most: three nodes share this machine with the WMS
                    "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                        "-kernel inet_dist_use_interface {127,0,0,1} +S 2:2 +sbwt none"
                    ),
                }
            )
        return env

    def _prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(self.cookie)
        cookie.chmod(0o400)
        (self.work / "rabbitmq-env.conf").write_text("# the run's own: nothing from /etc\n")
        (self.work / "enabled_plugins").write_text("[].\n")
        for node in self.nodes:
            for sub in ("mnesia", "log"):
                (node.base / sub).mkdir(parents=True, exist_ok=True)
            (node.base / "rabbitmq.conf").write_text(
                f"listeners.tcp.1 = 127.0.0.1:{node.port}\n"
                "loopback_users.guest = true\n"
                "cluster_partition_handling = pause_minority\n"
                "log.console = false\n"
                "log.file.level = info\n"
            )
            (node.base / "advanced.config").write_text("[].\n")

    # --- commands ------------------------------------------------------------------------------

    def ctl(self, node: Node, *args: str, tool: str = "rabbitmqctl", timeout: float = 120) -> str:
        """``rabbitmqctl -n <node> ...`` (or another CLI tool); its output, or RuntimeError."""
        argv = [_tool(tool), "-n", node.name, *args]
        done = subprocess.run(
            argv, env=self._env(), capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip() or done.stdout}"
            )
        return done.stdout

    def start(self, say=print) -> None:
        for node in self.nodes:
            for port in (node.port, node.dist_port):
                if port_open(port):
                    raise RuntimeError(f"port {port} is taken: is another cluster running?")
        self._prepare()
        for node in self.nodes:
            node.log = open(node.base / "server.out", "w")  # noqa: SIM115 - closed in stop()
            node.proc = subprocess.Popen(
                [_tool("rabbitmq-server")],
                env=self._env(node),
                cwd=node.base,
                stdout=node.log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        for node in self.nodes:
            self._await(node)
            say(f"node {node.name} up on 127.0.0.1:{node.port} (pid {node.beam_pid()})")
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
            self._await(node)
            say(f"node {node.name} joined {first.name}")
        running = self.running_nodes()
        if sorted(running) != sorted(n.name for n in self.nodes):
            raise RuntimeError(f"the cluster runs {running}, not the three nodes")

    def _await(self, node: Node, timeout: float = 180) -> None:
        """Until the node has booted (``await_startup`` fails at once while the VM has not
        registered its name yet: tried again)."""
        deadline = time.monotonic() + timeout
        while True:
            if node.proc is not None and node.proc.poll() is not None:
                raise RuntimeError(
                    f"{node.name} exited ({node.proc.returncode}): see {node.base / 'log'}"
                )
            try:
                self.ctl(node, "await_startup", "--timeout", "30", timeout=60)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def running_nodes(self, via: Node | None = None) -> list[str]:
        via = via or self.alive()[0]
        out = self.ctl(via, "eval", "rabbit_nodes:all_running().")
        return [n.strip().strip("'") for n in out.strip().strip("[]").split(",") if n.strip()]

    def alive(self) -> list[Node]:
        return [n for n in self.nodes if not n.killed]

    def urls(self) -> str:
        """The failover list of the three nodes' AMQP URLs."""
        auth = f"{self.user}:{self.password}@"
        return ";".join(f"amqp://{auth}127.0.0.1:{n.port}//" for n in self.nodes)

    def queues(self, via: Node | None = None) -> dict[str, dict[str, str]]:
        """``name -> {type, leader, members, messages}`` of every queue (``list_queues``)."""
        via = via or self.alive()[0]
        out = self.ctl(
            via,
            "list_queues",
            "name",
            "type",
            "leader",
            "members",
            "messages",
            "--quiet",
            "--no-table-headers",
        )
        rows = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) >= 5:
                rows[parts[0]] = dict(
                    zip(("type", "leader", "members", "messages"), parts[1:5], strict=False)
                )
        return rows

    def node(self, name: str) -> Node:
        (node,) = [n for n in self.nodes if n.name == name]
        return node

    def kill(self, node: Node) -> int:
        """SIGKILL to the node's Erlang VM (no clean shutdown: a crash). Returns its pid."""
        pid = node.beam_pid()
        if pid is None:
            raise RuntimeError(f"no pid file for {node.name}")
        os.kill(pid, signal.SIGKILL)
        node.killed = True
        deadline = time.monotonic() + 30
        while port_open(node.port) and time.monotonic() < deadline:
            time.sleep(0.1)
        return pid

    def stop(self) -> None:
        """Stop every node (``rabbitmqctl stop``, then SIGKILL to what is left)."""
        for node in self.nodes:
            if node.proc is None:
                continue
            if not node.killed and node.proc.poll() is None:
                with contextlib.suppress(Exception):
                    self.ctl(node, "stop", timeout=60)
            pid = node.beam_pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=10)
            if node.log is not None:
                node.log.close()
        # the nodes' names out of the machine's epmd (they vanish with their VMs anyway)
