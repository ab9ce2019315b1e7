"""``manage.py pilot_registrar [--username NAME]``: print the token pilots register with.

Creates (once) a non-staff account allowed to add pilots, with an API token, and prints the
token: give it to sites as ``WMS_PILOT_REGISTER_TOKEN`` (docs/pilot.md).
"""

from django.core.management.base import BaseCommand

from wms.services import PILOT_REGISTRAR, pilot_registrar_ensure


class Command(BaseCommand):
    help = "Print (creating it once) the API token pilots register with."

    def add_arguments(self, parser):
        parser.add_argument("--username", default=PILOT_REGISTRAR)

    def handle(self, *args, username: str, **options):
        self.stdout.write(pilot_registrar_ensure(username=username))
