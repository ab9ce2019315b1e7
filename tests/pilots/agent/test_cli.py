"""``python -m pilots.agent`` as a real process: signals (drain, then shutdown), the log line
shape, and a spool left by a crashed run sent by the next one."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pilots.agent.conftest import job_message, secret_args
from tests.pilots.agent.fakewms import wait_until

ROOT = Path(__file__).resolve().parents[3]
LINE = re.compile(
    r"^\| pilot: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \| INFO \| \w+\.py:\d+ \| \d+ >>> "
)


@pytest.fixture
def pilot_process(tmp_path, fake_wms, bus) -> Iterator:
    fake_wms.bus_prefix = bus.prefix
    procs: list[subprocess.Popen] = []

    def _start(*extra: str, name: str = "pilot") -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.{len(procs)}.log"
        secrets, stdin = secret_args()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pilots.agent",
                *secrets,
                "--server-url",
                fake_wms.url,
                "--work-dir",
                str(tmp_path / "work"),
                "--poll-interval",
                "0.1",
                "--grace-period",
                "1",
                "--register-retries",
                "0",
                *extra,
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=open(log, "wb"),  # noqa: SIM115 - the child holds it
            text=True,
        )
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
        procs.append(proc)
        return proc, log

    yield _start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def started(fake_wms, n: int = 1):
    return lambda: len(fake_wms.calls_to("start")) >= n


def test_sigterm_drains_a_real_pilot_and_a_second_one_shuts_it_down(
    pilot_process, fake_wms, bus, outdir
):
    proc, log = pilot_process("--slots", "2")
    short = job_message(outdir, "sleep", "0.6")
    long = job_message(outdir, "sleep", "30")
    for job in (short, long):
        fake_wms.jobs[job.job_uuid] = job.to_dict()
        bus.publish(job)
    wait_until(started(fake_wms, 2), timeout=15)
    pilot_id = int(fake_wms.calls_to("start")[0].auth.rsplit("-", 1)[1])
    bus.pilot_ids.add(pilot_id)

    proc.send_signal(signal.SIGTERM)  # drain: the short job still finishes
    wait_until(lambda: fake_wms.final_reports(short.job_uuid), timeout=10)
    assert proc.poll() is None  # the long one still runs
    proc.send_signal(signal.SIGTERM)  # shutdown: the long one is killed and reported

    assert proc.wait(15) == 0
    assert fake_wms.final_reports(short.job_uuid)[0].body["state"] == "finished"
    killed = fake_wms.final_reports(long.job_uuid)[0].body
    assert (killed["state"], killed["error_code"]) == ("failed", "killed")
    assert "signal SIGTERM" in fake_wms.calls_to("terminate")[0].body["reason"]
    lines = log.read_text().splitlines()
    assert lines and all(LINE.match(line) for line in lines if "| INFO |" in line)
    assert any("pilot_draining" in line and "reason=" in line for line in lines)


def test_a_crashed_pilot_s_spool_is_sent_by_the_next_run(pilot_process, fake_wms, bus, outdir):
    fake_wms.report_answer = lambda uuid, body: (503, {"error": "unavailable"})
    first, _ = pilot_process(name="first")
    job = job_message(outdir, "write", "out.txt=42")
    fake_wms.jobs[job.job_uuid] = job.to_dict()
    bus.publish(job)
    wait_until(lambda: fake_wms.final_reports(job.job_uuid), timeout=15)
    old_token = fake_wms.final_reports(job.job_uuid)[0].auth
    bus.pilot_ids.add(int(old_token.rsplit("-", 1)[1]))
    first.kill()  # a crash: no flush, no terminate
    first.wait(10)
    spool = Path(fake_wms.spool_dir)
    assert len(list(spool.glob("*.report.json"))) == 1

    fake_wms.report_answer = lambda uuid, body: (200, {"outcome": "applied"})
    second, _ = pilot_process(name="second")

    wait_until(lambda: not list(spool.glob("*.report.json")), timeout=10)
    resent = fake_wms.final_reports(job.job_uuid)[-1]
    assert resent.auth == old_token  # sent as the pilot that ran the attempt
    assert resent.body["state"] == "finished"
    assert {o["name"] for o in resent.body["outputs"]} >= {"out.txt"}
    registered = fake_wms.calls_to("register")
    bus.pilot_ids.update(range(7, 7 + len(registered)))
    second.send_signal(signal.SIGINT)
    assert second.wait(15) == 0


def test_a_configuration_error_exits_2_with_a_clear_message(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pilots.agent", "--slots", "none"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert done.returncode == 2
    assert "slots = 'none' (from --slots)" in done.stderr


def test_registration_refused_exits_1(tmp_path, fake_wms):
    secrets, stdin = secret_args(register_token="wrong")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pilots.agent",
            *secrets,
            "--server-url",
            fake_wms.url,
            "--register-retries",
            "0",
            "--work-dir",
            str(tmp_path / "w"),
        ],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert done.returncode == 1
    assert "registration" in done.stderr and "HTTP 401" in done.stderr
