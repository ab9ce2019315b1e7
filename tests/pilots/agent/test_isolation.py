"""Payloads cannot take their pilot's identity (issue 12, docs/pilot.md "Payload isolation").

Real pilot processes (``python -m pilots.agent``) against the fake WMS and the real RabbitMQ run
a hostile payload (payload.py ``spy``) that reads what it can of its parent in /proc (environ,
cmdline, maps, fd, mem), its own environment, and the pilot's spool and secret files, and
writes all of it into its output. None of the pilot's secrets (the registration token, the
pilot token, the broker password) may appear there. Three set-ups:

- the payload under the pilot's own account (the pilot itself unprivileged, secrets on its
  standard input): the pilot is undumpable, so /proc/<pilot>/environ and mem are closed;
- a root pilot with a payload account (secrets in 0600 files, a report held in the spool);
- the payload inside bubblewrap (the pilot's directories and files masked).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pilots.agent.sandbox import PayloadUser
from tests.pilots.agent.conftest import BROKER_URL, job_message
from tests.pilots.agent.fakewms import REGISTER_TOKEN, wait_until
from wms.topology import split_password

ROOT = Path(__file__).resolve().parents[3]
ALLOWED_ENV = {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME"}
ALLOWED_ENV |= {"PWD"}  # bubblewrap's --chdir sets it


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root; the tests run as uid {os.geteuid()}")


@pytest.fixture(scope="module")
def other_account() -> Iterator[PayloadUser]:
    """An unprivileged account made for these tests (useradd), removed after."""
    _need_root("creating an account")
    if shutil.which("useradd") is None:
        pytest.skip("no useradd on this machine")
    name = f"wmst{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    try:
        yield PayloadUser.resolve(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture
def broker_url() -> Iterator[tuple[str, str]]:
    """(URL, password) of a RabbitMQ account of this test's own, whose password nothing but
    the pilot knows; the shared guest account (password not checked) without rabbitmqctl."""
    ctl = shutil.which("rabbitmqctl")
    if os.geteuid() != 0 or ctl is None:
        yield BROKER_URL, ""
        return
    user, password = f"wmst-{uuid.uuid4().hex[:8]}", "bpw-" + secrets.token_hex(12)

    def ctl_run(*args: str) -> None:
        subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=60)

    ctl_run("add_user", user, password)
    try:
        ctl_run("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        scheme, _, rest = BROKER_URL.partition("://")
        yield f"{scheme}://{user}:{password}@{rest.rpartition('@')[2]}", password
    finally:
        subprocess.run([ctl, "-q", "delete_user", user], check=False, capture_output=True)


def _bwrap_works(account: PayloadUser | None) -> str:
    """Why bubblewrap cannot run here ('' if it can)."""
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    kwargs: dict[str, Any] = {}
    if account is not None:
        kwargs = {"user": account.uid, "group": account.gid, "extra_groups": []}
    done = subprocess.run(
        ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--proc", "/proc", "--", "/bin/true"],
        capture_output=True,
        text=True,
        **kwargs,
    )
    return "" if done.returncode == 0 else f"bwrap cannot run here: {done.stderr.strip()}"


def _others_can_run(path: str) -> bool:
    real = Path(os.path.realpath(path))
    parents_ok = all(p.stat().st_mode & 0o001 for p in real.parents)
    return parents_ok and bool(real.stat().st_mode & 0o005 == 0o005)


def interpreter(account: PayloadUser | None) -> tuple[str, dict[str, str]]:
    """A Python the account can run, and the environment that finds the pilot's packages in
    it: this one, or the system's (same version) when this one lives where others cannot go
    (a pyenv under /root)."""
    if account is None or _others_can_run(sys.executable):
        return sys.executable, {}
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system is None or not _others_can_run(system):
        pytest.skip(f"no Python an unprivileged account can run ({sys.executable} is root's)")
    version = subprocess.run(
        [system, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True
    ).stdout.strip()
    if version != str(sys.version_info[:2]):
        pytest.skip(f"{system} is Python {version}, not this one's {sys.version_info[:2]}")
    import kombu

    site_packages = str(Path(kombu.__file__).resolve().parents[1])
    return system, {"PYTHONPATH": os.pathsep.join([site_packages, str(ROOT)])}


def _own(path: Path, account: PayloadUser | None, mode: int) -> Path:
    if account is not None:
        os.chown(path, account.uid, account.gid)
    path.chmod(mode)
    return path


def _secret_file(path: Path, text: str, account: PayloadUser | None) -> str:
    path.write_text(text + "\n")
    return str(_own(path, account, 0o600))


class Pilot:
    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc, self.log = proc, log

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.send_signal(signal.SIGTERM)  # drain, then shut down
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def start_pilot(fake_wms, bus) -> Iterator[Any]:
    fake_wms.bus_prefix = bus.prefix
    pilots: list[Pilot] = []

    def start(
        base: Path, argv: list[str], *, stdin: str = "", run_as: PayloadUser | None = None
    ) -> Pilot:
        log = base / f"pilot.{len(pilots)}.log"
        kwargs: dict[str, Any] = {}
        if run_as is not None:
            kwargs = {"user": run_as.uid, "group": run_as.gid, "extra_groups": []}
        python, env = interpreter(run_as)
        if run_as is not None:  # its work directory is its own
            (base / "work").mkdir(exist_ok=True)
            _own(base / "work", run_as, 0o700)
        proc = subprocess.Popen(
            [
                python,
                "-m",
                "pilots.agent",
                "--server-url",
                fake_wms.url,
                "--work-dir",
                str(base / "work"),
                "--poll-interval",
                "0.1",
                "--grace-period",
                "1",
                "--register-retries",
                "0",
                *argv,
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=open(log, "wb"),  # noqa: SIM115 - the child holds it
            text=True,
            **kwargs,
        )
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
        pilot = Pilot(proc, log)
        pilots.append(pilot)
        wait_until(lambda: fake_wms.calls_to("register") or proc.poll() is not None, timeout=20)
        assert proc.poll() is None, log.read_text()
        return pilot

    yield start
    fake_wms.report_answer = lambda uuid, body: (200, {})  # a held report goes out at exit
    for pilot in pilots:
        pilot.stop()
    bus.pilot_ids.update(fake_wms.tokens.values())


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory other accounts may traverse (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="wms-isolation-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run_spy(
    fake_wms, bus, outdir: Path, paths: list[str], *, hold: bool, python: str = sys.executable
) -> dict[str, Any]:
    """With ``hold``, first a job whose final report the WMS refuses (503): it stays in the
    spool, with the pilot token in it. Then the spy; returns what it found."""
    if hold:
        held = job_message(outdir, "write", "out.txt=1", executable=python)
        fake_wms.report_answer = lambda uuid, body: (
            (503, {"error": "unavailable"}) if uuid == held.job_uuid else (200, {})
        )
        fake_wms.jobs[held.job_uuid] = held.to_dict()
        bus.publish(held)
        wait_until(lambda: fake_wms.final_reports(held.job_uuid), timeout=20)
    spy = job_message(outdir, "spy", *paths, executable=python)
    fake_wms.jobs[spy.job_uuid] = spy.to_dict()
    bus.publish(spy)
    found = outdir / spy.job_uuid / "spy.json"
    wait_until(found.exists, timeout=30)
    return json.loads(found.read_text())


def _the_pilot_s_secrets(fake_wms, broker_password: str) -> list[str]:
    tokens = list(fake_wms.tokens)
    assert tokens, "the pilot registered and got a token"
    return [REGISTER_TOKEN, *tokens, *([broker_password] if broker_password else [])]


def _assert_clean_environment(spy: dict[str, Any]) -> None:
    env = spy["environ"]
    assert set(env) - ALLOWED_ENV <= {k for k in env if k.startswith("WMS_")}
    assert not [k for k in env if k.startswith("WMS_PILOT_")]
    assert "DATABASE_URL" not in env and "CELERY_BROKER_URL" not in env  # the test's own
    assert env["HOME"] == env["TMPDIR"] == env["WMS_JOB_DIR"]


def test_a_payload_of_the_pilot_s_own_account_finds_no_secret(
    base, other_account_or_self, broker_url, start_pilot, fake_wms, bus
):
    account = other_account_or_self
    url, password = broker_url
    outdir = base / "storage"
    outdir.mkdir()
    _own(outdir, account, 0o755)
    shown_url, pw = split_password(url)
    argv = ["--broker-url", shown_url, "--register-token-file", "-"]
    if pw:
        argv += ["--broker-password-file", "-"]
    start_pilot(base, argv, stdin=f"{REGISTER_TOKEN}\n{pw}\n", run_as=account)

    spy = _run_spy(fake_wms, bus, outdir, [], hold=False, python=interpreter(account)[0])

    text = json.dumps(spy)
    for secret in _the_pilot_s_secrets(fake_wms, password):
        assert secret not in text
    assert spy["uid"] == (account.uid if account else os.getuid())
    assert "pilots.agent" in spy["parent_cmdline"]  # the spy does read its parent's /proc
    for closed in ("parent_environ", "parent_mem", "parent_fd", "parent_maps"):
        assert spy[closed].startswith("ERROR"), closed  # the pilot is undumpable
    _assert_clean_environment(spy)


@pytest.fixture
def other_account_or_self(request) -> PayloadUser | None:
    """As root: an unprivileged account (a root process reads any /proc file, which would say
    nothing); otherwise the tests' own account."""
    if os.geteuid() == 0:
        return request.getfixturevalue("other_account")
    return None


def test_a_root_pilot_runs_payloads_as_the_payload_user_who_cannot_read_its_files(
    base, other_account, broker_url, start_pilot, fake_wms, bus
):
    url, password = broker_url
    outdir = base / "storage"
    outdir.mkdir()
    secrets_dir = base / "secrets"
    secrets_dir.mkdir(mode=0o700)
    shown_url, pw = split_password(url)
    token_file = _secret_file(secrets_dir / "token", REGISTER_TOKEN, None)
    argv = ["--broker-url", shown_url, "--register-token-file", token_file]
    argv += ["--payload-user", other_account.name]
    files = [token_file]
    if pw:
        files.append(_secret_file(secrets_dir / "broker", pw, None))
        argv += ["--broker-password-file", files[-1]]
    start_pilot(base, argv)
    spool = base / "work" / "spool"

    python = interpreter(other_account)[0]
    spy = _run_spy(fake_wms, bus, outdir, [str(spool), *files], hold=True, python=python)

    spooled = list(spool.glob("*.report.json"))
    assert spooled and any(t in spooled[0].read_text() for t in fake_wms.tokens)  # it was there
    text = json.dumps(spy)
    for secret in _the_pilot_s_secrets(fake_wms, password):
        assert secret not in text
    assert spy["uid"] == other_account.uid
    assert spy[str(spool)] == "ERROR PermissionError"
    assert all(spy[f] == "ERROR PermissionError" for f in files)
    assert spy["parent_environ"].startswith("ERROR")
    _assert_clean_environment(spy)
    assert (spy["environ"]["USER"], spy["environ"]["LOGNAME"]) == (other_account.name,) * 2
    job_dir = Path(spy["environ"]["WMS_JOB_DIR"])
    assert (base / "work" / "jobs").stat().st_mode & 0o777 == 0o711
    assert spool.stat().st_mode & 0o777 == 0o700
    assert not job_dir.exists() or job_dir.stat().st_uid == other_account.uid


def test_a_payload_in_bubblewrap_sees_neither_the_pilot_nor_its_files(
    base, other_account_or_self, broker_url, start_pilot, fake_wms, bus
):
    account = other_account_or_self
    why = _bwrap_works(account)
    if why:
        pytest.skip(why)
    url, password = broker_url
    outdir = base / "storage"
    outdir.mkdir()
    _own(outdir, account, 0o755)
    secrets_dir = base / "secrets"
    secrets_dir.mkdir()
    _own(secrets_dir, account, 0o700)
    shown_url, pw = split_password(url)
    token_file = _secret_file(secrets_dir / "token", REGISTER_TOKEN, account)
    argv = ["--broker-url", shown_url, "--register-token-file", token_file]
    argv += ["--payload-wrapper", "bwrap"]
    files = [token_file]
    if pw:
        files.append(_secret_file(secrets_dir / "broker", pw, account))
        argv += ["--broker-password-file", files[-1]]
    start_pilot(base, argv, run_as=account)
    spool = base / "work" / "spool"

    python = interpreter(account)[0]
    spy = _run_spy(fake_wms, bus, outdir, [str(spool), *files], hold=True, python=python)

    assert list(spool.glob("*.report.json"))  # held: the pilot token is in the spool outside
    text = json.dumps(spy)
    for secret in _the_pilot_s_secrets(fake_wms, password):
        assert secret not in text
    assert spy[str(spool)] in ("{}", "ERROR FileNotFoundError")  # masked
    assert all(spy[f] in ("", "ERROR FileNotFoundError") for f in files), {f: spy[f] for f in files}
    assert "pilots.agent" not in spy["parent_cmdline"]  # its own pid namespace
    _assert_clean_environment(spy)


def test_prctl_closes_proc_environ_and_mem_to_the_same_account(base, other_account_or_self):
    """The mechanism alone: a process that made itself undumpable, and one that did not,
    probed by another process of the same account."""
    account = other_account_or_self
    kwargs: dict[str, Any] = {}
    if account is not None:
        kwargs = {"user": account.uid, "group": account.gid, "extra_groups": []}
    code = (
        "import sys, time; from pilots.agent.sandbox import make_undumpable\n"
        "ok = make_undumpable() if sys.argv[1] == 'yes' else True\n"
        "print(ok, flush=True); time.sleep(30)\n"
    )
    probe = (
        "import json, sys\n"
        "out = {}\n"
        "for name in ('environ', 'cmdline', 'mem', 'maps'):\n"
        "    try:\n"
        "        open(f'/proc/{sys.argv[1]}/{name}', 'rb').read(16); out[name] = 'read'\n"
        "    except OSError as exc:\n"
        "        out[name] = type(exc).__name__\n"
        "print(json.dumps(out))\n"
    )
    python, extra = interpreter(account)
    env = {**os.environ, "WMS_SECRET_FOR_TEST": "x", "PYTHONDONTWRITEBYTECODE": "1", **extra}
    results = {}
    for undumpable in ("yes", "no"):
        target = subprocess.Popen(
            [python, "-c", code, undumpable],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            **kwargs,
        )
        try:
            assert target.stdout is not None and target.stdout.readline().strip() == "True"
            environ = Path(f"/proc/{target.pid}/environ").stat()
            done = subprocess.run(
                [python, "-c", probe, str(target.pid)],
                capture_output=True,
                text=True,
                check=True,
                **kwargs,
            )
            results[undumpable] = (json.loads(done.stdout), environ.st_uid)
        finally:
            target.kill()
            target.wait(10)

    own_uid = account.uid if account is not None else os.getuid()
    closed, owner = results["yes"]
    assert owner == 0  # the kernel hands the files to root
    if own_uid != 0:
        assert closed == {
            "environ": "PermissionError",
            "cmdline": "read",  # always readable: no secret may ever be on a command line
            "mem": "PermissionError",
            "maps": "PermissionError",
        }
    opened, owner = results["no"]
    assert owner == own_uid
    assert opened["environ"] == "read"  # the control: without prctl it is readable
