"""The pilot's configuration: flags > environment (``WMS_PILOT_*``) > config file > defaults.

Every option has one name (``work_dir``) used three ways: the flag ``--work-dir``, the variable
``WMS_PILOT_WORK_DIR`` and the key ``work_dir`` (or ``work-dir``) of the config file, an INI file
with a ``[pilot]`` section or a TOML file (``.toml``) with a ``[pilot]`` table or top-level keys.
The file is named by ``--config`` or ``WMS_PILOT_CONFIG``.

Secrets (the registration token, the broker's password) are never taken from the command line
or the environment, where the pilot's payloads (and, for the command line, every user of the
node) could read them: they come from a file of their own (``--register-token-file``,
``--broker-password-file``; ``-`` is standard input), or from the config file when nobody but
its owner may read it (mode 0600). A secret found in a flag, a ``WMS_PILOT_*`` variable or a
password inside ``--broker-url`` / ``WMS_PILOT_BROKER_URL`` is refused with a message saying
what to use instead.

kombu transport options of the broker connection (the folders of the filesystem transport, for
instance) come the same way: ``--broker-option data_folder_in=/x`` (repeatable),
``WMS_PILOT_BROKER_DATA_FOLDER_IN=/x``, or the key ``broker_data_folder_in`` of the file.
"""

from __future__ import annotations

import argparse
import configparser
import os
import stat
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TextIO

from wms.topology import broker_urls, hide_password, url_password, with_password

ENV_PREFIX = "WMS_PILOT_"
BROKER_PREFIX = "broker_"  # broker_<transport option>, except broker_url
CONFIG_ENV = "WMS_PILOT_CONFIG"
SECTION = "pilot"
STDIN = "-"  # a secret file named "-" is standard input
WRAPPERS = ("none", "bwrap", "apptainer", "singularity")


class ConfigError(ValueError):
    """A configuration value that cannot be used (the message says which and why)."""


@dataclass(frozen=True)
class PilotConfig:
    server_url: str = "http://127.0.0.1:8000"
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    register_token: str = ""
    register_token_file: str = ""
    broker_password: str = ""
    broker_password_file: str = ""
    device_type: str = "cpu"
    site: str = ""
    hostname: str = ""
    gpus: int = -1
    work_dir: str = "wms-pilot"
    spool_dir: str = ""
    slots: int = 1
    idle_timeout: float = 0.0
    heartbeat_interval: float = 30.0
    grace_period: float = 30.0
    bus_prefix: str = "wms"
    queue_type: str = "classic"
    poll_interval: float = 2.0
    stage_in: str = "inplace"
    storage_roots: tuple[str, ...] = ()
    keep_job_dirs: bool = False
    http_timeout: float = 30.0
    register_retries: int = 10
    start_retries: int = 5
    start_gather: float = 0.005
    report_gather: float = 0.02
    broker_timeout: float = 30.0
    slot_stuck_after: float = 900.0
    log_level: str = "INFO"
    payload_user: str = ""
    payload_env: tuple[str, ...] = ()
    payload_wrapper: str = "none"
    payload_wrapper_image: str = ""
    payload_wrapper_options: str = ""
    config_file: str = ""
    broker_options: dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir).expanduser().absolute()

    @property
    def spool_path(self) -> Path:
        if self.spool_dir:
            return Path(self.spool_dir).expanduser().absolute()
        return self.work_path / "spool"

    @property
    def broker_connect_url(self) -> str:
        """The broker URL with the password of ``broker_password`` in it (for kombu only:
        never logged, never on a command line). A failover list (``amqp://u@h1//;amqp://u@h2//``)
        gets it in each of its URLs."""
        return with_password(self.broker_url, self.broker_password)

    def secret_files(self) -> list[Path]:
        """The files the secrets were read from (payloads must not see them)."""
        names = (self.register_token_file, self.broker_password_file, self.config_file)
        return [Path(n).expanduser().absolute() for n in names if n and n != STDIN]

    def redacted(self) -> dict[str, Any]:
        """The values, with the secrets masked (for ``--print-config`` and logs)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in SECRETS:
            if out[name]:
                out[name] = "***"
        out["broker_url"] = _hide_password(out["broker_url"])
        out["broker_options"] = dict(out["broker_options"])
        out["payload_env"] = list(out["payload_env"])
        return out


def _hide_password(url: str) -> str:
    return hide_password(url)


# --- parsing of one value ---------------------------------------------------------------------


def _bool(value: Any) -> bool:
    if isinstance(value, bool):  # TOML has real booleans
        return value
    low = str(value).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _number(kind: type, minimum: float | None = None, positive: bool = False) -> Callable:
    def parse(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("a number is wanted, not a boolean")
        number = kind(value)
        if positive and number <= 0:
            raise ValueError("must be greater than 0")
        if minimum is not None and number < minimum:
            raise ValueError(f"must be at least {minimum}")
        return number

    return parse


def _choice(*choices: str) -> Callable:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text

    return parse


def _text(value: Any) -> str:
    return str(value).strip()


def _url(value: Any) -> str:
    return str(value).strip().rstrip("/")


def _names(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list | tuple) else str(value).replace(",", " ").split()
    names = tuple(str(v).strip() for v in items if str(v).strip())
    for name in names:
        if not name.replace("_", "").isalnum() or name[0].isdigit():
            raise ValueError(f"{name!r} is not an environment variable name")
        if name.startswith(ENV_PREFIX):
            raise ValueError(f"{name}: the pilot's own settings are never passed to payloads")
    return names


def _roots(value: Any) -> tuple[str, ...]:
    """URL prefixes, comma- or space-separated (or a list), each made canonical."""
    from wms.locations import canonical_roots

    items = value if isinstance(value, list | tuple) else str(value).replace(",", " ").split()
    return canonical_roots(str(v) for v in items)


def _level(value: Any) -> str:
    text = str(value).strip().upper()
    if text not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return text


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[Any], Any]
    help: str
    metavar: str = ""
    secret: bool = False  # a config-file key only: refused as a flag or a variable

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("server_url", _url, "base URL of the WMS (the /api/v1/ calls go under it)", "URL"),
    Option(
        "broker_url",
        _text,
        "RabbitMQ URL (kombu syntax: amqp://user@host:5672/vhost); a cluster's nodes as a"
        " failover list separated by ';' (amqp://user@mq1//;amqp://user@mq2//)",
    ),
    Option(
        "register_token",
        _text,
        "user API token allowed to register pilots: config file key only (mode 0600)",
        "TOKEN",
        secret=True,
    ),
    Option(
        "register_token_file",
        _text,
        "file holding the registration token (- : standard input)",
        "FILE",
    ),
    Option(
        "broker_password",
        _text,
        "the broker account's password: config file key only (mode 0600)",
        "PASSWORD",
        secret=True,
    ),
    Option(
        "broker_password_file",
        _text,
        "file holding the broker account's password (- : standard input)",
        "FILE",
    ),
    Option("device_type", _choice("cpu", "gpu"), "the job queue to take jobs from: cpu or gpu"),
    Option("site", _text, "site name reported at registration"),
    Option("hostname", _text, "host name reported at registration (default: the FQDN)"),
    Option("gpus", _number(int, minimum=-1), "GPUs reported (default -1: detect)", "N"),
    Option("work_dir", _text, "where job work directories are made", "DIR"),
    Option("spool_dir", _text, "final reports not yet acknowledged (default WORK_DIR/spool)"),
    Option("slots", _number(int, minimum=1), "jobs run in parallel", "N"),
    Option(
        "idle_timeout", _number(float, minimum=0), "exit after so long without a job (0: never)"
    ),
    Option("heartbeat_interval", _number(float, positive=True), "seconds between heartbeats"),
    Option("grace_period", _number(float, minimum=0), "seconds from SIGTERM to SIGKILL on a kill"),
    Option("bus_prefix", _text, "prefix of the exchange and queue names (the server's wins)"),
    Option(
        "queue_type",
        _choice("classic", "quorum"),
        "RabbitMQ queue type, as the server's (its registration answer names it and wins)",
    ),
    Option("poll_interval", _number(float, positive=True), "longest wait between empty polls"),
    Option("stage_in", _choice("inplace", "copy"), "file inputs: used in place or copied"),
    Option(
        "storage_roots",
        _roots,
        "URL prefixes inputs may come from, comma-separated (besides the job's own output "
        "URL); an input elsewhere fails its job (stage_in_refused)",
        "URLS",
    ),
    Option("keep_job_dirs", _bool, "keep each job's work directory after its report (true/false)"),
    Option("http_timeout", _number(float, positive=True), "seconds to wait for the WMS"),
    Option("register_retries", _number(int, minimum=0), "registration attempts after the first"),
    Option(
        "start_retries",
        _number(int, minimum=0),
        "tries of a start whose answer was lost (same idempotency key), after the first",
    ),
    Option(
        "start_gather",
        _number(float, minimum=0),
        "seconds to wait for more job messages when the queue holds fewer than the free slots, "
        "so that they are started in one call (0: start what is there)",
    ),
    Option(
        "report_gather",
        _number(float, minimum=0),
        "seconds the spool's sender waits, once a final report is spooled, for more before it "
        "sends them in one call (0: send at once)",
    ),
    Option(
        "broker_timeout",
        _number(float, positive=True),
        "seconds a broker operation (connect, get, ack, reject) may take",
    ),
    Option(
        "slot_stuck_after",
        _number(float, positive=True),
        "seconds a job may stay in stage-in, or after its payload ended, before its slot is "
        "freed and the attempt reported failed (slot_stuck)",
    ),
    Option("log_level", _level, "DEBUG, INFO, WARNING or ERROR"),
    Option(
        "payload_user",
        _text,
        "account the payloads run as (name or uid); required when the pilot runs as root",
        "USER",
    ),
    Option(
        "payload_env",
        _names,
        "names of the pilot's environment variables passed on to payloads (comma-separated)",
        "NAMES",
    ),
    Option(
        "payload_wrapper",
        _choice(*WRAPPERS),
        "container runtime each payload runs in: none, bwrap, apptainer or singularity",
    ),
    Option("payload_wrapper_image", _text, "the apptainer/singularity image", "IMAGE"),
    Option(
        "payload_wrapper_options",
        _text,
        "extra options of the wrapper (shell-split), before the image/command",
        "OPTIONS",
    ),
)
SECRETS = tuple(o.name for o in OPTIONS if o.secret)
OPTION_BY_NAME = {o.name: o for o in OPTIONS}
DEFAULTS = PilotConfig()


# --- the three sources ------------------------------------------------------------------------


def read_file(path: str | Path) -> dict[str, Any]:
    """Options from an INI (``[pilot]`` section) or TOML (``.toml``) file; unknown keys are
    errors (a typo must not pass silently)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    raw: Mapping[str, Any]
    if path.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
        raw = data[SECTION] if isinstance(data.get(SECTION), dict) else data
    else:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read_string(text, source=str(path))
        except configparser.Error as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
        if not parser.has_section(SECTION):
            raise ConfigError(f"config file {path} has no [{SECTION}] section")
        raw = dict(parser.items(SECTION))
    out: dict[str, Any] = {}
    broker: dict[str, str] = {}
    for key, value in raw.items():
        name = key.strip().lower().replace("-", "_")
        if name in OPTION_BY_NAME:
            out[name] = value
        elif name.startswith(BROKER_PREFIX) and len(name) > len(BROKER_PREFIX):
            broker[name[len(BROKER_PREFIX) :]] = str(value)
        else:
            raise ConfigError(f"config file {path}: unknown option {key!r}")
    if broker:
        out["broker_options"] = broker
    secrets = [n for n in SECRETS if out.get(n)]
    if url_password(str(out.get("broker_url", ""))):
        secrets.append("a password in broker_url")
    if secrets:
        _check_private(path, f"config file {path} holds {', '.join(secrets)}")
    return out


def _check_private(path: Path, what: str) -> None:
    """A file holding a secret: readable by its owner only (no group or other bits)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise ConfigError(f"{what}: {exc.strerror or exc}") from exc
    if mode & 0o077:
        raise ConfigError(
            f"{what} but its mode is {mode:04o}: others may read it "
            f"(chmod 600 {path}, owned by the pilot's account)"
        )


def read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    for o in OPTIONS:
        if o.secret and environ.get(o.env):
            raise ConfigError(
                f"{o.env} is set: secrets are not taken from the environment (payloads and "
                f"other processes could read it there): put it in a file and give "
                f"{o.flag}-file FILE (or {o.flag}-file - to pass it on standard input)"
            )
    out: dict[str, Any] = {o.name: environ[o.env] for o in OPTIONS if o.env in environ}
    if url_password(out.get("broker_url", "")):
        raise ConfigError(_url_password_refused(OPTION_BY_NAME["broker_url"].env))
    env_prefix = ENV_PREFIX + BROKER_PREFIX.upper()
    option_envs = {o.env for o in OPTIONS}
    broker = {
        key[len(env_prefix) :].lower(): value
        for key, value in environ.items()
        if key.startswith(env_prefix) and key not in option_envs
    }
    if broker:
        out["broker_options"] = broker
    return out


def _url_password_refused(where: str) -> str:
    return (
        f"{where} holds a password: secrets are not taken from the command line or the "
        "environment (every process of the node can read a command line): give the URL "
        "without it (amqp://user@host:5672/vhost) and the password with "
        "--broker-password-file FILE (or - for standard input)"
    )


def _broker_flags(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--broker-option {item!r}: want KEY=VALUE")
        out[key.strip().lower().replace("-", "_")] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    from pilots.agent import __version__

    parser = argparse.ArgumentParser(
        prog="wms-pilot",
        description=(
            "The WMS pilot: registers with the WMS, takes jobs of its device type from RabbitMQ "
            "and runs them. Every option is also a WMS_PILOT_<NAME> environment variable and a "
            "key of the config file; flags win over the environment, the environment over the "
            "file, the file over the defaults."
        ),
    )
    parser.add_argument(
        "--config", metavar="FILE", help=f"INI ([{SECTION}] section) or .toml file ({CONFIG_ENV})"
    )
    for o in OPTIONS:
        default = getattr(DEFAULTS, o.name)
        if o.secret:  # known, so that its refusal says what to use instead
            parser.add_argument(o.flag, dest=o.name, default=None, help=argparse.SUPPRESS)
            continue
        parser.add_argument(
            o.flag,
            dest=o.name,
            default=None,
            metavar=o.metavar or o.name.upper(),
            help=f"{o.help} [{o.env}; default: {default!r}]",
        )
    parser.add_argument(
        "--broker-option",
        dest="broker_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"a kombu transport option of the broker connection, repeatable "
        f"[{ENV_PREFIX}{BROKER_PREFIX.upper()}<KEY>; file key {BROKER_PREFIX}<key>]",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the effective configuration and exit"
    )
    parser.add_argument("--version", action="version", version=f"wms-pilot {__version__}")
    return parser


def load(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    stdin: TextIO | None = None,
) -> tuple[PilotConfig, argparse.Namespace]:
    """Parse flags, read the environment, the config file and the secret files (or standard
    input); return the merged configuration."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    for o in OPTIONS:
        if o.secret and getattr(args, o.name) is not None:
            raise ConfigError(
                f"{o.flag} on the command line: every process of the node can read a command "
                f"line (/proc/PID/cmdline, ps): give {o.flag}-file FILE (mode 0600), or "
                f"{o.flag}-file - and the secret on standard input"
            )
    if args.broker_url and url_password(args.broker_url):
        raise ConfigError(_url_password_refused("--broker-url"))
    flags: dict[str, Any] = {
        o.name: getattr(args, o.name) for o in OPTIONS if getattr(args, o.name) is not None
    }
    if args.broker_options:
        flags["broker_options"] = _broker_flags(args.broker_options)
    config = merge(
        flags=flags,
        environ=environ,
        config_file=args.config or environ.get(CONFIG_ENV) or None,
    )
    config = read_secrets(config, sys.stdin if stdin is None else stdin)
    return config, args


def read_secrets(config: PilotConfig, stdin: TextIO) -> PilotConfig:
    """The secrets of the ``*_file`` options, read now. Standard input (``-``) holds one line
    per secret given as ``-``, in this order: the registration token, the broker password."""
    wanted = [
        name for name in ("register_token", "broker_password") if getattr(config, f"{name}_file")
    ]
    from_stdin = [n for n in wanted if getattr(config, f"{n}_file") == STDIN]
    lines: list[str] = []
    if from_stdin:
        lines = [line.strip() for line in stdin.read().splitlines() if line.strip()]
        if len(lines) < len(from_stdin):
            raise ConfigError(
                f"standard input: {len(from_stdin)} secret line(s) wanted "
                f"({', '.join(from_stdin)}), {len(lines)} given"
            )
    values: dict[str, Any] = {}
    for name in wanted:
        option = OPTION_BY_NAME[f"{name}_file"]
        source = getattr(config, option.name)
        if source == STDIN:
            values[name] = lines.pop(0)
            continue
        path = Path(source).expanduser()
        _check_private(path, f"{option.flag} {path}")
        try:
            value = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{option.flag} {path}: {exc}") from exc
        if not value:
            raise ConfigError(f"{option.flag} {path} is empty")
        values[name] = value
    config = replace(config, **values)
    if config.broker_password:
        if url_password(config.broker_url):
            raise ConfigError("broker_url holds a password and broker_password gives one too")
        if any("@" not in url.partition("://")[2] for url in broker_urls(config.broker_url)):
            raise ConfigError(
                "a broker password is given but broker_url names no user "
                "(amqp://USER@host:5672/vhost; each URL of a failover list names one)"
            )
    return config


def check_payload_user(config: PilotConfig, euid: int) -> None:
    """A pilot running as root never runs its payloads as root by accident (``wms-pilot``
    checks it after :func:`load`)."""
    if euid == 0 and not config.payload_user:
        raise ConfigError(
            "the pilot runs as root: give --payload-user ACCOUNT, an unprivileged account the "
            "payloads run as (they must not run as root, nor read the pilot's files); "
            "--payload-user root runs them as root anyway"
        )


def merge(
    *,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> PilotConfig:
    values: dict[str, tuple[Any, str]] = {}
    broker: dict[str, str] = {}  # merged key by key, with the same precedence
    sources: list[tuple[dict[str, Any], Callable[[str], str]]] = [
        (read_file(config_file) if config_file else {}, lambda k: f"config file {config_file}"),
        (read_env(environ or {}), lambda k: OPTION_BY_NAME[k].env),
        (dict(flags or {}), lambda k: OPTION_BY_NAME[k].flag),
    ]
    for found, where in sources:
        broker.update(found.pop("broker_options", {}))
        values.update({k: (v, where(k)) for k, v in found.items()})
    parsed: dict[str, Any] = {"broker_options": broker}
    if config_file:
        parsed["config_file"] = str(Path(config_file).expanduser().absolute())
    for name, (value, source) in values.items():
        try:
            parsed[name] = OPTION_BY_NAME[name].parse(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name} = {value!r} (from {source}): {exc}") from exc
    return PilotConfig(**parsed)
