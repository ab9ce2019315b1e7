"""How a payload is started (pilots/agent/sandbox.py): its environment, its account, the
container runtime's command line, exactly as docs/pilot.md shows them; and the refusals of a
real ``wms-pilot`` process given a secret the wrong way (nothing reaches the WMS)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pilots.agent.runner import JobRunner
from pilots.agent.sandbox import (
    PayloadSandbox,
    PayloadUser,
    SandboxError,
    Wrapper,
    from_config,
    own_account_name,
)
from tests.pilots.agent.conftest import job_message

ROOT = Path(__file__).resolve().parents[3]
JOB = Path("/scratch/w/jobs/u.0")


def test_the_payload_environment_is_the_job_s_not_the_pilot_s():
    pilot_env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "de_DE.UTF-8",
        "CUDA_VISIBLE_DEVICES": "2",
        "X509_CERT_DIR": "/etc/grid-security/certificates",
        "AWS_SECRET_ACCESS_KEY": "not-for-payloads",
        "WMS_PILOT_CONFIG": "/etc/wms-pilot/cpu.toml",
        "DATABASE_URL": "postgres://u:pw@db/wms",
    }
    sandbox = PayloadSandbox(passed_on=("X509_CERT_DIR",), source_env=pilot_env)

    env = sandbox.environment(JOB, {"WMS_JOB_UUID": "u"}, {"PATH": "/usr/bin:/bin:/venv/bin"})

    account = own_account_name()
    assert env == {
        "PATH": "/usr/bin:/bin:/venv/bin",
        "HOME": str(JOB),
        "TMPDIR": str(JOB),
        "LANG": "de_DE.UTF-8",
        "USER": account,
        "LOGNAME": account,
        "CUDA_VISIBLE_DEVICES": "2",
        "X509_CERT_DIR": "/etc/grid-security/certificates",
        "WMS_JOB_UUID": "u",
    }


def test_a_locale_is_always_set():
    env = PayloadSandbox(source_env={}).environment(JOB, {})
    assert env["LANG"] == "C.UTF-8" and env["PATH"] == os.defpath


def test_bubblewrap_command(tmp_path):
    work, spool, secret = tmp_path / "work", tmp_path / "spool", tmp_path / "token"
    work.mkdir()
    spool.mkdir()
    secret.write_text("t")
    wrapper = Wrapper(
        "bwrap",
        options=("--unshare-net",),
        hidden=(str(work), str(spool), str(secret), str(tmp_path / "gone")),
        empty_file="/w/.empty",
    )

    inputs = ["/data/a", "/d/b", f"{JOB}/inputs/c"]  # the last one copied into the job's dir
    cmd = wrapper.command(["wms-payload-map", "--n", "5"], job_dir=JOB, inputs=inputs)

    assert cmd == [
        "bwrap", "--die-with-parent", "--unshare-all", "--share-net",
        "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
        "--tmpfs", str(work), "--tmpfs", str(spool), "--ro-bind", "/w/.empty", str(secret),
        "--ro-bind", "/d/b", "/d/b", "--ro-bind", "/data/a", "/data/a",
        "--bind", str(JOB), str(JOB), "--chdir", str(JOB),
        "--unshare-net",
        "--", "wms-payload-map", "--n", "5",
    ]  # fmt: skip
    assert wrapper.environment({"PATH": "/bin", "WMS_JOB_DIR": str(JOB)}) == {
        "PATH": "/bin",
        "WMS_JOB_DIR": str(JOB),
    }


@pytest.mark.parametrize(
    ("kind", "prefix"), [("apptainer", "APPTAINERENV_"), ("singularity", "SINGULARITYENV_")]
)
def test_apptainer_and_singularity_commands(kind, prefix):
    wrapper = Wrapper(kind, image="/cvmfs/img.sif", options=("--nv",))

    cmd = wrapper.command(["run.sh", "x"], job_dir=JOB, inputs=["/data/a/1", "/data/a/2"])
    env = wrapper.environment(
        {"PATH": "/bin", "HOME": str(JOB), "LANG": "C.UTF-8", "WMS_JOB_UUID": "u"}
    )

    assert cmd == [
        kind, "exec", "--containall", "--home", str(JOB), "--pwd", str(JOB),
        "--bind", "/data/a:/data/a:ro",
        "--nv", "/cvmfs/img.sif", "run.sh", "x",
    ]  # fmt: skip
    assert env == {
        "PATH": "/bin",
        "HOME": str(JOB),
        "LANG": "C.UTF-8",
        f"{prefix}LANG": "C.UTF-8",
        f"{prefix}WMS_JOB_UUID": "u",
    }


def test_a_wrapper_without_what_it_needs_is_refused():
    with pytest.raises(SandboxError, match="needs --payload-wrapper-image"):
        Wrapper("apptainer")
    with pytest.raises(SandboxError, match="unknown payload wrapper"):
        Wrapper("docker", image="x")
    with pytest.raises(SandboxError, match="payload-wrapper-options"):
        from_config(
            payload_user="",
            payload_env=(),
            wrapper="bwrap",
            image="",
            options="--bind 'x",
            hidden=(),
        )


def test_the_payload_user_must_exist_and_needs_root_unless_it_is_the_pilot_s_own():
    with pytest.raises(SandboxError, match="no such account"):
        PayloadUser.resolve("no-such-account-wms")
    me = from_config(
        payload_user=str(os.geteuid()), payload_env=(), wrapper="none", image="", options="",
        hidden=(),
    )  # fmt: skip
    assert me.user is not None and me.user.is_self and not me.switches_user
    assert me.popen_kwargs() == {}
    if os.geteuid() != 0:
        with pytest.raises(SandboxError, match="only a pilot running as root"):
            from_config(
                payload_user="nobody", payload_env=(), wrapper="none", image="", options="",
                hidden=(),
            )  # fmt: skip
    else:
        nobody = from_config(
            payload_user="nobody", payload_env=(), wrapper="none", image="", options="",
            hidden=(),
        )  # fmt: skip
        assert nobody.popen_kwargs()["user"] == PayloadUser.resolve("nobody").uid


def test_a_log_the_payload_replaced_is_not_copied(tmp_path, outdir):
    """The payload may own its work dir (a payload account): the pilot copies the log it
    wrote, never what the payload put at its path (here a link to a file of the pilot's)."""
    secret = tmp_path / "pilot-secret"
    secret.write_text("tok-of-the-pilot")
    secret.chmod(0o600)
    job = job_message(outdir, "swap-log", str(secret))

    result = JobRunner(job, work_root=tmp_path / "work").run()

    assert [o["type"] for o in result.outputs] == []
    assert "was replaced by the job: not copied" in result.error_message
    copied = [p.read_text() for p in outdir.rglob("*") if p.is_file()]
    assert not any("tok-of-the-pilot" in text for text in copied)


# --- the real program refuses secrets given the wrong way, before it talks to anyone -----------


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--register-token", "tok-x"], {}, "--register-token on the command line"),
        ([], {"WMS_PILOT_REGISTER_TOKEN": "tok-x"}, "WMS_PILOT_REGISTER_TOKEN is set"),
        (["--broker-url", "amqp://u:tok-x@127.0.0.1//"], {}, "--broker-url holds a password"),
        ([], {"WMS_PILOT_BROKER_URL": "amqp://u:tok-x@h//"}, "WMS_PILOT_BROKER_URL holds"),
    ],
)
def test_the_pilot_refuses_secrets_in_argv_or_env_and_contacts_nobody(
    tmp_path, fake_wms, argv, env, message
):
    work = tmp_path / "w"
    done = subprocess.run(
        [sys.executable, "-m", "pilots.agent", "--server-url", fake_wms.url, "--work-dir",
         str(work), "--payload-user", "nobody", *argv],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip

    assert done.returncode == 2
    assert message in done.stderr and "-file" in done.stderr
    assert "tok-x" not in done.stderr
    assert fake_wms.calls == [] and not work.exists()


def test_a_root_pilot_without_a_payload_user_is_refused(tmp_path, fake_wms):
    if os.geteuid() != 0:
        pytest.skip("the pilot runs as root only when the tests do")
    done = subprocess.run(
        [sys.executable, "-m", "pilots.agent", "--server-url", fake_wms.url,
         "--work-dir", str(tmp_path / "w"), "--register-token-file", "-"],
        cwd=ROOT, input="tok\n", capture_output=True, text=True, timeout=30,
    )  # fmt: skip

    assert done.returncode == 2
    assert "the pilot runs as root: give --payload-user" in done.stderr
    assert fake_wms.calls == [] and not (tmp_path / "w").exists()


def test_an_unknown_payload_user_stops_the_pilot_before_it_registers(tmp_path, fake_wms):
    done = subprocess.run(
        [sys.executable, "-m", "pilots.agent", "--server-url", fake_wms.url,
         "--work-dir", str(tmp_path / "w"), "--register-token-file", "-",
         "--payload-user", "no-such-account-wms"],
        cwd=ROOT, input="tok\n", capture_output=True, text=True, timeout=30,
    )  # fmt: skip

    assert done.returncode == 1
    assert "payload user 'no-such-account-wms': no such account" in done.stderr
    assert fake_wms.calls == []
