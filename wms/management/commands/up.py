"""``manage.py up``: bring the WMS up on whatever DATABASE_URL / CELERY_BROKER_URL say.

Applies migrations, makes sure an operator account exists in development (DEBUG on, no user
yet: ``admin`` / ``admin``, printed), then serves the web app (API + admin) until interrupted.
"""

from __future__ import annotations

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand

from wms.services import dev_operator_ensure


class Command(BaseCommand):
    help = "Migrate, create the development operator account if none exists, serve the web app."

    def add_arguments(self, parser):
        parser.add_argument("--addr", default="127.0.0.1:8000", help="host:port to serve on")
        parser.add_argument(
            "--no-serve", action="store_true", help="only migrate and create the account"
        )

    def handle(self, *args, addr: str, no_serve: bool, **options):
        call_command("migrate", interactive=False, verbosity=0)
        self.stdout.write(self.style.SUCCESS("database migrated"))
        if settings.DEBUG and dev_operator_ensure():
            self.stdout.write("development operator account created: admin / admin")
        if no_serve:
            return
        self.stdout.write(f"admin: http://{addr}/admin/   API docs: http://{addr}/api/docs/")
        call_command("runserver", addr, use_reloader=False)
