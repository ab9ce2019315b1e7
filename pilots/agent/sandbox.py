"""What a payload may see of its pilot: nothing of the pilot's secrets.

- :func:`make_undumpable`: ``prctl(PR_SET_DUMPABLE, 0)`` on Linux, so that a process of the same
  account (a payload) can neither ptrace the pilot nor read its ``/proc/<pid>/environ``, ``mem``,
  ``fd/`` or ``maps`` (the kernel makes them root's). ``/proc/<pid>/cmdline`` stays readable by
  everyone, which is why no secret is ever on the pilot's command line. Children get the flag
  back at ``execve``: payloads are ordinary processes.
- :class:`PayloadSandbox`: how one payload is started: a clean environment (the job's variables
  and a handful a program needs, never the pilot's), under the payload account when there is
  one (``setgroups``/``setgid``/``setuid`` in the child before ``exec``, by :mod:`subprocess`),
  inside a container runtime when the site configures one (bubblewrap, apptainer, singularity).

docs/pilot.md ("The job's environment", "Payload isolation") gives the rules and the exact
commands built here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pwd
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3

# variables of the pilot's environment every payload gets when they are set: the locale, the
# time zone, and the GPUs the pilot was given (docs/pilot.md: one GPU pilot per device)
PASSED_ON = (
    "LANG",
    "LC_ALL",
    "TZ",
    "CUDA_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "GPU_DEVICE_ORDINAL",
    "NVIDIA_VISIBLE_DEVICES",
)
DEFAULT_LANG = "C.UTF-8"
APPTAINER_ENV_PREFIX = {"apptainer": "APPTAINERENV_", "singularity": "SINGULARITYENV_"}


class SandboxError(ValueError):
    """The payload account or wrapper cannot be used (the message says why)."""


def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def make_undumpable() -> bool:
    """Forbid same-account processes to read this process's memory and /proc files (Linux).
    Returns whether it is in force."""
    if not sys.platform.startswith("linux"):
        return False
    libc = _libc()
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        return False
    return bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0)


def is_dumpable() -> bool:
    if not sys.platform.startswith("linux"):
        return True
    return bool(_libc().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))


@dataclass(frozen=True)
class PayloadUser:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    @classmethod
    def resolve(cls, spec: str) -> PayloadUser:
        """An account by name or numeric uid, with its primary and supplementary groups."""
        try:
            entry = pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
        except (KeyError, OverflowError) as exc:
            raise SandboxError(f"payload user {spec!r}: no such account") from exc
        groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()


def own_account_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


@dataclass(frozen=True)
class Wrapper:
    """A container runtime around each payload.

    ``hidden``: paths of the pilot (its work and spool directories, its secret and config
    files) that must not be visible inside, whatever the account's rights on them.
    """

    kind: str  # bwrap | apptainer | singularity
    image: str = ""
    options: tuple[str, ...] = ()
    hidden: tuple[str, ...] = ()
    program: str = ""  # the runtime's executable (default: its name, found on PATH)
    empty_file: str = ""  # mounted over hidden files (/dev/null cannot be: nodev in a userns)

    def __post_init__(self) -> None:
        if self.kind not in ("bwrap", "apptainer", "singularity"):
            raise SandboxError(f"unknown payload wrapper {self.kind!r}")
        if self.kind != "bwrap" and not self.image:
            raise SandboxError(f"payload wrapper {self.kind} needs --payload-wrapper-image")

    def command(self, argv: Sequence[str], *, job_dir: Path, inputs: Sequence[str]) -> list[str]:
        # inputs copied into the job's directory come with it
        inputs = [p for p in inputs if not Path(p).is_relative_to(job_dir)]
        if self.kind == "bwrap":
            return self._bwrap(argv, job_dir, inputs)
        return self._apptainer(argv, job_dir, inputs)

    def _bwrap(self, argv: Sequence[str], job_dir: Path, inputs: Sequence[str]) -> list[str]:
        # the host's file system read-only, fresh /dev, /proc (of its own pid namespace: the
        # pilot is not in it) and /tmp; the pilot's directories and files masked; the inputs
        # read-only and the job's directory read-write, at the same paths as outside
        cmd = [self.program or "bwrap", "--die-with-parent", "--unshare-all", "--share-net"]
        cmd += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]  # noqa: S108
        for path in self.hidden:
            p = Path(path)
            if p.is_dir():
                cmd += ["--tmpfs", str(p)]
            elif p.exists() and self.empty_file:
                cmd += ["--ro-bind", self.empty_file, str(p)]
        for path in sorted(set(inputs)):
            cmd += ["--ro-bind", path, path]
        cmd += ["--bind", str(job_dir), str(job_dir), "--chdir", str(job_dir)]
        return [*cmd, *self.options, "--", *argv]

    def _apptainer(self, argv: Sequence[str], job_dir: Path, inputs: Sequence[str]) -> list[str]:
        # --containall: own pid and ipc namespaces, a minimal /dev, no host $HOME or /tmp, a
        # clean environment (the job's comes in <RUNTIME>ENV_* variables, see environment())
        cmd = [self.program or self.kind, "exec", "--containall", "--home", str(job_dir)]
        cmd += ["--pwd", str(job_dir)]
        for directory in sorted({str(Path(p).parent) for p in inputs}):
            cmd += ["--bind", f"{directory}:{directory}:ro"]
        return [*cmd, *self.options, self.image, *argv]

    def environment(self, env: Mapping[str, str]) -> dict[str, str]:
        """The runtime's own environment carrying the payload's."""
        if self.kind == "bwrap":
            return dict(env)  # bubblewrap passes its environment on as it is
        prefix = APPTAINER_ENV_PREFIX[self.kind]
        outer = {k: env[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in env}
        # the image has its own PATH; the host's means nothing inside, HOME is --home
        outer.update({prefix + k: v for k, v in env.items() if k not in ("PATH", "HOME")})
        return outer


@dataclass(frozen=True)
class PayloadSandbox:
    """How payloads are started: account, environment, wrapper (defaults: the pilot's own
    account, a clean environment, no wrapper)."""

    user: PayloadUser | None = None
    wrapper: Wrapper | None = None
    passed_on: tuple[str, ...] = ()  # more variable names of the pilot's environment
    source_env: Mapping[str, str] = field(default_factory=lambda: os.environ)

    @property
    def switches_user(self) -> bool:
        return self.user is not None and not self.user.is_self

    def environment(
        self, job_dir: Path, job_vars: Mapping[str, str], extra: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """The payload's whole environment: never the pilot's, only what is listed here."""
        src = self.source_env
        env = {k: src[k] for k in (*PASSED_ON, *self.passed_on) if k in src}
        env.setdefault("LANG", DEFAULT_LANG)
        env["PATH"] = src.get("PATH", os.defpath)
        account = self.user.name if self.user is not None else own_account_name()
        env.update(HOME=str(job_dir), TMPDIR=str(job_dir), USER=account, LOGNAME=account)
        env.update(extra or {})
        env.update(job_vars)
        return env

    def command(self, argv: Sequence[str], *, job_dir: Path, inputs: Sequence[str]) -> list[str]:
        if self.wrapper is None:
            return list(argv)
        return self.wrapper.command(argv, job_dir=job_dir, inputs=inputs)

    def process_environment(self, env: Mapping[str, str]) -> dict[str, str]:
        return self.wrapper.environment(env) if self.wrapper is not None else dict(env)

    def hand_over(self, job_dir: Path) -> None:
        """The job's directory (and what stage-in put in it) to the payload account, mode 0700:
        other payload accounts cannot look in."""
        os.chmod(job_dir, 0o700)
        if not self.switches_user:
            return
        assert self.user is not None
        uid, gid = self.user.uid, self.user.gid
        os.chown(job_dir, uid, gid)
        for root, dirs, files in os.walk(job_dir):
            for name in (*dirs, *files):
                os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)

    def popen_kwargs(self) -> dict[str, Any]:
        """``user``/``group``/``extra_groups`` of :class:`subprocess.Popen`: the child calls
        setgroups, setgid, setuid before exec."""
        if not self.switches_user:
            return {}
        assert self.user is not None
        return {
            "user": self.user.uid,
            "group": self.user.gid,
            "extra_groups": list(self.user.groups),
        }


def from_config(
    *,
    payload_user: str,
    payload_env: Sequence[str],
    wrapper: str,
    image: str,
    options: str,
    hidden: Sequence[str | Path],
    empty_file: str | Path = "",
) -> PayloadSandbox:
    """The sandbox a pilot's configuration asks for (SandboxError when it cannot be had)."""
    user = PayloadUser.resolve(payload_user) if payload_user else None
    if user is not None and not user.is_self and os.geteuid() != 0:
        raise SandboxError(
            f"--payload-user {payload_user}: only a pilot running as root can run payloads "
            f"as another account (this one runs as {own_account_name()})"
        )
    wrap = None
    if wrapper and wrapper != "none":
        try:
            extra = tuple(shlex.split(options))
        except ValueError as exc:
            raise SandboxError(f"--payload-wrapper-options {options!r}: {exc}") from exc
        wrap = Wrapper(
            wrapper,
            image=image,
            options=extra,
            hidden=tuple(map(str, hidden)),
            empty_file=str(empty_file),
        )
    return PayloadSandbox(user=user, wrapper=wrap, passed_on=tuple(payload_env))
