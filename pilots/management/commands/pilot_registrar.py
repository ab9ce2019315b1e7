"""``manage.py pilot_registrar [--username NAME] [--name NAME]``: a token pilots register with.

Creates (once) a non-staff account allowed to add pilots, gives it a new API token and prints
the token's key, this once (only its hash is kept): give it to sites, whose pilots read it from
a file of mode 0600 or their standard input (``--register-token-file``, docs/pilot.md). Each
run makes another token (one per site, say); revoke one with ``manage.py api_token revoke`` or
in the admin.
"""

from django.core.management.base import BaseCommand

from pilots.services import PILOT_REGISTRAR, pilot_registrar_ensure


class Command(BaseCommand):
    help = "Print a new API token pilots register with (the account is created once)."

    def add_arguments(self, parser):
        parser.add_argument("--username", default=PILOT_REGISTRAR)
        parser.add_argument("--name", default="pilot registration", help="what it is for")

    def handle(self, *args, username: str, name: str, **options):
        self.stdout.write(pilot_registrar_ensure(username=username, label=name))
