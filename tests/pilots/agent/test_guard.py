"""No payload outlives its pilot (pilots/agent/guard.py, docs/pilot.md "When the pilot dies").

Real processes throughout: payloads that fork, double-fork and setsid away; real pilots
SIGKILLed mid-job; a new pilot on the work directory a dead one left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pilots.agent import procs as procs_module
from pilots.agent.guard import (
    MARK_VAR,
    PayloadGuard,
    Target,
    find,
    make_mark,
    parse_mark,
    proc_marks,
    proc_stat,
    record_name,
    terminate,
    write_json,
)
from pilots.agent.runner import KILLED, JobRunner
from tests.pilots.agent import test_isolation as isolation
from tests.pilots.agent.conftest import job_message, secret_args
from tests.pilots.agent.fakewms import wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

ROOT = Path(__file__).resolve().parents[3]
# the payload account and the root pilot of the isolation tests
base, other_account, start_pilot = isolation.base, isolation.other_account, isolation.start_pilot
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def marked(prefix: str) -> list[int]:
    """Live processes carrying a mark that starts with ``prefix``."""
    found = []
    for pid in psutil.pids():
        if alive(pid) and any(m.startswith(prefix) for m in proc_marks(pid)):
            found.append(pid)
    return found


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def start(procs: list, argv: list[str], mark: str = "", **kw) -> subprocess.Popen:
    env = {"PATH": os.environ.get("PATH", "")}
    if mark:
        env[MARK_VAR] = mark
    p = subprocess.Popen(argv, env=env, **kw)
    procs.append(p)
    wait_until(lambda: proc_stat(p.pid) is not None, timeout=5)
    return p


# --- /proc, marks, the pid-reuse guard -------------------------------------------------------


def test_marks_parse_and_are_found_in_the_environment(procs):
    mark = make_mark("run1", "0b6f", 2)
    assert parse_mark(mark) == ("run1", "0b6f", 2)
    assert parse_mark("no-mark") is None and parse_mark("a:b:c") is None
    p = start(procs, SLEEPER, mark)
    other = start(procs, SLEEPER, make_mark("run2", "0b6f", 2))
    # a container runtime's prefixed copy counts too
    apptainer = start(procs, ["env", f"APPTAINERENV_{MARK_VAR}={mark}", *SLEEPER])
    wait_until(lambda: proc_marks(apptainer.pid) == [mark], timeout=5)  # once env has exec'd

    assert proc_marks(p.pid) == [mark]
    assert set(find([Target("run1:")])) == {p.pid, apptainer.pid}
    assert set(find([Target(mark)])) == {p.pid, apptainer.pid}
    assert set(find([Target(make_mark("run1", "0b6f", 3))])) == set()
    assert other.pid in find([Target("run2:")])


def test_a_recorded_pid_kills_only_the_process_that_started_then(procs):
    bystander = start(procs, SLEEPER)  # no mark: only its pid and start time could name it
    info = proc_stat(bystander.pid)
    assert info is not None
    reused = Target("r:j:0", pid=bystander.pid, sid=bystander.pid, start=info.start - 1)

    assert find([reused]) == {}
    assert terminate([reused], grace=0.1) == {}
    assert bystander.poll() is None and alive(bystander.pid)

    same = Target("r:j:0", pid=bystander.pid, sid=info.sid, start=info.start)
    assert terminate([same], grace=2) == {"r:j:0": [bystander.pid]}
    assert bystander.wait(5) == -signal.SIGTERM


def test_a_session_is_killed_only_while_its_leader_is_the_recorded_one(procs, tmp_path):
    pidfile = tmp_path / "child.pid"
    script = f"import subprocess,sys,time; c=subprocess.Popen({SLEEPER!r}); "
    script += f"open({str(pidfile)!r},'w').write(str(c.pid)); time.sleep(60)"
    leader = start(procs, [sys.executable, "-c", script], start_new_session=True)
    wait_until(lambda: pidfile.exists() and pidfile.read_text(), timeout=10)
    child = int(pidfile.read_text())
    info = proc_stat(leader.pid)
    assert info is not None and proc_stat(child).sid == leader.pid  # type: ignore[union-attr]

    wrong = Target("r:j:0", pid=leader.pid, sid=leader.pid, start=info.start + 1)
    assert find([wrong]) == {}  # not that leader: its session means nothing
    right = Target("r:j:0", pid=leader.pid, sid=leader.pid, start=info.start)
    assert set(find([right])) == {leader.pid, child}
    killed = terminate([right], grace=2)
    assert sorted(killed["r:j:0"]) == sorted([leader.pid, child])
    wait_until(lambda: not alive(child), timeout=5)


# --- the records ------------------------------------------------------------------------------


def test_a_new_run_kills_what_the_records_of_a_dead_run_name_and_nothing_else(procs, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    old = PayloadGuard(work, grace=1, run_id="deadbeef")
    old.prepare()
    old.set_pilot_id(41)  # the run file, as the dead pilot left it
    mark = old.mark("job-a", 1)
    payload = start(procs, SLEEPER, mark, start_new_session=True)
    old.launched(job_uuid="job-a", attempt=1, pid=payload.pid, mark=mark)
    escaped = start(procs, SLEEPER, mark, start_new_session=True)  # left the session: the mark
    late = start(procs, SLEEPER, old.mark("job-b", 0))  # started, not yet recorded
    # a record whose pid is now an unrelated process's (pid reused): that one lives on
    bystander = start(procs, SLEEPER)
    stale = proc_stat(bystander.pid)
    assert stale is not None
    record = json.loads((old.dir / record_name("job-a", 1)).read_text())
    record.update(job_uuid="job-c", attempt=0, mark=old.mark("job-c", 0))
    record.update(pid=bystander.pid, sid=bystander.pid, start=stale.start - 5)
    write_json(old.dir / record_name("job-c", 0), record)
    assert {p.name for p in old.dir.iterdir()} == {
        "run.deadbeef.json",
        "job-a.1.json",
        "job-c.0.json",
    }

    new = PayloadGuard(work, grace=1)
    orphans = {o.job_uuid: o for o in new.scan_leftovers()}

    assert set(orphans) == {"job-a", "job-b", "job-c"}
    assert orphans["job-a"].as_dict() == {
        "job_uuid": "job-a",
        "attempt": 1,
        "pilot_id": 41,
        "pids": sorted([payload.pid, escaped.pid]),
    }
    assert orphans["job-b"].pids == [late.pid] and orphans["job-b"].pilot_id == 41
    assert orphans["job-c"].pids == []
    for p in (payload, escaped, late):
        assert p.wait(5) == -signal.SIGTERM
    assert bystander.poll() is None
    assert list(new.dir.iterdir()) == []  # the dead run's files are gone


def test_the_runner_records_marks_and_kills_a_payload_that_left_its_session(tmp_path, outdir):
    guard = PayloadGuard(tmp_path / "work", grace=1, run_id="cafe")
    guard.dir.parent.mkdir()
    guard.prepare()
    pidfile = tmp_path / "pids.json"
    job = job_message(outdir, "escape", str(pidfile))
    runner = JobRunner(job, work_root=tmp_path / "work", grace_period=1, guard=guard)
    record = guard.dir / record_name(job.job_uuid, 0)
    result: list = []
    import threading

    thread = threading.Thread(target=lambda: result.append(runner.run()))
    thread.start()
    try:
        wait_until(pidfile.exists, timeout=15)
        pids = json.loads(pidfile.read_text())
        saved = json.loads(record.read_text())
        assert (saved["pid"], saved["sid"], saved["mark"]) == (
            pids["leader"],
            pids["leader"],
            f"cafe:{job.job_uuid}:0",
        )
        assert proc_stat(pids["escaped"]).sid != pids["leader"]  # type: ignore[union-attr]
        assert set(marked("cafe:")) == set(pids.values())
    finally:
        runner.kill("test")
        thread.join(20)
    assert result[0].error_code == KILLED
    wait_until(lambda: not any(alive(p) for p in pids.values()), timeout=5)
    assert not record.exists()


def test_what_a_job_leaves_behind_is_killed_at_its_end_found_among_the_pids_born_since(
    tmp_path, outdir
):
    guard = PayloadGuard(tmp_path / "work", grace=1, run_id="beef")
    guard.dir.parent.mkdir()
    guard.prepare()
    pidfile = tmp_path / "pids.json"
    job = job_message(outdir, "escape-and-exit", str(pidfile))
    runner = JobRunner(job, work_root=tmp_path / "work", grace_period=1, guard=guard)
    bystander = subprocess.Popen(SLEEPER, env={MARK_VAR: "beef:someone-else:0"})
    try:
        result = runner.run()  # the leader exits 0 at once, its two children live on

        assert result.state == "finished"
        pids = json.loads(pidfile.read_text())
        # the end of the job looked at the processes born since its start, not at all of
        # them, and found both: the one in its session and the one that left it
        assert runner._clock is not None
        born = procs_module.born_since(runner._clock)
        assert born is not None and bystander.pid not in born
        wait_until(lambda: not alive(pids["child"]) and not alive(pids["escaped"]), timeout=5)
        assert alive(bystander.pid)  # another job's mark, born before: untouched
    finally:
        bystander.kill()
        bystander.wait(5)


def fake_proc(
    tmp_path: Path, *, last_pid: int, forks: int, pids: list[int], pid_max: int = 32768
) -> Path:
    proc = tmp_path / "proc"
    (proc / "sys" / "kernel").mkdir(parents=True, exist_ok=True)
    if not (proc / "self").is_symlink():
        (proc / "self").symlink_to(str(os.getpid()))
    (proc / "loadavg").write_text(f"0.10 0.20 0.30 1/99 {last_pid}\n")
    (proc / "stat").write_text(f"cpu 1 2 3\nintr 5 6\nctxt 7\nprocesses {forks}\nprocs_running 1\n")
    (proc / "sys" / "kernel" / "pid_max").write_text(f"{pid_max}\n")
    for pid in pids:
        (proc / str(pid)).mkdir(exist_ok=True)
    return proc


def test_the_pids_born_since_a_moment_follow_the_cyclic_allocator(tmp_path):
    pids = [1, 350, 900, 1000, 1001, 1500, 32000, 32700]
    proc = fake_proc(tmp_path, last_pid=1000, forks=5000, pids=pids)
    since = procs_module.pid_clock(proc)
    assert since == procs_module.PidClock(1000, 5000)

    fake_proc(tmp_path, last_pid=1500, forks=5600, pids=pids)
    assert sorted(procs_module.born_since(since, proc) or []) == [1001, 1500]
    # a short range: each of its pids, without a listing of /proc
    fake_proc(tmp_path, last_pid=1010, forks=5010, pids=pids)
    assert procs_module.born_since(since, proc) == list(range(1001, 1011))
    # wrapped round pid_max (back to 300): above the start or up to the cursor
    fake_proc(tmp_path, last_pid=400, forks=5600 + 31_000, pids=pids)
    assert sorted(procs_module.born_since(since, proc) or []) == [1, 350, 1001, 1500, 32000, 32700]
    # so many forks that the allocator may have gone round past the start: no telling
    fake_proc(tmp_path, last_pid=1200, forks=5000 + 32768 - 300, pids=pids)
    assert procs_module.born_since(since, proc) is None
    assert procs_module.born_since(None, proc) is None


def test_no_pid_clock_from_another_pid_namespace_s_proc(tmp_path):
    proc = fake_proc(tmp_path, last_pid=1000, forks=5000, pids=[1])
    (proc / "self").unlink()
    (proc / "self").symlink_to("4242" if os.getpid() != 4242 else "4243")
    procs_module._namespaces.clear()
    try:
        assert procs_module.pid_clock(proc) is None
    finally:
        procs_module._namespaces.clear()


# --- real pilots ------------------------------------------------------------------------------


@pytest.fixture
def pilot(tmp_path, fake_wms, bus) -> Iterator:
    fake_wms.bus_prefix = bus.prefix
    started: list[subprocess.Popen] = []

    def _start(name: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        secrets, stdin = secret_args()
        argv = [sys.executable, "-m", "pilots.agent", *secrets, "--server-url", fake_wms.url]
        argv += ["--work-dir", str(tmp_path / "work"), "--poll-interval", "0.1"]
        argv += ["--grace-period", "1", "--register-retries", "0"]
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=open(log, "wb"),  # noqa: SIM115 - the child holds it
            text=True,
        )
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
        started.append(proc)
        return proc, log

    yield _start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    bus.pilot_ids.update(range(7, 7 + len(fake_wms.calls_to("register"))))


def run_escaping_job(fake_wms, bus, outdir, tmp_path, n: int) -> tuple[str, dict[str, int]]:
    pidfile = tmp_path / f"pids{n}.json"
    job = job_message(outdir, "escape", str(pidfile))
    fake_wms.jobs[job.job_uuid] = job.to_dict()
    bus.publish(job)
    wait_until(pidfile.exists, timeout=20)
    pids = json.loads(pidfile.read_text())
    assert all(alive(p) for p in pids.values())
    return job.job_uuid, pids


def guardian_of(pilot_pid: int) -> psutil.Process:
    def find_it():
        for child in psutil.Process(pilot_pid).children():
            if "pilots.agent.guard" in " ".join(child.cmdline()):
                return child
        return None

    return wait_until(find_it, timeout=10)


def test_a_sigkilled_pilot_s_payloads_die_with_it(pilot, fake_wms, bus, outdir, tmp_path):
    proc, log = pilot("pilot")
    job_uuid, pids = run_escaping_job(fake_wms, bus, outdir, tmp_path, 1)
    record = json.loads((tmp_path / "work" / "payloads" / record_name(job_uuid, 0)).read_text())
    run_id = record["run_id"]
    assert record["pid"] == pids["leader"] and record["pilot_id"] == 7
    assert set(marked(f"{run_id}:")) >= set(pids.values())
    guardian = guardian_of(proc.pid)

    proc.kill()  # SIGKILL: no handler, no clean-up of its own
    proc.wait(10)

    wait_until(lambda: not any(alive(p) for p in pids.values()), timeout=15)
    wait_until(lambda: not marked(f"{run_id}:"), timeout=5)
    wait_until(lambda: not alive(guardian.pid), timeout=10)  # its work done, it exits
    text = log.read_text()  # the guardian has said so before it exited
    assert f"guardian_killed_payload job_uuid={job_uuid} attempt=0" in text
    assert str(pids["escaped"]) in text


def test_a_new_pilot_kills_what_a_dead_pilot_left_and_tells_the_server(
    pilot, fake_wms, bus, outdir, tmp_path
):
    first, _ = pilot("first")
    job_uuid, pids = run_escaping_job(fake_wms, bus, outdir, tmp_path, 1)
    guardian = guardian_of(first.pid)
    guardian.kill()  # both the pilot and its guardian die: nothing cleans up
    wait_until(lambda: not alive(guardian.pid), timeout=10)  # a zombie of the pilot's
    first.kill()
    first.wait(10)
    time.sleep(0.2)  # the payloads, orphaned, must still be there for this test to mean it
    assert all(alive(p) for p in pids.values())

    second, log = pilot("second")
    wait_until(lambda: len(fake_wms.calls_to("register")) == 2, timeout=20)

    body = fake_wms.calls_to("register")[1].body
    assert body["orphans"] == [
        {"job_uuid": job_uuid, "attempt": 0, "pilot_id": 7, "pids": sorted(pids.values())}
    ]
    assert not any(alive(p) for p in pids.values())
    line = next(x for x in log.read_text().splitlines() if "orphan_payload_killed" in x)
    assert f"job_uuid={job_uuid} attempt=0" in line and "previous_pilot_id=7" in line
    assert ",".join(map(str, sorted(pids.values()))) in line
    assert "orphans" not in fake_wms.calls_to("register")[0].body
    second.send_signal(signal.SIGINT)
    assert second.wait(15) == 0
    assert list((tmp_path / "work" / "payloads").iterdir()) == []


def test_a_root_pilot_s_payloads_under_another_account_die_with_it(
    base, other_account, start_pilot, fake_wms, bus
):
    from tests.pilots.agent.conftest import BROKER_URL
    from tests.pilots.agent.fakewms import REGISTER_TOKEN

    _own, interpreter = isolation._own, isolation.interpreter
    from wms.topology import split_password

    url, password = split_password(BROKER_URL)
    argv = ["--broker-url", url, "--register-token-file", "-"]
    argv += ["--payload-user", other_account.name]
    if password:
        argv += ["--broker-password-file", "-"]
    pilot = start_pilot(base, argv, stdin=f"{REGISTER_TOKEN}\n{password}\n")
    outdir = base / "storage"
    outdir.mkdir()
    _own(outdir, other_account, 0o755)
    pids_dir = base / "pids"
    pids_dir.mkdir()
    _own(pids_dir, other_account, 0o755)
    pidfile = pids_dir / "pids.json"
    job = job_message(outdir, "escape", str(pidfile), executable=interpreter(other_account)[0])
    fake_wms.jobs[job.job_uuid] = job.to_dict()
    bus.publish(job)
    wait_until(pidfile.exists, timeout=30)
    pids = json.loads(pidfile.read_text())
    assert {psutil.Process(p).uids().real for p in pids.values()} == {other_account.uid}
    records = base / "work" / "payloads"
    assert records.stat().st_uid == 0 and records.stat().st_mode & 0o777 == 0o700

    pilot.proc.kill()
    pilot.proc.wait(10)

    wait_until(lambda: not any(alive(p) for p in pids.values()), timeout=15)
    said = f"guardian_killed_payload job_uuid={job.job_uuid}"
    wait_until(lambda: said in pilot.log.read_text(), timeout=10)
