from django.apps import AppConfig


class PilotsConfig(AppConfig):
    name = "pilots"
    verbose_name = "Pilots"

    def ready(self) -> None:
        from jobs.signals import attempts_to_kill
        from pilots import schema  # noqa: F401 - registers the OpenAPI auth extension
        from pilots.protocol import kill_orders_send

        # the kills the jobs app asks for become this app's commands (jobs.signals)
        attempts_to_kill.connect(kill_orders_send, dispatch_uid="pilots.kill_orders_send")
