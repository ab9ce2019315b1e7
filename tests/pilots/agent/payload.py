"""Test payloads run by the pilot as real processes: ``python payload.py <mode> [...]``.

Modes:
  write NAME=TEXT ... [--exit N]  write each NAME into $WMS_OUTPUT_DIR, print to stdout and stderr
  env                             write the WMS_* environment and the inputs' contents to env.json
  sleep SECONDS [--record FILE]   sleep; with --record append "start/end <pid> <time>" lines
  spawn PIDFILE                   start a grandchild that sleeps, write "<child> <grandchild>"
  escape PIDFILE                  start a child that sleeps and one that leaves the session
                                  (setsid, double fork: its parent is gone); write their pids
                                  as JSON {"leader", "child", "escaped"}; sleep
  escape-and-exit PIDFILE         as escape, but exit 0 at once instead of sleeping
  ignore-term PIDFILE             ignore SIGTERM, write the pid, sleep
  swap-log TARGET                 replace the job's log by a symlink to TARGET
  spy PATH ...                    a hostile payload: read what it can of its parent (the pilot)
                                  in /proc, its own environment, and each PATH (files, or
                                  directories read file by file); write it all to spy.json
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _record(path: str | None, what: str) -> None:
    if path:
        with open(path, "a") as fh:
            fh.write(f"{what} {os.getpid()} {time.time():.6f}\n")


def _read(path: Path) -> str:
    try:
        if path.is_dir():
            return json.dumps({p.name: _read(p) for p in sorted(path.iterdir())})
        return path.read_bytes().decode("utf-8", "replace")
    except OSError as exc:
        return f"ERROR {type(exc).__name__}"


def _spy(paths: list[str]) -> dict[str, object]:
    parent = Path("/proc") / str(os.getppid())
    found: dict[str, object] = {"ppid": os.getppid(), "uid": os.getuid()}
    for name in ("environ", "cmdline", "status", "maps", "fd"):
        found[f"parent_{name}"] = _read(parent / name)
    try:  # the pilot's memory, from where its heap starts
        start = next(
            int(line.split("-")[0], 16)
            for line in (parent / "maps").read_text().splitlines()
            if "[heap]" in line
        )
        with open(parent / "mem", "rb") as mem:
            mem.seek(start)
            found["parent_mem"] = mem.read(1 << 20).decode("latin-1")
    except (OSError, StopIteration, ValueError) as exc:
        found["parent_mem"] = f"ERROR {type(exc).__name__}"
    found["environ"] = dict(os.environ)
    for path in paths:
        found[path] = _read(Path(path))
    return found


def main(argv: list[str]) -> int:
    mode, rest = argv[0], argv[1:]
    out = Path(os.environ.get("WMS_OUTPUT_DIR", "."))
    if mode == "write":
        code = 0
        if "--exit" in rest:
            i = rest.index("--exit")
            code = int(rest[i + 1])
            rest = rest[:i] + rest[i + 2 :]
        for item in rest:
            name, _, text = item.partition("=")
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(text)
        print(f"stdout: wrote {len(rest)} files", flush=True)
        print("stderr: a line on stderr", file=sys.stderr, flush=True)
        return code
    if mode == "env":
        env: dict[str, object] = {k: v for k, v in os.environ.items() if k.startswith("WMS_")}
        inputs = json.loads(os.environ["WMS_INPUT_FILES"])
        env["_contents"] = [Path(p).read_text() for p in inputs]
        env["_cwd"] = os.getcwd()
        (out / "env.json").write_text(json.dumps(env))
        return 0
    if mode == "sleep":
        record = rest[rest.index("--record") + 1] if "--record" in rest else None
        _record(record, "start")
        time.sleep(float(rest[0]))
        _record(record, "end")
        return 0
    if mode == "spawn":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        Path(rest[0]).write_text(f"{os.getpid()} {child.pid}")
        time.sleep(60)
        return 0
    if mode in ("escape", "escape-and-exit"):
        sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
        child = subprocess.Popen(sleeper)
        r, w = os.pipe()
        middle = os.fork()
        if middle == 0:  # leaves the job's session, forks the escapee, exits
            os.setsid()
            if os.fork() == 0:
                os.write(w, str(os.getpid()).encode())
                os.close(w)
                os.execv(sys.executable, sleeper)  # noqa: S606 - a test payload
            os._exit(0)
        os.close(w)
        os.waitpid(middle, 0)
        escaped = int(os.read(r, 64))
        tmp = Path(rest[0] + ".tmp")
        tmp.write_text(json.dumps({"leader": os.getpid(), "child": child.pid, "escaped": escaped}))
        tmp.rename(rest[0])
        if mode == "escape":
            time.sleep(60)
        return 0
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        Path(rest[0]).write_text(str(os.getpid()))
        time.sleep(60)
        return 0
    if mode == "swap-log":
        for log in Path(os.environ["WMS_JOB_DIR"]).glob("*.log"):
            log.unlink()
            log.symlink_to(rest[0])
        return 0
    if mode == "spy":
        (out / "spy.json").write_text(json.dumps(_spy(rest)))
        return 0
    print(f"unknown mode {mode}", file=sys.stderr)
    return 64


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
