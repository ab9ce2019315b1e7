"""The agent runs on worker nodes without Django (DESIGN.md section 2): importing every module
of ``pilots.agent`` with Django made unimportable works, and pulls in no app of the project."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = """
import sys
for name in ("django", "rest_framework", "celery", "structlog", "environ"):
    sys.modules[name] = None  # "import django" now raises ImportError
import pilots.agent
from pilots.agent import agent, cli, client, commands, config, heartbeat, host, intake, logs
from pilots.agent import procs, runner, session, spool, staging
from pilots.agent.cli import main
try:
    main(["--version"])
except SystemExit as exc:
    assert exc.code == 0, exc.code
assert main(["--print-config", "--slots", "2"]) == 0
project = ("config", "tasks", "jobs", "files", "payloads", "wms.models", "wms.bus", "pilots.models")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {p.split(".")[0] for p in project}
                and not m.startswith(("pilots.agent", "wms.contract", "wms.topology",
                                      "wms.checksums", "wms.locations"))
                and m not in ("wms", "pilots"))
assert not loaded, loaded
print("AGENT-IMPORT-OK")
"""


def test_the_agent_imports_and_runs_its_cli_without_django():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 0, done.stderr
    assert "AGENT-IMPORT-OK" in done.stdout
    assert '"slots": 2' in done.stdout


def test_the_django_guard_is_real():
    """The same trick really breaks Django: the test above would catch a stray import."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['django'] = None; import wms.bus"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode != 0 and "No module named 'django" in done.stderr
