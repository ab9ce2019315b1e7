"""``manage.py up``: the whole WMS on whatever DATABASE_URL / CELERY_BROKER_URL say.

Development mode is switched on explicitly for what ``up`` starts (``DJANGO_DEBUG=true`` in the
children's environment), unless ``DJANGO_DEBUG`` is set: the settings' own default is
production's (docs/security.md). Migrates, makes sure the accounts exist (in development mode,
the operator ``admin`` / ``admin`` when there is no user yet; the pilot-registration account and
a new token for the local pilots, revoking the previous run's), then starts
as child processes the web app, a Celery worker with beat and one CPU and one GPU pilot
(:mod:`devtools.stack`), waits for ``/healthz``, runs ``manage.py demo`` and stops everything. Exits
with the demo's status. ``--no-demo`` keeps everything running until Ctrl-C instead.
"""

from __future__ import annotations

import signal
import time

import environ
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from devtools.services import dev_operator_ensure
from devtools.stack import Stack, StackConfig, StackError, port_is_free
from pilots.services import pilot_registrar_ensure

DEFAULT_ADDR = "127.0.0.1:8000"


def _parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise CommandError(f"--addr must be host:port, not {addr!r}")
    return host or "127.0.0.1", int(port)


def development_mode() -> bool:
    """``up`` is the quick start: development mode unless ``DJANGO_DEBUG`` says otherwise."""
    return environ.Env().bool("DJANGO_DEBUG", default=True)


class _Terminated(Exception):
    """SIGTERM/SIGHUP to ``up`` itself: stop the children as on Ctrl-C."""


def _raise_terminated(signum, _frame):
    raise _Terminated(signal.Signals(signum).name)


class Command(BaseCommand):
    help = (
        "Migrate, ensure the accounts, start the web app, a worker with beat and local pilots, "
        "run the demo and stop everything (exit status: the demo's). --no-demo: run until Ctrl-C."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--addr",
            default=None,
            help=f"host:port of the web app (default {DEFAULT_ADDR}, or a free port if taken)",
        )
        parser.add_argument(
            "--no-demo", action="store_true", help="do not run the demo: run until Ctrl-C"
        )
        parser.add_argument(
            "--pilots-per-device", type=int, default=1, help="pilots per device type (1)"
        )
        parser.add_argument(
            "--timeout", type=float, default=600.0, help="seconds the demo may take (600)"
        )
        parser.add_argument(
            "--web",
            choices=("runserver", "gunicorn"),
            default="runserver",
            help="the web server (runserver serves the admin's static files in DEBUG)",
        )
        parser.add_argument(
            "--no-serve", action="store_true", help="only migrate and create the accounts"
        )

    def handle(self, *args, **o):
        call_command("migrate", interactive=False, verbosity=0)
        self.stdout.write(self.style.SUCCESS("database migrated"))
        development = development_mode()
        if development and dev_operator_ensure():
            self.stdout.write("development operator account created: admin / admin")
        token = pilot_registrar_ensure(label="local pilots (manage.py up)", replace=True)
        if o["no_serve"]:
            return
        if o["pilots_per_device"] < 0:
            raise CommandError("--pilots-per-device must be >= 0")

        host, port = _parse_addr(o["addr"] or DEFAULT_ADDR)
        if o["addr"] is None and not port_is_free(host, port):
            port = 0  # the default port is taken: any free one
        config = StackConfig.from_settings(
            host=host,
            port=port,
            register_token=token,
            pilots_per_device=o["pilots_per_device"],
            web=o["web"],
        )
        env = {"DJANGO_DEBUG": "true"} if development else {}
        stack = Stack(config, env=env, out=self.stdout)
        status, reason = self._run(stack, demo=not o["no_demo"], timeout=o["timeout"])
        if status:
            raise CommandError(reason, returncode=status)
        self.stdout.write(self.style.SUCCESS(reason))

    def _run(self, stack: Stack, *, demo: bool, timeout: float) -> tuple[int, str]:
        previous = {s: signal.signal(s, _raise_terminated) for s in (signal.SIGTERM, signal.SIGHUP)}
        previous[signal.SIGINT] = signal.getsignal(signal.SIGINT)
        try:
            stack.start(healthy_timeout=60)
            url = stack.server_url
            stack.say(f"WMS up: admin {url}/admin/   API docs {url}/api/docs/   ({url}/healthz)")
            if not demo:
                stack.say("running until Ctrl-C")
                while True:
                    stack.check_alive()
                    time.sleep(1)
            code = stack.run_child(
                "demo", [*stack.manage, "demo", "--timeout", f"{timeout:g}"], timeout=timeout + 120
            )
            if code:
                return code, f"the demo failed (exit status {code})"
            return 0, "demo finished: every job finished; WMS stopped"
        except KeyboardInterrupt:
            if not demo:
                return 0, "stopped"  # Ctrl-C is how --no-demo ends
            return 130, "interrupted"
        except _Terminated as exc:
            return 143, f"terminated ({exc})"
        except StackError as exc:
            stack.say(f"error: {exc}")
            return 1, str(exc)
        finally:
            # A second Ctrl-C (or SIGTERM) during the shutdown must not leave children behind.
            for s in previous:
                signal.signal(s, signal.SIG_IGN)
            try:
                stack.stop()
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
