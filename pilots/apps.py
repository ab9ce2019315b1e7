from django.apps import AppConfig


class PilotsConfig(AppConfig):
    name = "pilots"
    verbose_name = "Pilots"

    def ready(self) -> None:
        from pilots import schema  # noqa: F401 - registers the OpenAPI auth extension
